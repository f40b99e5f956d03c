"""Cost of the continued stage's train step: the memory task in bank and online mode vs the warm-up (LM) step of
the same model, batch and sequence, measured side by side in one run.

    python tools/bench/stage2_step.py                       # the ~100M bench model (train_step_mfu.py's), seq 512
    python tools/bench/stage2_step.py --model=demo          # configs/demo.py's model, batch 16 x 256

Every variant is the real `Trainer` (value_and_grad + AdamW + clipping, the task's loss) on one device, fed a
synthetic batch of its task's schema: the paper layout (every 64-token chunk retrieves one reference and reads its
own and the previous 4 chunks'), memory geometry of the config (first half of the layers, all KV heads, k = 8,
128-token references, a 4-token sink). Bank mode decodes random bf16 codes on device; online mode encodes random
128-token references through the memory layers in the step, with stop_gradient (the default) and with gradients
through the encoding. Printed: each step's best time of `--steps` and its ratio to the warm-up step. Targets:
bank <= 1.2x, online <= 1.6x (the paper's online step cost a bit over 2x).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from configs import demo
from m3jax.config import base_config
from m3jax.memory.codecs import get_codec
from m3jax.parallel import make_mesh
from m3jax.train.step import Trainer
from m3jax.train.tasks import LmTask, MemoryTask

_MODEL = flags.DEFINE_enum("model", "bench100m", ["bench100m", "demo"], "the model and batch shape")
_SEQ = flags.DEFINE_integer("seq", 0, "sequence length (0 = the model's default: 512 / 256)")
_BATCH = flags.DEFINE_integer("batch", 0, "global batch (0 = the model's default: 4 / 16)")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per variant, after one compile step")


def model_config():
    if _MODEL.value == "demo":
        c = demo.get_config()
        c.model.vocab_size = 4096
        seq, batch = 256, 16
    else:
        c = base_config()
        c.model.update(vocab_size=32000, vocab_multiple=128, num_layers=8, hidden_size=1024, num_heads=16,
                       num_kv_heads=16, head_dim=64, mlp_dim=2816, dtype="float32")
        seq, batch = 512, 4
    c.data.update(seq_len=_SEQ.value or seq, global_batch_size=_BATCH.value or batch)
    c.train.num_steps = 1000
    c.mesh.update(data=1, fsdp=1, tensor=1)
    return c


def synthetic_batch(task, rng) -> dict[str, np.ndarray]:
    """A batch of `task`'s schema: random tokens in one segment per row, the paper layout's memory slots."""
    c = task.config
    b, t = int(c.data.global_batch_size), int(c.data.seq_len)
    batch = {"inputs": rng.integers(3, c.model.vocab_size, (b, t)), "targets": rng.integers(3, c.model.vocab_size,
             (b, t)), "segment_ids": np.ones((b, t)), "positions": np.broadcast_to(np.arange(t), (b, t)),
             "loss_weights": np.ones((b, t))}
    if not isinstance(task, MemoryTask):
        return batch
    groups, slots, m = task.geometry()
    chunk = int(c.memory.chunk_size)
    used = -(-t // chunk)  # chunks of a full row; the loader's spare groups (document tails) stay empty
    g = np.arange(groups)[:, None]
    read = g - np.arange(slots)[None]  # chunk g reads the references of chunks g, g-1, ..., g-4
    index = np.where((read >= 0) & (g < used), read, -1)
    batch.update(positions=batch["positions"] + task.model_cfg.context_start(len(task.sink_tokens())),
                 memory_group=np.broadcast_to(np.arange(t) // chunk, (b, t)),
                 memory_index=np.broadcast_to(index, (b, groups, slots)),
                 memory_ids=np.broadcast_to(np.where(np.arange(m) < used, np.arange(m), -1), (b, m)))
    cfg = task.model_cfg
    if task.mode == "bank":
        row = (len(cfg.memory_layers), 2, len(cfg.memory_kv_heads), cfg.memory_k, cfg.head_dim)
        codes = get_codec(c.memory.bank_codec).encode(rng.normal(size=(b * m, *row)).astype(np.float32))
        batch.update({f"memory_codes/{k}": np.asarray(v).reshape(b, m, *v.shape[1:]) for k, v in codes.items()})
        batch["memory_valid"] = np.broadcast_to((np.arange(m) < used)[:, None], (b, m, cfg.memory_k))
    else:
        batch["memory_tokens"] = rng.integers(3, c.model.vocab_size, (b, m, cfg.memory_ref_len))
        batch["memory_lengths"] = np.full((b, m), cfg.memory_ref_len)
    return batch


def time_step(config, task) -> float:
    trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:1]), task)
    state = trainer.init_state()
    batch = trainer.global_batch(synthetic_batch(task, np.random.default_rng(0)))
    state, metrics = trainer.train_step(state, batch)  # compile
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - t0)
    assert np.isfinite(float(metrics["loss"])), metrics
    return best


def main(argv):
    del argv
    variants = {}
    warmup = model_config()
    variants["warm-up step (LM task)"] = (warmup, LmTask(warmup))
    for name, mode, grad in (("bank mode", "bank", False), ("online mode, stop_gradient", "online", False),
                             ("online mode, gradients through the encoding", "online", True)):
        c = model_config()
        c.memory.read = True
        c.retrieval.update(mode=mode, layout="paper", refs_per_chunk=1)
        c.memory.encode_grad = grad
        task = MemoryTask(c)
        task.stand_in_sink()
        variants[name] = (c, task)
    c = warmup
    print(f"model {_MODEL.value}: {c.model.num_layers} layers x {c.model.hidden_size}, batch "
          f"{c.data.global_batch_size} x {c.data.seq_len}, {c.model.dtype}, {jax.devices()[0].platform}")
    times = {name: time_step(config, task) for name, (config, task) in variants.items()}
    base = times["warm-up step (LM task)"]
    for name, t in times.items():
        print(f"{name:46s} {t * 1e3:9.1f} ms   {t / base:5.2f}x")


if __name__ == "__main__":
    app.run(main)
