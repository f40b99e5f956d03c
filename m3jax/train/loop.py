"""The training loop: start-up checks, resume, the step loop, logging, held-out loss, checkpoints, the spike
guard, preemption and profiling."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from m3jax import checkpoint as ckpt_lib
from m3jax import parallel
from m3jax.config import validate
from m3jax.data import pipeline
from m3jax.data.records import read_metadata
from m3jax.model import ModelConfig
from m3jax.train import flops as flops_lib
from m3jax.train.guard import LossSpikeError, PreemptionWatch, SpikeGuard
from m3jax.train.metrics import MetricWriter
from m3jax.train.step import Trainer, abstract_model, param_count


def resolve_data_dependent(config: ml_collections.ConfigDict) -> dict | None:
    """Reads the data's metadata; fills `model.vocab_size = -1` from it and checks the vocabulary fits."""
    if not config.data.path:
        return None
    meta = read_metadata(config.data.path)
    with config.unlocked():
        if config.model.vocab_size == -1:
            config.model.vocab_size = int(meta["vocab_size"])
    if int(meta["seq_len"]) != config.data.seq_len:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} but {config.data.path} holds sequences of {meta['seq_len']}"
        )
    if config.model.vocab_size < meta["vocab_size"]:
        raise ValueError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the vocabulary "
            f"({meta['vocab_size']}) of the tokenizer that wrote {config.data.path}"
        )
    return meta


def describe_model(config: ml_collections.ConfigDict) -> dict:
    """Parameter counts and FLOPs per token, computed abstractly (nothing is allocated)."""
    model_cfg = ModelConfig.from_config(config.model)
    _, abstract_params, _ = abstract_model(model_cfg)
    counts = model_cfg.param_counts()
    allocated = param_count(abstract_params)
    if allocated != counts["total"]:
        raise AssertionError(f"analytic parameter count {counts['total']} != model's {allocated}")
    seq_len = int(config.data.seq_len)
    return {
        **{f"params_{k}": v for k, v in counts.items()},
        "seq_len": seq_len,
        "train_flops_per_token": flops_lib.train_flops_per_token(model_cfg, seq_len),
    }


def _eval_loss(trainer: Trainer, params, batches) -> float:
    nll, weight = 0.0, 0.0
    for batch in batches:
        out = jax.device_get(trainer.eval_step(params, trainer.global_batch(batch)))
        nll += float(out["nll_sum"])
        weight += float(out["weight"])
    return nll / max(weight, 1.0)


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: state saved on a preemption notice; rerun the same command to resume


class StepProfiler:
    """A jax.profiler trace of steps [train.profile_start, + train.profile_steps) into WORKDIR/profile.

    On a CPU host with libtpu installed, run with JAX_PLATFORMS=cpu: jax 0.10's profiler crashes there once the
    TPU plugin has been loaded into the process.
    """

    def __init__(self, train_cfg, workdir: str, process_index: int):
        self.first = int(train_cfg.profile_start)
        self.last = self.first + int(train_cfg.profile_steps) - 1
        self.enabled = self.first > 0 and (bool(train_cfg.profile_all_processes) or process_index == 0)
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before(self, step: int) -> None:
        """`step` is the step about to run."""
        if self.enabled and not self.active and step == self.first:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile of steps %d-%d written to %s", self.first, self.last, self.directory)


