"""The TPU extra must not disturb a CPU run: no libtpu start-up lines (and no profiler crash) without JAX_PLATFORMS.

`make venv-tpu` (which `make test` runs) installs libtpu into .venv/tpu-extra, outside the import path: jax finds a
TPU plugin when `import libtpu` works or TPU_LIBRARY_PATH names one, and then tries to start a TPU in every process,
printing errors on a host without one. Only the fit check (`aot.tpu_devices`) points jax at the extra.
These runs leave JAX_PLATFORMS and XLA_FLAGS unset, as a user's shell does. The control test makes libtpu importable
the way the old Makefile did (site-packages; here through PYTHONPATH) and checks that the patterns do catch its lines.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

# What libtpu 0.0.52 prints when jax starts it on a CPU-only host (stderr), e.g.
#   WARNING: could not determine TPU accelerator type, please set env var `TPU_ACCELERATOR_TYPE` manually, ...
#   E0000 00:00:... common_lib.cc:906] INVALID_ARGUMENT: Error: unexpected worker hostname '...' from env var
#   TPU_WORKER_HOSTNAMES. ...
#   === Source Location Trace: ===
TPU_START_UP = re.compile(r"libtpu|TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|TPU accelerator type|worker hostname"
                          r"|^E0000 |Source Location Trace|InitGoogle|TPU backend|TPU initialization")
# jax's own INFO line (shown at absl's default verbosity) on any host where it finds no libtpu: it looked, found none.
NO_LIBTPU_FOUND = re.compile(r"Unable to initialize backend 'tpu': .*Failed to open libtpu\.so: .*No such file")

JITTED = "import jax, jax.numpy as jnp; print(jax.devices(), float(jax.jit(lambda x: (x @ x).sum())(jnp.ones((8, 8)))))"


def user_env(**extra) -> dict:
    """This process's environment as a user's shell would have it: no JAX_PLATFORMS, no XLA_FLAGS."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return {**env, **extra}


def tpu_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines()
            if TPU_START_UP.search(line) and not NO_LIBTPU_FOUND.search(line)]


HINT = ("libtpu is visible to every process: is it installed in the venv's site-packages (the old `make venv-tpu`)? "
        "Rerun `make venv-tpu`: it moves it to .venv/tpu-extra")


def test_a_cpu_jax_process_prints_no_tpu_start_up_lines():
    out = subprocess.run([sys.executable, "-c", JITTED], cwd=REPO, env=user_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CpuDevice" in out.stdout and "512.0" in out.stdout
    assert tpu_lines(out) == [], f"{HINT}\n{out.stderr[-3000:]}"


def test_the_patterns_catch_libtpu_start_up_when_libtpu_is_importable():
    """The control: libtpu importable as the old Makefile installed it -> the same process prints what we look for."""
    extra = os.environ.get("M3JAX_TPU_EXTRA") or os.path.join(sys.prefix, "tpu-extra")  # as aot.tpu_devices looks
    if importlib.util.find_spec("libtpu") is not None:  # installed in site-packages: it is visible already
        env = user_env()
    elif os.path.isfile(os.path.join(extra, "libtpu", "libtpu.so")):
        env = user_env(PYTHONPATH=os.pathsep.join(p for p in (extra, os.environ.get("PYTHONPATH")) if p))
    else:
        pytest.fail(f"no libtpu in {extra}: run `make venv-tpu` (`make test` does)")
    out = subprocess.run([sys.executable, "-c", JITTED], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = tpu_lines(out)
    assert any("TPU_WORKER_HOSTNAMES" in line for line in lines), out.stderr[-3000:]
    assert any(line.startswith("E0000 ") for line in lines), out.stderr[-3000:]


@pytest.mark.slow
def test_a_cpu_training_run_prints_no_tpu_start_up_lines_and_profiles(lm_data, tmp_path):
    # Three steps of the tiny test model (no eval) on one CPU device at absl's default verbosity, profiling step 2:
    # jax 0.10's profiler crashes (SIGSEGV) in a process where the TPU plugin has been loaded, so the run also fails
    # if libtpu gets loaded.
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "m3jax.train", "--config=tests/lm_test_config.py", f"--workdir={workdir}",
         f"--config.data.path={lm_data}", "--config.train.num_steps=3", "--config.train.profile_start=2",
         "--config.train.profile_steps=1"],
        cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{HINT}?\n{out.stderr[-3000:]}"
    assert (workdir / "metrics.jsonl").is_file() and (workdir / "profile").is_dir()
    assert tpu_lines(out) == [], f"{HINT}\n{out.stderr[-3000:]}"
