"""The training loop: start-up checks, resume, the step loop, logging, held-out loss, checkpoints."""

from __future__ import annotations

import json
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


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training in `workdir`; returns a summary (first/last losses, held-out losses)."""
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
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state, _ = ckpt.restore(latest, trainer.abstract_state())
        # The iterator state counts this process's batches, which is the same number on every process (each
        # takes one local batch per global batch), so the one JSON copy that Orbax saves serves all of them.
        train_iter.set_state(data_state)
        logging.info("resumed from %s at step %d", ckpt.directory / str(latest), latest)
    elif config.init_from:
        params = ckpt_lib.load_params(config.init_from, trainer.abstract_state().params)
        state = trainer.state_from_params(params)
        logging.info("initialised parameters from %s", config.init_from)
    else:
        state = trainer.init_state()
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

    summary: dict = {"start_step": start, "losses": {}, "eval": {}}
    window_t0, window_tokens, data_wait = time.perf_counter(), 0.0, 0.0
    step = start
    if eval_batches and start == 0:
        summary["eval"][0] = _eval_loss(trainer, state.params, eval_batches)
        writer.write(0, {"loss": summary["eval"][0]}, prefix="eval")
    while step < stop_at:
        t0 = time.perf_counter()
        local = next(train_iter)
        data_wait += time.perf_counter() - t0
        state, metrics = trainer.train_step(state, trainer.global_batch(local))
        step += 1
        window_tokens += int(config.data.global_batch_size) * seq_len
        if step % int(config.train.log_every) == 0 or step == stop_at:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(f"non-finite loss {m['loss']} at step {step}")
            dt = time.perf_counter() - window_t0
            m["tokens_per_s"] = window_tokens / dt
            m["mfu"] = flops_lib.mfu(m["tokens_per_s"], flops_per_token, 1, total_peak)
            m["data_wait_frac"] = data_wait / dt
            writer.write(step, m)
            summary["losses"][step] = m["loss"]
            window_t0, window_tokens, data_wait = time.perf_counter(), 0.0, 0.0
        if eval_batches and (step % int(config.train.eval_every) == 0 or step == stop_at):
            loss = _eval_loss(trainer, state.params, eval_batches)
            writer.write(step, {"loss": loss}, prefix="eval")
            summary["eval"][step] = loss
            window_t0 = time.perf_counter()
        if step % int(config.train.checkpoint_every) == 0 or step == stop_at:
            ckpt.save(step, state, train_iter.get_state(), config_json)
    ckpt.wait()
    ckpt.close()
    writer.close()
    summary["end_step"] = step
    return summary
