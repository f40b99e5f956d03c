"""Cost of reading explicit memory: forward and train step with memory heads vs the plain (stage-1) model.

    python tools/bench/memory_overhead.py [--seq=2048 --batch=1 --steps=2 --dtype=float32] [--layout=paper|plain]

Same ~100M config as train_step_mfu.py (8 layers x 1024, 16 heads, MLP 2816, vocab 32000), one run, the two
models timed back to back on the same parameters and tokens. The memory model: the first half of the layers are
memory layers, all KV heads are memory heads, k = 8 tokens per memory per head, a 4-token sink, 5 memories per
64-token chunk. `--layout=paper` is Memory3's training layout (each chunk retrieves one reference and reads its
own and the previous 4 chunks': one unique memory per chunk); `plain` gives every chunk 5 memories of its own.
The train step is value_and_grad + AdamW for both. Printed: each absolute time (so a slower baseline cannot
flatter the ratio) and the ratios; the target is <= 1.15x for both. The memory heads' extra FLOPs are printed
beside (Memory3 counts reading memory at 0.23% of the FLOPs).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from m3jax.model import ModelConfig, Transformer
from m3jax.model.memory import Memory
from m3jax.train.flops import train_flops_per_token

_SEQ = flags.DEFINE_integer("seq", 2048, "sequence length")
_BATCH = flags.DEFINE_integer("batch", 1, "batch size")
_STEPS = flags.DEFINE_integer("steps", 2, "timed repetitions (best is reported), after one warm-up")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_LAYOUT = flags.DEFINE_enum("layout", "paper", ["paper", "plain"], "which memories each chunk reads")
_LAYERS = flags.DEFINE_integer("layers", 8, "layers")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "hidden size (head_dim = hidden / 16)")

CHUNK, SLOTS, K, SINK = 64, 5, 8, 4


def best_time(fn, steps: int) -> float:
    jax.block_until_ready(fn())  # compile + warm
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def make_memory(cfg: ModelConfig, b: int, t: int, layout: str, rng) -> tuple[Memory, np.ndarray]:
    groups = -(-t // CHUNK)
    g = np.arange(groups)
    if layout == "paper":  # chunk g reads the references retrieved by chunks g, g-1, ..., g-4
        index = g[:, None] - np.arange(SLOTS)[None]
        index = np.where(index >= 0, index, -1)
        num_memories = groups
    else:
        index = g[:, None] * SLOTS + np.arange(SLOTS)[None]
        num_memories = groups * SLOTS
    shape = (len(cfg.memory_layers), b, num_memories, len(cfg.memory_kv_heads), K, cfg.head_dim)
    memory = Memory(
        keys=jnp.asarray(rng.normal(size=shape), cfg.compute_dtype),
        values=jnp.asarray(rng.normal(size=shape), cfg.compute_dtype),
        index=jnp.asarray(np.broadcast_to(index, (b, groups, SLOTS)), jnp.int32),
        valid=jnp.ones((b, num_memories, K), bool),
        sink_tokens=jnp.arange(2, 2 + SINK, dtype=jnp.int32),
    )
    group = np.broadcast_to(np.arange(t) // CHUNK, (b, t)).astype(np.int32)
    return memory, group


def main(argv):
    del argv
    b, t = _BATCH.value, _SEQ.value
    d = _HIDDEN.value
    base = dict(vocab_size=32000, num_layers=_LAYERS.value, hidden_size=d, num_heads=16, num_kv_heads=16,
                head_dim=d // 16, mlp_dim=2816 * d // 1024, dtype=_DTYPE.value)
    plain_cfg = ModelConfig(**base)
    mem_cfg = ModelConfig(**base, memory_layers=tuple(range(_LAYERS.value // 2)), memory_kv_heads=tuple(range(16)),
                          memory_chunk_size=CHUNK)
    with nnx.use_eager_sharding(False):
        graphdef_plain, params = nnx.split(Transformer(plain_cfg, rngs=nnx.Rngs(0)))
        graphdef_mem, _ = nnx.split(Transformer(mem_cfg, rngs=nnx.Rngs(0)))  # the same parameters
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 32000, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(SINK + 128, SINK + 128 + t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    memory, group = make_memory(mem_cfg, b, t, _LAYOUT.value, rng)
    group = jnp.asarray(group)

    def loss(graphdef, params, memory):
        model = nnx.merge(graphdef, params)
        args = (tokens, positions, seg) if memory is None else (tokens, positions, seg, group, memory)
        logits = model(*args)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    opt = optax.adamw(1e-4, weight_decay=0.1)
    opt_state = opt.init(params)

    def make(graphdef, memory):
        fwd = jax.jit(lambda p, m: loss(graphdef, p, m))

        @jax.jit
        def step(p, s, m):
            value, grads = jax.value_and_grad(lambda p: loss(graphdef, p, m))(p)
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s, value

        return (lambda: fwd(params, memory)), (lambda: step(params, opt_state, memory))

    fwd_plain, step_plain = make(graphdef_plain, None)
    fwd_mem, step_mem = make(graphdef_mem, memory)
    times = {
        "forward plain": best_time(fwd_plain, _STEPS.value),
        "forward memory": best_time(fwd_mem, _STEPS.value),
        "train step plain": best_time(step_plain, _STEPS.value),
        "train step memory": best_time(step_mem, _STEPS.value),
    }
    # Extra model FLOPs of the memory heads per token: QK^T and PV over S·k keys in the memory layers (fwd+bwd = 3x).
    extra = 3 * 2 * 2 * len(mem_cfg.memory_layers) * 16 * mem_cfg.head_dim * SLOTS * K
    share = extra / train_flops_per_token(plain_cfg, t)
    print(f"device: {jax.devices()[0].device_kind}; config: layers={_LAYERS.value} hidden={d} heads=16 seq={t} "
          f"batch={b} dtype={_DTYPE.value}; memory: layers 0-{_LAYERS.value // 2 - 1}, all KV heads, k={K}, "
          f"{SLOTS} per {CHUNK}-token chunk, layout={_LAYOUT.value}, {memory.keys.shape[2]} unique memories per row")
    for name, sec in times.items():
        print(f"  {name:18s} {sec:8.3f} s")
    print(f"ratio forward memory/plain:    {times['forward memory'] / times['forward plain']:.3f}  (target <= 1.15)")
    print(f"ratio train step memory/plain: {times['train step memory'] / times['train step plain']:.3f}  "
          f"(target <= 1.15)")
    print(f"memory reading FLOPs: {share:.2%} of a training step's model FLOPs (Memory3 reports 0.23%)")


if __name__ == "__main__":
    app.run(main)
