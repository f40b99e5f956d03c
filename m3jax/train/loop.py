"""The training loop: start-up, resume, the step loop with its spike guard and preemption, and its hooks.

The loop's core trains a task's batches (`m3jax.train.tasks`) and owns what can interrupt a run: the spike guard
(roll back to the last good checkpoint) and preemption (save and exit). Everything periodic — logging, held-out
evaluation, checkpoints, profiling — is a hook (`m3jax.train.hooks`); `train(..., hooks=[...])` adds more.

Each invocation writes a `start` record to metrics.jsonl before its steps (the step it starts at; `resumed`: 1 when
restored from a checkpoint), so the steps each invocation trained can be told apart. Fault points (`m3jax.faults`)
after each step and after each checkpoint save begins let tests stop the process exactly there.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from m3jax import checkpoint as ckpt_lib
from m3jax import faults, parallel
from m3jax.config import ConfigError, differences, resolve, validate
from m3jax.evals.entities import EntityEval
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib
from m3jax.model.config import ARCHITECTURE_FIELDS
from m3jax.train import flops as flops_lib
from m3jax.train import hooks as hooks_lib
from m3jax.train.guard import LossSpikeError, PreemptionWatch, SpikeGuard
from m3jax.train.metrics import MetricWriter
from m3jax.train.step import Trainer

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: state saved on a preemption notice; rerun the same command to resume

# What a resumed run must agree on with its checkpoint (flattened config keys, plus the data's identity): what the
# state means and which data comes next. `train.resume_overrides` names the ones changed on purpose.
RESUME_KEYS = (
    *(f"model.{k}" for k in ARCHITECTURE_FIELDS),
    *(f"memory.{k}" for k in ("heads", "layers", "kv_heads", "k", "ref_len", "chunk_size")),
    # what the continued stage reads: whether and how (a control run must not resume as the run it controls)
    *(f"memory.{k}" for k in ("read", "per_chunk", "bank", "shuffle_references")),
    "retrieval.mode", "retrieval.layout", "retrieval.ids_path", "retrieval.refs_per_chunk",
    "seed", "data.path", "data.train_split", "data.seq_len", "data.global_batch_size", "data.shuffle_seed",
    "data.tokenizer_sha256", "data.train_records",
)


def data_identity(meta: dict, config: ml_collections.ConfigDict) -> dict:
    """What a checkpoint records of its data: the tokenizer that wrote it and the training split's size."""
    return {"tokenizer_sha256": meta["tokenizer_sha256"],
            "train_records": int(meta["splits"][config.data.train_split]["num_records"])}


def check_resume(saved_config: dict, saved_data: dict | None, config_json: dict, data: dict, where) -> None:
    """Refuses to resume under a config that changes what the checkpoint's state means or which data comes next
    (`RESUME_KEYS`), naming every such key with both values, unless `train.resume_overrides` lists it; other
    changed keys (a new learning rate, say) are logged."""
    overrides = {k.strip() for k in config_json["train"]["resume_overrides"].split(",") if k.strip()}
    unknown = overrides - set(RESUME_KEYS)
    if unknown:
        raise ConfigError(f"config.train.resume_overrides: {sorted(unknown)} are not keys a resume compares "
                          f"(those are {', '.join(RESUME_KEYS)})")
    ours = {**config_json, "data": {**config_json["data"], **data}}
    theirs = {**saved_config, "data": {**saved_config.get("data", {}), **(saved_data or data)}}
    changed = differences(theirs, ours)
    refused = [(k, a, b) for k, a, b in changed if k in RESUME_KEYS and k not in overrides]
    if refused:
        raise ConfigError(
            f"the run resumes from {where}, whose config differs in what its state means or which data comes next: "
            + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in refused)
            + ". Resume with the checkpoint's values, use a new --workdir, or list the keys changed on purpose in "
            "--config.train.resume_overrides")
    for k, a, b in changed:
        if not k.startswith(("distributed.", "train.resume_overrides", "train.stop_at")):
            logging.warning("resuming from %s with a changed config.%s: %r -> %r", where, k, a, b)


def check_same_config(config_json: dict) -> None:
    """The processes of one run must have been given the same settings (but for their place in it)."""
    view = {k: v for k, v in config_json.items() if k != "distributed"}
    blobs = parallel.allgather_bytes(json.dumps(view, sort_keys=True).encode())
    mine = blobs[jax.process_index()]
    if all(b == mine for b in blobs):
        return
    diffs = [f"{k}: process 0 {a!r}, process {i} {b!r}"
             for i, blob in enumerate(blobs[1:], 1) for k, a, b in differences(json.loads(blobs[0]), json.loads(blob))]
    raise ConfigError(f"the {len(blobs)} processes of this run were given different settings: " + "; ".join(diffs))


