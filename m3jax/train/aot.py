"""Will it fit? Per-device memory of the train step for a TPU topology, checked before a pod is booked.

`compile_for_topology` compiles the real train step (`Trainer`'s one jit site, with its in/out shardings and
donated state) ahead of time for the abstract devices of a TPU topology such as `v5p:4x4x4`, which libtpu
provides on any host, CPU-only included, and reads the compiler's own per-device memory figures, as MaxText's
train_compile does. `analytic_memory` is a rough estimate that needs no compiler; the dry run prints both
(`python -m m3jax.train --config=... --dry_run --topology=v5p:4x4x4`).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies

from m3jax import parallel
from m3jax.config import ConfigError, validate
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib
from m3jax.model.attention import CAUSAL_BLOCK_SIZE
from m3jax.parallel import MESH_AXES
from m3jax.train import loop
from m3jax.train.step import Trainer
from m3jax.train.tasks import MemoryTask, task_for

GiB = 2**30

# HBM per chip, by the jax `device_kind` of libtpu's devices (v5e is "TPU v5 lite", v5p is "TPU v5").
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,
    "TPU v5": 95 * GiB,
    "TPU v6 lite": 32 * GiB,
}

# libtpu: what compiles for TPU topologies on any host (see `tpu_devices` for where it is looked for).
ENABLE_HINT = ("make venv-tpu (libtpu into .venv/tpu-extra, which only the fit check loads; elsewhere: pip install "
               "--target DIR -r requirements-tpu.txt, then M3JAX_TPU_EXTRA=DIR); on a TPU host: pip install -r "
               "requirements-tpu.txt")


class TopologyUnavailable(RuntimeError):
    """No TPU compiler on this host (libtpu is not installed): the compiled check cannot run."""


class TopologyError(ValueError):
    """A topology name libtpu rejects, or a chip without a known HBM size."""


def tpu_devices(topology_name: str) -> list[jax.Device]:
    """The abstract (compile-only) devices of a TPU topology such as `v5p:4x4x4`, `v5e:4x4` or `v6e:2x2`.

    libtpu is taken where jax itself finds it (a `TPU_LIBRARY_PATH` file, or an importable `libtpu`: a TPU host's
    `pip install -r requirements-tpu.txt`), else from the TPU extra: `$M3JAX_TPU_EXTRA`, by default `tpu-extra` in
    this environment (`sys.prefix`), where `make venv-tpu` installs it outside the import path. jax starts a TPU in
    every process that can find libtpu, which on a host without one prints start-up errors and crashes jax's profiler,
    so only this call shows jax the extra: through `TPU_LIBRARY_PATH`, set while the plugin loads and then restored
    (child processes do not inherit it). Loading it prints libtpu's warnings about TPU_ACCELERATOR_TYPE and
    TPU_WORKER_HOSTNAMES once; they do not affect the compilation.
    """
    import importlib.util
    import os

    extra_library = os.path.join(os.environ.get("M3JAX_TPU_EXTRA") or os.path.join(sys.prefix, "tpu-extra"),
                                 "libtpu", "libtpu.so")
    jax_finds_it = (os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", ""))
                    or importlib.util.find_spec("libtpu") is not None)
    use_extra = not jax_finds_it and os.path.isfile(extra_library)
    saved = os.environ.get("TPU_LIBRARY_PATH")
    if use_extra:
        os.environ["TPU_LIBRARY_PATH"] = extra_library  # read by jax when it loads the plugin, in the call below
        # The extra is for hosts without TPU chips: nothing to guard, so libtpu's one-process lock
        # (/tmp/libtpu_lockfile) must not make two concurrent fit checks (two jobs, or a suite's processes) fail.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices)
    except jax.errors.JaxRuntimeError as e:  # libtpu rejects the name, or another process holds it
        if "lockfile" in str(e):
            raise TopologyUnavailable(f"libtpu is held by another process, so nothing here compiles for "
                                      f"{topology_name!r}: {e}") from e
        raise TopologyError(f"unknown TPU topology {topology_name!r} (expected e.g. v5p:4x4x4, v5e:4x4, v6e:2x2, "
                            f"v4:2x2x2): {e}") from e
    except RuntimeError as e:  # jax found no TPU plugin
        raise TopologyUnavailable(
            f"libtpu is not installed, so nothing here compiles for {topology_name!r} ({e}; no importable libtpu, "
            f"no TPU_LIBRARY_PATH file, no {extra_library}); to enable the check: {ENABLE_HINT}") from e
    finally:
        if use_extra:  # the loaded plugin stays; later calls do not read the path again
            if saved is None:
                os.environ.pop("TPU_LIBRARY_PATH", None)
            else:
                os.environ["TPU_LIBRARY_PATH"] = saved


def hbm_bytes_per_device(devices: list[jax.Device]) -> int:
    """HBM of one device: the chip's HBM over the devices per chip (v4 topologies list each core as a device)."""
    kind = devices[0].device_kind
    if kind not in HBM_BYTES:
        raise TopologyError(f"no HBM size known for TPU chip {kind!r}; add it to m3jax.train.aot.HBM_BYTES "
                            f"(known: {sorted(HBM_BYTES)})")
    chips = len({tuple(d.coords) for d in devices})
    return HBM_BYTES[kind] * chips // len(devices)