def train(config: ml_collections.ConfigDict, workdir: str, *, batch_hook=None) -> dict:
    """Runs (or resumes) training in `workdir`; returns a summary (losses, held-out losses, rescues, preemption).

    `batch_hook(step, local_batch) -> local_batch`, if given, sees every batch before it is trained on (the step
    it is for, counted from 1); tests inject faults with it.
    """
    parallel.initialize_distributed(config.distributed)
    meta = resolve_data_dependent(config)
    if meta is None:
        raise ValueError("config.data.path is empty: point it at a directory written by tools/prepare_data.py")
    validate(config, num_devices=jax.device_count())
    seq_len = int(config.data.seq_len)

    mesh = parallel.make_mesh(config.mesh)
    trainer = Trainer(config, mesh)
    proc, nproc = jax.process_index(), jax.process_count()
    logging.info("mesh %s on %d processes; model %s", dict(mesh.shape), nproc, trainer.model_cfg)

    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=int(config.train.keep_checkpoints),
        async_save=bool(config.train.async_checkpointing),
    )
    train_iter = pipeline.make_lm_iterator(
        config.data.path, config.data.train_split, global_batch_size=int(config.data.global_batch_size),
        seed=int(config.data.shuffle_seed), process_index=proc, process_count=nproc,
        worker_count=int(config.data.worker_count), prefetch=int(config.data.prefetch),
    )
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
        state, data_state, _, loop_state = ckpt.restore(step, trainer.abstract_state())
        if "guard" in loop_state:
            guard.load_state_dict(loop_state["guard"])
        return state, data_state, loop_state.get("rescues", [])

    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state, rescues = restore(latest)
        # The iterator state counts this process's batches, which is the same number on every process (each
        # takes one local batch per global batch), so the one JSON copy that Orbax saves serves all of them.
        train_iter.set_state(data_state)
        logging.info("resumed from %s at step %d", ckpt.directory / str(latest), latest)
    else:
        state = initial_state()
    start = int(jax.device_get(state.step))

    eval_batches = []
    if config.train.eval_every and config.data.eval_split in meta["splits"]:
        eval_batches = list(pipeline.make_eval_batches(
            config.data.path, config.data.eval_split, global_batch_size=int(config.data.global_batch_size),
            num_batches=int(config.train.eval_batches), process_index=proc, process_count=nproc,
        ))

    writer = MetricWriter(workdir)
    flops_per_token = flops_lib.train_flops_per_token(trainer.model_cfg, seq_len)
    peak = flops_lib.device_peak_flops()
    # On CPU the measured matmul already uses every core of a process; accelerators count per device.
    total_peak = peak * (nproc if jax.devices()[0].platform == "cpu" else jax.device_count())
    config_json = json.loads(config.to_json_best_effort())
    stop_at = min(int(config.train.num_steps), int(config.train.stop_at or config.train.num_steps))

    def save(step: int) -> None:
        loop_state = {"guard": guard.state_dict(), "rescues": rescues}
        ckpt.save(step, state, train_iter.get_state(), config_json, loop_state)

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
            new_state, _, _ = restore(good)
        rescues.append(record)
        new_state = trainer.scale_lr(new_state, guard.lr_factor ** len(rescues))
        logging.warning("loss spike at step %d (loss %.4f, %s): restored step %d, skipped %d batches, "
                        "learning rate x%g; rescue %d of at most %d", step, loss, record["stats"], good or 0,
                        step - (good or 0), guard.lr_factor ** len(rescues), len(rescues), guard.max_rescues)
        return new_state, good or 0

    summary: dict = {"start_step": start, "losses": {}, "eval": {}, "rescues": rescues, "preempted_at": None}
    preemption = PreemptionWatch(multiprocess=nproc > 1)
    profiler = StepProfiler(config.train, workdir, proc)
    window_t0, window_steps, data_wait = time.perf_counter(), 0, 0.0
    step, iteration = start, 0
    if eval_batches and start == 0:
        summary["eval"][0] = _eval_loss(trainer, state.params, eval_batches)
        writer.write(0, {"loss": summary["eval"][0]}, prefix="eval")
    try:
        while step < stop_at:
            iteration += 1
            profiler.before(step + 1)
            t0 = time.perf_counter()
            local = next(train_iter)
            if batch_hook is not None:
                local = batch_hook(step + 1, local)
            batch = trainer.global_batch(local)
            data_wait += time.perf_counter() - t0
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                state, metrics = trainer.train_step(state, batch)
            step += 1
            window_steps += 1
            profiler.after(step, metrics)
            loss = float(jax.device_get(metrics["loss"])) if guard.enabled else None
            if guard.enabled and guard.is_spike(loss):
                state, step = rescue(step, loss)
                window_t0, window_steps, data_wait = time.perf_counter(), 0, 0.0
            else:
                if guard.enabled:
                    guard.update(loss)
                if step % int(config.train.log_every) == 0 or step == stop_at:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not np.isfinite(m["loss"]):
                        raise FloatingPointError(f"non-finite loss {m['loss']} at step {step}")
                    dt = time.perf_counter() - window_t0
                    m["tokens_per_s"] = window_steps * int(config.data.global_batch_size) * seq_len / dt
                    m["mfu"] = flops_lib.mfu(m["tokens_per_s"], flops_per_token, 1, total_peak)
                    # Per step: wall time, time blocked on the data pipeline, and the rest (dispatch + compute).
                    m["step_time_s"] = dt / window_steps
                    m["data_wait_s"] = data_wait / window_steps
                    m["compute_s"] = m["step_time_s"] - m["data_wait_s"]
                    m["data_wait_frac"] = data_wait / dt
                    writer.write(step, m)
                    summary["losses"][step] = m["loss"]
                    window_t0, window_steps, data_wait = time.perf_counter(), 0, 0.0
                if eval_batches and (step % int(config.train.eval_every) == 0 or step == stop_at):
                    t_eval = time.perf_counter()
                    loss = _eval_loss(trainer, state.params, eval_batches)
                    writer.write(step, {"loss": loss}, prefix="eval")
                    summary["eval"][step] = loss
                    window_t0 += time.perf_counter() - t_eval  # held-out time is not training time
                if step % int(config.train.checkpoint_every) == 0 or step == stop_at:
                    save(step)
            # Every process asks at every iteration (rescues included), as JAX's preemption sync requires.
            if preemption.reached(iteration):
                if step not in ckpt.all_steps():
                    save(step)
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