def describe_model(config: ml_collections.ConfigDict) -> dict:
    """Parameter counts and FLOPs per token, computed abstractly (nothing is allocated)."""
    model_cfg = ModelConfig.from_config(config.model, config.memory)
    counts = model_cfg.param_counts()
    allocated = params_lib.param_count(params_lib.abstract_params(model_cfg))
    if allocated != counts["total"]:
        raise AssertionError(f"analytic parameter count {counts['total']} != model's {allocated}")
    seq_len = int(config.data.seq_len)
    return {
        **{f"params_{k}": v for k, v in counts.items()},
        "seq_len": seq_len,
        "train_flops_per_token": flops_lib.train_flops_per_token(model_cfg, seq_len),
    }


def held_out_loss(trainer: Trainer, batches) -> Callable[[Any], dict[str, float]]:
    """params -> the task's held-out metrics ("loss" and its variants, `Task.eval_sums`), each the mean over the
    fixed held-out `batches` (this process's rows of each), and "tokens", the tokens they weigh."""

    def evaluate(params) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for batch in batches:
            out = jax.device_get(trainer.eval_step(params, trainer.global_batch(batch)))
            for name, s in out.items():
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += float(s["nll_sum"])
                acc[1] += float(s["weight"])
        means = {name: nll / max(weight, 1.0) for name, (nll, weight) in sums.items()}
        return {**means, "tokens": sums["loss"][1]}

    return evaluate


def evaluation(config: ml_collections.ConfigDict, trainer: Trainer,
               eval_batches) -> Callable[[Any], dict[str, float]] | None:
    """params -> every held-out metric of the run, side by side in one evaluation line: the task's losses on the
    held-out batches (`held_out_loss`) and, with `eval.cloze`, the held-out entities' accuracy (`EntityEval`, set
    up here, once). None when the run evaluates nothing."""
    parts = [held_out_loss(trainer, eval_batches)] if eval_batches else []
    if config.eval.cloze:
        task = trainer.task
        parts.append(EntityEval(config, trainer.model_cfg, task.tokenizer(), task.source(), task.sink_tokens(),
                                mesh=trainer.mesh, rules=trainer.rules))
    if not parts:
        return None
    return lambda params: {name: value for part in parts for name, value in part(params).items()}