# The TPU compiler's own out-of-memory verdict, e.g. "RESOURCE_EXHAUSTED: ... CompileTimeHbmOom: ... the total memory
# required for HLO temporaries (34.31G) exceeds available HBM (15.75G)" (binary units).
_OOM = re.compile(r"required for [^(]+ \((?P<need>[\d.]+)(?P<nu>[KMGT]?)\) exceeds available HBM "
                  r"\((?P<have>[\d.]+)(?P<hu>[KMGT]?)\)")


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** ("KMGT".index(unit) + 1 if unit else 0))


def compile_for_topology(config: ml_collections.ConfigDict, topology_name: str) -> dict:
    """Compiles the train step for `topology_name` and returns the compiler's per-device memory in bytes.

    `total_bytes` = argument + output − alias (the donated state's outputs reuse its buffers) + temp + generated
    code: what one device must hold at once; `fits` compares it with the chip's HBM (`HBM_BYTES`). When the
    compiler itself runs out of HBM, `fits` is False and `compiler_oom` holds its message (with `required_bytes`
    and `available_bytes` when it states them) instead of the byte counts.
    Raises `TopologyUnavailable` without libtpu, `TopologyError` for an unknown topology or chip.
    """
    devices = tpu_devices(topology_name)
    hbm = hbm_bytes_per_device(devices)
    validate(config, num_devices=len(devices))
    mesh = parallel.make_mesh(config.mesh, devices)
    task = task_for(config)
    if isinstance(task, MemoryTask):
        task.stand_in_sink()  # a fit check needs the step's shapes, not the bank or knowledge base behind them
    trainer = Trainer(config, mesh, task)
    report = {"topology": topology_name, "device_kind": devices[0].device_kind, "num_devices": len(devices),
              "mesh": dict(mesh.shape), "hbm_bytes": hbm, "attention": trainer.model_cfg.attention}
    t0 = time.perf_counter()
    lowered = trainer.lower_train_step(trainer.abstract_state(), trainer.abstract_batch())
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.update(fits=False, compile_seconds=round(time.perf_counter() - t0, 1),
                      compiler_oom=str(e).strip().splitlines()[0])
        if m := _OOM.search(str(e)):
            report.update(required_bytes=_bytes(m["need"], m["nu"]), available_bytes=_bytes(m["have"], m["hu"]))
        return report
    report["compile_seconds"] = round(time.perf_counter() - t0, 1)
    # Pallas kernels (config.model.attention='splash') are lowered to Mosaic custom calls of the program.
    report["pallas_kernel_calls"] = lowered.as_text().count("@tpu_custom_call")
    stats = compiled.memory_analysis()
    report.update(
        argument_bytes=stats.argument_size_in_bytes,
        output_bytes=stats.output_size_in_bytes,
        alias_bytes=stats.alias_size_in_bytes,
        temp_bytes=stats.temp_size_in_bytes,
        generated_code_bytes=stats.generated_code_size_in_bytes,
    )
    report["total_bytes"] = (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                             + report["temp_bytes"] + report["generated_code_bytes"])
    report["fits"] = report["total_bytes"] <= hbm
    return report


