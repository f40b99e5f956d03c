"""The ahead-of-time fit check: `python -m m3jax.train --dry_run --topology=...` (m3jax/train/aot.py).

Compiling for a TPU topology needs libtpu (requirements-tpu.txt; `make test` installs it into .venv/tpu-extra,
outside the import path, where `aot.tpu_devices` finds it): those tests fail without it. One test compiles the full
2.4B model for v5p:4x4x4 (2-3.5 min on 2 cores, in the background: tests/conftest.py BACKGROUND). A
shallower variant would not be cheaper: the layers are scanned, so compile time grows with width and the number of
causal attention blocks, not depth. The oversized case is cheap: the compiler stops at its own out-of-memory verdict.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from configs import memory3_2b
from m3jax.train import aot

GiB = 2**30
# `python -m m3jax.train` on a host where `import libtpu` fails; run_dry_run also points M3JAX_TPU_EXTRA (the extra
# that `make venv-tpu` installs outside the import path) at NO_TPU_EXTRA and drops TPU_LIBRARY_PATH: no libtpu at all.
HIDE_LIBTPU = ("import runpy, sys; sys.modules['libtpu'] = None; "
               "runpy.run_module('m3jax.train', run_name='__main__', alter_sys=True)")
NO_TPU_EXTRA = os.path.join(os.devnull, "tpu-extra")  # under a file: cannot exist
TPU_EXTRA = os.environ.get("M3JAX_TPU_EXTRA") or os.path.join(sys.prefix, "tpu-extra")  # where aot.tpu_devices looks


@pytest.fixture
def libtpu():
    """The compiled fit check needs libtpu; `make test` installs it (`make venv-tpu`), so its absence fails."""
    extra = os.path.join(TPU_EXTRA, "libtpu", "libtpu.so")
    if importlib.util.find_spec("libtpu") is None and not os.path.isfile(extra):
        pytest.fail(f"libtpu is not installed (not importable, not in {TPU_EXTRA}): run `make venv-tpu` (`make test` "
                    f"does) or pip install -r requirements-tpu.txt")


def run_dry_run(*args: str, hide_libtpu: bool = False,
                config: str = "configs/memory3_2b.py") -> tuple[subprocess.CompletedProcess, dict]:
    """The CLI's dry run of `config` in a subprocess -> (process, its JSON report)."""
    cmd = [sys.executable, "-c", HIDE_LIBTPU] if hide_libtpu else [sys.executable, "-m", "m3jax.train"]
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if hide_libtpu:
        env["M3JAX_TPU_EXTRA"] = NO_TPU_EXTRA
    out = subprocess.run([*cmd, f"--config={config}", "--dry_run", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert "{" in out.stdout, out.stderr[-3000:]
    return out, json.loads(out.stdout[out.stdout.index("{"):])


@pytest.mark.slow
def test_memory3_2b_fits_a_v5p_128_slice(libtpu, memory3_2b_fit):
    """`python -m m3jax.train --config=configs/memory3_2b.py --dry_run --topology=v5p:4x4x4`, run in the background
    while the suite goes on (tests/conftest.py: TPU_FIT_2B)."""
    out = memory3_2b_fit
    assert out.returncode == 0 and "{" in out.stdout, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert "fits:" in out.stderr
    c = report["compiled"]
    assert report["fits"] is c["fits"] is True
    assert (c["num_devices"], c["device_kind"], c["mesh"]) == (64, "TPU v5", {"data": 1, "fsdp": 64, "tensor": 1})
    assert c["hbm_bytes"] == 95 * GiB
    assert c["attention"] == "splash" and c["pallas_kernel_calls"] > 0  # the Pallas kernel compiles at scale
    # Arguments: float32 parameters + two AdamW moments, all sharded 64 ways by fsdp (only the 0.3M norm weights are
    # replicated), plus this device's 1/64 of the int32 batch (1.3 MB). TPU tiled layouts pad the narrow minor
    # dimensions of the shards (3200 / 64 = 50 columns, tiles are 128 wide): measured +29%, so allow up to +50%.
    state = 12 * report["params_total"] / 64
    assert state < c["argument_bytes"] < 1.5 * state
    # The state is donated: the new state (the outputs, but for 3 scalar metrics) reuses the old one's buffers.
    assert c["alias_bytes"] > 0.99 * c["output_bytes"] > 0.9 * state
    # Full remat keeps each layer's bf16 input [32 sequences, 2048, 3200] for the backward: 44 of them are 17.2 GiB.
    assert 44 * 32 * 2048 * 3200 * 2 < c["temp_bytes"] < c["total_bytes"] < 95 * GiB
    assert c["total_bytes"] == (c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"] + c["temp_bytes"]
                                + c["generated_code_bytes"])
    # The analytic estimate is printed beside the compiled figure and is roughly right.
    a = report["analytic_memory_per_device_bytes"]
    assert report["analytic_num_devices"] == 64
    assert 0.7 < a["total_bytes"] / c["total_bytes"] < 1.5


@pytest.mark.slow
def test_oversized_config_does_not_fit(libtpu):
    # The paper's model without remat on a 16-chip v5e slice: terabytes of activations per 16 GiB chip.
    out, report = run_dry_run("--config.model.remat=none", "--topology=v5e:4x4")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "does not fit" in out.stderr
    c = report["compiled"]
    assert report["fits"] is c["fits"] is False
    assert c["hbm_bytes"] == 16 * GiB and "RESOURCE_EXHAUSTED" in c["compiler_oom"]
    assert c["required_bytes"] > 50 * c["available_bytes"]  # 93x with splash attention and a chunked loss
    assert report["analytic_memory_per_device_bytes"]["total_bytes"] > 50 * c["hbm_bytes"]


@pytest.mark.slow
def test_the_continued_stage_compiles_for_a_tpu_slice_in_both_memory_modes(libtpu, continued_fit_bank,
                                                                            continued_fit_online):
    """The continued stage's train step (memory read; bank codes decoded on device, or references encoded in the
    step) compiles for v5p:2x2x1 without data or bank: the batch's memory fields are arguments of the step, the
    bank's codes (bf16 key/values) larger than the reference tokens the online mode encodes. Both dry runs ran in
    the background (tests/conftest.py: TPU_FIT_CONTINUED)."""
    compiled = {}
    for mode, out in (("bank", continued_fit_bank), ("online", continued_fit_online)):
        assert out.returncode == 0 and "{" in out.stdout, out.stderr[-3000:]
        report = json.loads(out.stdout[out.stdout.index("{"):])
        compiled[mode] = c = report["compiled"]
        assert c["fits"] is True and (c["num_devices"], c["device_kind"]) == (4, "TPU v5"), c
        assert c["attention"] == "splash" and c["pallas_kernel_calls"] > 0, c  # memory3_2b's, inherited
    assert compiled["bank"]["argument_bytes"] > compiled["online"]["argument_bytes"], compiled


@pytest.mark.slow
def test_without_libtpu_the_analytic_estimate_is_printed_and_the_check_skipped():
    out, report = run_dry_run("--topology=v5p:4x4x4", hide_libtpu=True)
    assert out.returncode == 3, out.stderr[-3000:]  # a fit check that could not run does not pass
    assert report["fits"] is None and "compiled" not in report
    assert report["compiled_check"].startswith("skipped: libtpu is not installed")
    assert "pip install -r requirements-tpu.txt" in report["compiled_check"]
    assert "compiled check skipped" in out.stderr
    assert report["analytic_num_devices"] == 64  # the chips of the topology's name
    assert 2.4e9 < report["params_non_embedding"] < 2.45e9


def test_dry_run_without_topology_gives_the_analytic_estimate(capsys):
    config = memory3_2b.get_config()
    assert aot.dry_run(config, None) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compiled_check"].startswith("skipped: no --topology")
    assert report["fits"] is None
    a = report["analytic_memory_per_device_bytes"]
    n = report["analytic_num_devices"]  # the test process's 8 CPU devices: fsdp=8
    norms = 2 * 44 * 3200 + 3200  # replicated; everything else is sharded by fsdp
    assert a["params_per_device"] == (report["params_total"] - norms) // n + norms
    assert a["state_bytes"] == 12 * a["params_per_device"] and a["gradient_bytes"] == 4 * a["params_per_device"]
    assert a["total_bytes"] == sum(a[k] for k in ("state_bytes", "gradient_bytes", "gathered_weight_bytes",
                                                  "activation_bytes"))
    # Activations shrink with the per-device batch and with remat.
    assert aot.analytic_memory(config, 2 * n)["activation_bytes"] < a["activation_bytes"]
    with config.unlocked():
        config.model.remat = "none"
    assert aot.analytic_memory(config, n)["activation_bytes"] > 5 * a["activation_bytes"]


# Run in a child process: once libtpu is loaded into a process, jax.profiler there crashes on CPU (other tests trace).
NAMING_CHECKS = """
import sys
from configs import memory3_2b
from m3jax.train import aot
GiB = 2**30
assert aot.dry_run(memory3_2b.get_config(), "v9z:4x4") == 2
try:
    aot.hbm_bytes_per_device(aot.tpu_devices("v3:2x2"))
    raise SystemExit("v3 was accepted")
except aot.TopologyError as e:
    assert "'TPU v3'" in str(e), e
# v4 topologies list both cores of a chip as devices: each gets half of the chip's 32 GiB.
assert aot.hbm_bytes_per_device(aot.tpu_devices("v4:2x2x1")) == 16 * GiB
assert aot.hbm_bytes_per_device(aot.tpu_devices("v5p:2x2x1")) == 95 * GiB
print("naming checks passed")
"""


@pytest.mark.slow
def test_bad_topology_and_unknown_chip_are_named(libtpu):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run([sys.executable, "-c", NAMING_CHECKS], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "naming checks passed" in out.stdout, out.stderr[-3000:]
    assert "unknown TPU topology 'v9z:4x4'" in out.stderr