def train(config: ml_collections.ConfigDict, workdir: str, *, batch_hook=None,
          hooks: Sequence[hooks_lib.Hook] = ()) -> dict:
    """Runs (or resumes) training in `workdir`; returns a summary: the step it started at and the checkpoint step
    it resumed from (None for a fresh run), losses, held-out losses, rescues, preemption.

    `batch_hook(step, local_batch) -> local_batch`, if given, sees every batch before it is trained on (the step
    it is for, counted from 1); tests inject faults with it. `hooks` run after the built-in ones.
    """
    parallel.initialize_distributed(config.distributed)
    if not config.data.path:
        raise ValueError("config.data.path is empty: point it at a directory written by tools/prepare_data.py")
    meta = resolve(config)
    validate(config, num_devices=jax.device_count())
    config_json = json.loads(config.to_json_best_effort())
    check_same_config(config_json)
    data = data_identity(meta, config)

    mesh = parallel.make_mesh(config.mesh)
    trainer = Trainer(config, mesh)
    task = trainer.task
    proc, nproc = jax.process_index(), jax.process_count()
    logging.info("mesh %s on %d processes; task %s; model %s", dict(mesh.shape), nproc, task.name,
                 trainer.model_cfg)

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=int(config.train.keep_checkpoints),
                                 async_save=bool(config.train.async_checkpointing))
    train_iter = task.train_iterator(proc, nproc)
    guard = SpikeGuard(config.spike_guard)
    rescues: list[dict] = []

    def initial_state():
        if config.init_from:
            params = ckpt_lib.load_params(config.init_from, trainer.abstract_state().params)
            logging.info("initialised parameters from %s", config.init_from)
            return trainer.state_from_params(params)
        return trainer.init_state()

    def restore(step: int):
        """The state of checkpoint `step`; the spike guard's statistics and the rescue log come back with it."""
        state, data_state, saved_config, loop_state = ckpt.restore(step, trainer.abstract_state())
        if "guard" in loop_state:
            guard.load_state_dict(loop_state["guard"])
        return state, data_state, saved_config, loop_state

    def save(step: int, state) -> None:
        loop_state = {"run_id": run_id, "data": data, "guard": guard.state_dict(), "rescues": rescues}
        ckpt.save(step, state, train_iter.get_state(), config_json, loop_state)
        faults.reached("after_save_begins", step)

    latest = ckpt.latest_step()
    if latest is not None:
        where = ckpt.directory / str(latest)
        state, data_state, saved_config, loop_state = restore(latest)
        check_resume(saved_config, loop_state.get("data"), config_json, data, where)
        rescues = loop_state.get("rescues", [])
        run_id = loop_state.get("run_id") or ckpt_lib.new_run_id(config.run_name)  # older checkpoints had none
        # The iterator state counts this process's batches, which is the same number on every process (each
        # takes one local batch per global batch), so the one JSON copy that Orbax saves serves all of them.
        train_iter.set_state(data_state)
        logging.info("resumed from %s at step %d (run %s)", where, latest, run_id)
    else:
        state = initial_state()
        run_id = ckpt_lib.new_run_id(config.run_name)
    run_id = parallel.allgather_bytes(run_id.encode())[0].decode()  # process 0's, on every process
    start = int(jax.device_get(state.step))

    writer = MetricWriter(workdir)
    # One record per invocation, ahead of its steps: the step it starts at, and whether a checkpoint gave it.
    writer.write(start, {"resumed": int(latest is not None)}, prefix="start")
    meter = hooks_lib.Throughput()
    summary: dict = {"run_id": run_id, "start_step": start, "resumed_from": latest, "losses": {}, "eval": {},
                     "rescues": rescues, "preempted_at": None}
    peak = flops_lib.device_peak_flops()
    # On CPU the measured matmul already uses every core of a process; accelerators count per device.
    total_peak = peak * (nproc if jax.devices()[0].platform == "cpu" else jax.device_count())
    profiler = hooks_lib.Profiler(config.train, workdir, proc)
    evaluate = evaluation(config, trainer, task.eval_batches(proc, nproc))
    all_hooks = [
        hooks_lib.log_hook(int(config.train.log_every), writer, meter, summary,
                           tokens_per_step=int(config.data.global_batch_size) * int(config.data.seq_len),
                           flops_per_token=flops_lib.train_flops_per_token(trainer.model_cfg,
                                                                           int(config.data.seq_len)),
                           peak_flops=total_peak),
        *([hooks_lib.eval_hook(int(config.train.eval_every), evaluate, writer, summary)] if evaluate else []),
        hooks_lib.checkpoint_hook(int(config.train.checkpoint_every), save),
        profiler.hook(),
        *hooks,
    ]

    def run_hooks(info: hooks_lib.StepInfo) -> None:
        t0 = time.perf_counter()
        for hook in all_hooks:
            if hook.due(info):
                hook.fn(info)
        meter.exclude(time.perf_counter() - t0)

    def rescue(step: int, loss: float):
        """Back to the last good checkpoint after a spike at `step`; the data iterator stays where it is."""
        ckpt.wait()
        good = ckpt.latest_step()
        record = {"step": step, "loss": loss if math.isfinite(loss) else str(loss), "restored_from": good or 0,
                  "stats": guard.describe()}
        writer.write(step, {"loss": loss, "running_mean": guard.mean, "running_std": guard.var**0.5,
                            "rescue": len(rescues) + 1}, prefix="spike")
        if len(rescues) >= guard.max_rescues:
            where = ckpt.directory / str(good) if good is not None else "none (no checkpoint yet)"
            raise LossSpikeError(
                f"loss spike at step {step}: loss {loss:.4f} against a {guard.describe()}; the run was already "
                f"rescued {len(rescues)} times (config.spike_guard.max_rescues={guard.max_rescues}), so it stops "
                f"here. Earlier rescues: {rescues}. Last good checkpoint: {where}."
            )
        if good is None:
            guard.load_state_dict({"count": 0, "mean": 0.0, "var": 0.0})
            new_state = initial_state()
        else:
            new_state, *_ = restore(good)
        rescues.append(record)
        new_state = trainer.scale_lr(new_state, guard.lr_factor ** len(rescues))
        logging.warning("loss spike at step %d (loss %.4f, %s): restored step %d, skipped %d batches, "
                        "learning rate x%g; rescue %d of at most %d", step, loss, record["stats"], good or 0,
                        step - (good or 0), guard.lr_factor ** len(rescues), len(rescues), guard.max_rescues)
        return new_state, good or 0

    stop_at = min(int(config.train.num_steps), int(config.train.stop_at or config.train.num_steps))
    preemption = PreemptionWatch(multiprocess=nproc > 1)
    step, iteration = start, 0
    run_hooks(hooks_lib.StepInfo(step, state, None, step >= stop_at))
    meter.reset()
    try:
        while step < stop_at:
            iteration += 1
            t0 = time.perf_counter()
            local = next(train_iter)
            if batch_hook is not None:
                local = batch_hook(step + 1, local)
            batch = trainer.global_batch(local)
            meter.step(time.perf_counter() - t0)
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                state, metrics = trainer.train_step(state, batch)
            step += 1
            loss = float(jax.device_get(metrics["loss"])) if guard.enabled else None
            if guard.enabled and guard.is_spike(loss):
                state, step = rescue(step, loss)
                meter.reset()
            else:
                if guard.enabled:
                    guard.update(loss)
                run_hooks(hooks_lib.StepInfo(step, state, metrics, step == stop_at))
                faults.reached("after_step", step)
            # Every process asks at every iteration (rescues included), as JAX's preemption sync requires.
            if preemption.reached(iteration):
                if step not in ckpt.all_steps():
                    save(step, state)
                summary["preempted_at"] = step
                logging.warning("preemption notice: saved step %d to %s; rerun the same command to resume",
                                step, ckpt.directory)
                break
    finally:
        profiler.stop()
        preemption.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
    summary["end_step"] = step
    return summary