def analytic_memory(config: ml_collections.ConfigDict, num_devices: int, platform: str | None = None) -> dict:
    """A rough per-device memory estimate of a train step on `num_devices`, in bytes, without a compiler.

    - state: float32 parameters and the two AdamW moments, each leaf sharded as the config's logical axis rules
      shard it on the mesh (with fsdp everything but the norms is divided by fsdp·tensor);
    - gradients: float32, sharded like the parameters (twice with gradient accumulation: the sum and one micro);
    - gathered weights: FSDP all-gathers one layer (and the LM head) at a time: float32, its compute-dtype copy and
      its float32 gradient before the reduce-scatter (over the tensor axis only);
    - activations, per device for one micro-batch: what the backward keeps of every layer under the remat policy
      (`full`: the layer input; `dots`: the matmul outputs; `none`: everything), plus the larger of one layer's
      working set in the backward and the float32 logits of one loss chunk
      (`loss.chunk_size` positions of every row) with their gradient; no attention probabilities with a fused kernel.

    The activation term is rough (it ignores fusion and XLA's buffer reuse; on memory3_2b it is within ~±30% of
    the compiled figure): trust `compile_for_topology` for the verdict.
    """
    cfg = ModelConfig.from_config(config.model, config.memory, platform=platform)  # platform: the attention run
    mesh = parallel.mesh_shape(config.mesh, num_devices)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    params, specs = params_lib.abstract_params(cfg), params_lib.param_specs(cfg)

    def per_device(shape, spec) -> int:
        axes = parallel.logical_to_spec(tuple(spec), rules)
        parts = [math.prod(mesh[a] for a in ((ax,) if isinstance(ax, str) else ax or ())) for ax in axes]
        parts += [1] * (len(shape) - len(parts))
        return math.prod(-(-n // p) for n, p in zip(shape, parts, strict=True))  # XLA pads uneven shards

    shard_params = sum(jax.tree.leaves(jax.tree.map(
        lambda p, s: per_device(p.shape, s), params, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )))
    accum = int(config.optimizer.grad_accum_steps)
    state = 12 * shard_params
    grads = 4 * shard_params * (2 if accum > 1 else 1)

    t, dt = mesh["tensor"], jnp.dtype(cfg.dtype).itemsize
    d, f, vocab = cfg.hidden_size, cfg.mlp_dim, cfg.padded_vocab_size
    q_width, kv_width = cfg.num_heads * cfg.head_dim / t, cfg.num_kv_heads * cfg.head_dim / t
    counts = cfg.param_counts()
    gathered = (8 + dt) * (counts["layers"] / cfg.num_layers + counts["lm_head"]) / t

    seqs = int(config.data.global_batch_size) // accum / (mesh["data"] * mesh["fsdp"])
    seq_len = int(config.data.seq_len)
    tokens = seqs * seq_len
    # Causal attention keeps float32 probabilities over the keys up to each query block (about half of T²).
    keys = (seq_len + CAUSAL_BLOCK_SIZE) / 2 if seq_len > CAUSAL_BLOCK_SIZE else seq_len
    # A fused kernel (config.model.attention) keeps O(seq) statistics instead.
    probs = 4 * seqs * cfg.num_heads / t * seq_len * keys if cfg.attention == "xla" else 0
    # Everything a layer's backward reads: residuals and norms (float32 inside RMSNorm), q/k/v/attention output,
    # the MLP's gate/up/activation, and the attention probabilities.
    layer_working = tokens * (dt * (4 * d + 2 * q_width + 2 * kv_width + 3 * f / t) + 4 * 2 * d) + probs
    saved_per_layer = {
        "none": layer_working,
        "full": tokens * dt * d,
        "dots": tokens * dt * (q_width + 2 * kv_width + 2 * d + 2 * f / t),
    }[cfg.remat]
    chunk = int(config.loss.chunk_size)
    logits = 2 * 4 * seqs * min(chunk or seq_len, seq_len) * vocab / t  # one chunk's float32 logits and gradient
    activations = cfg.num_layers * saved_per_layer + max(0 if cfg.remat == "none" else layer_working, logits)
    total = state + grads + gathered + activations
    return {k: int(v) for k, v in {
        "params_per_device": shard_params,
        "state_bytes": state,
        "gradient_bytes": grads,
        "gathered_weight_bytes": gathered,
        "activation_bytes": activations,
        "total_bytes": total,
    }.items()}


def chips_in_name(topology_name: str) -> int:
    """The chips of a topology name, `v5p:4x4x4` -> 64 (for the analytic estimate when libtpu is absent)."""
    _, _, dims = topology_name.partition(":")
    try:
        return math.prod(int(n) for n in dims.split("x"))
    except ValueError:
        raise TopologyError(f"unknown TPU topology {topology_name!r} (expected e.g. v5p:4x4x4, v5e:4x4)") from None


def fit_report(config: ml_collections.ConfigDict, topology_name: str | None) -> dict:
    """The dry run's memory section: the analytic estimate and, given a topology, the compiled check.

    Keys: `analytic_memory_per_device_bytes` (for `analytic_num_devices`: the topology's, else this host's), then
    `compiled` (see `compile_for_topology`) or `compiled_check: "skipped: <why, and how to enable it>"`, and
    `fits`: the compiled verdict, None when it was skipped.
    """
    compiled, skipped = None, None
    if topology_name is None:
        # This host's devices, or the fewest the config's mesh allows when its fixed axes need more.
        fixed = math.prod(int(config.mesh[ax]) for ax in MESH_AXES if int(config.mesh[ax]) != -1)
        num_devices = jax.device_count() if jax.device_count() % fixed == 0 else fixed
        skipped = f"no --topology given (e.g. --topology=v5p:4x4x4; it needs libtpu: {ENABLE_HINT})"
    else:
        try:
            compiled = compile_for_topology(config, topology_name)
            num_devices = compiled["num_devices"]
        except TopologyUnavailable as e:
            num_devices = chips_in_name(topology_name)
            skipped = str(e)
    validate(config, num_devices=num_devices)
    report = {
        "analytic_num_devices": num_devices,
        "analytic_memory_per_device_bytes": analytic_memory(config, num_devices, "tpu" if topology_name else None),
    }
    if compiled is None:
        return {**report, "compiled_check": f"skipped: {skipped}", "fits": None}
    return {**report, "compiled": compiled, "fits": compiled["fits"]}


def dry_run(config: ml_collections.ConfigDict, topology_name: str | None) -> int:
    """The CLI's `--dry_run`: size, FLOPs and per-device memory as one JSON object on stdout, a summary on stderr.

    Returns the exit status: 0 when it fits or no topology was asked, 1 when it does not fit, 2 for an unknown
    topology or a config that does not suit it, 3 when a topology was asked but the compiled check could not run.
    """
    validate(config)
    report = loop.describe_model(config)
    try:
        report.update(fit_report(config, topology_name))
    except (TopologyError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    print("\n".join(summary_lines(report)), file=sys.stderr)
    if report["fits"] is None:
        return 3 if topology_name else 0
    return 0 if report["fits"] else 1


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def summary_lines(report: dict) -> list[str]:
    """Human lines for a `fit_report`: the analytic estimate, the compiled figures and the verdict."""
    a = report["analytic_memory_per_device_bytes"]
    lines = [
        f"analytic estimate per device on {report['analytic_num_devices']} devices (rough): "
        f"state {gib(a['state_bytes'])} + gradients {gib(a['gradient_bytes'])} + gathered weights "
        f"{gib(a['gathered_weight_bytes'])} + activations {gib(a['activation_bytes'])} = {gib(a['total_bytes'])}"
    ]
    c = report.get("compiled")
    if c is None:
        return [*lines, f"compiled check skipped: {report['compiled_check'].removeprefix('skipped: ')}"]
    where = f"{c['topology']} ({c['num_devices']} x {c['device_kind']}, mesh {c['mesh']})"
    if "compiler_oom" in c:
        return [*lines, f"compiling for {where} took {c['compile_seconds']} s", f"does not fit: the compiler ran out "
                f"of HBM ({gib(c['hbm_bytes'])} per device): {c['compiler_oom']}"]
    lines.append(
        f"compiled for {where} in {c['compile_seconds']} s, per device: argument {gib(c['argument_bytes'])} + "
        f"output {gib(c['output_bytes'])} - alias {gib(c['alias_bytes'])} + temp {gib(c['temp_bytes'])} + code "
        f"{gib(c['generated_code_bytes'])} = {gib(c['total_bytes'])}"
    )
    used = f"{gib(c['total_bytes'])} of {gib(c['hbm_bytes'])} HBM per device on {c['topology']}"
    if c["fits"]:
        return [*lines, f"fits: {used} ({c['total_bytes'] / c['hbm_bytes']:.0%})"]
    return [*lines, f"does not fit: the train step needs {used}"]
