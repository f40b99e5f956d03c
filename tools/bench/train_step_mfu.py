"""Train-step MFU of the m3jax model vs a naive jnp Transformer of the same shape, measured in one run.

    python tools/bench/train_step_mfu.py [--layers=8 --hidden=1024 --seq=512 --batch=8 --steps=3] [--breakdown]
    python tools/bench/train_step_mfu.py --dtype=bfloat16 ...   # on a GPU/TPU: MFU against the chip's bf16 peak
    python tools/bench/train_step_mfu.py --dtype=bfloat16 --attention=pallas_gpu ...   # a fused kernel (GPU)

Both steps are timed on the same machine, back to back; MFU uses the one FLOPs formula (m3jax.train.flops)
against the best float32 2048³ matmul rate measured in this process, so the ratio cannot move by changing the
baseline. The naive baseline: scanned layers, `jax.nn.dot_product_attention`, plain SGD, full multi-head
attention with the same FLOPs shape. This ~100M config is the reference later benchmarks compare against.

`--breakdown` also times each step's parts as separate jitted functions: the forward (loss), the forward +
backward (gradients) and the parameter update (AdamW + clipping for m3jax, SGD for the baseline). The parts
need not add up to the step: on their own they allocate fresh outputs where the step reuses its donated state,
and the step overlaps and fuses across their boundaries.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from m3jax import parallel
from m3jax.config import base_config
from m3jax.model import ModelConfig
from m3jax.parallel import make_mesh
from m3jax.train import flops as flops_lib
from m3jax.train.step import Trainer

_LAYERS = flags.DEFINE_integer("layers", 8, "layers")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "hidden size")
_HEADS = flags.DEFINE_integer("heads", 16, "query heads (head_dim = hidden / heads)")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 16, "KV heads of the m3jax model")
_MLP = flags.DEFINE_integer("mlp", 2816, "gated MLP width")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "vocabulary")
_SEQ = flags.DEFINE_integer("seq", 512, "sequence length")
_BATCH = flags.DEFINE_integer("batch", 8, "batch size")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per model (after one compile step)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype of both models")
_ATTENTION = flags.DEFINE_enum("attention", "xla", ["xla", "splash", "pallas_gpu"],
                                "m3jax's context attention (config.model.attention): splash on TPU, pallas_gpu on GPU")
_CHUNK = flags.DEFINE_integer("loss_chunk", 512, "m3jax's config.loss.chunk_size (0 = the whole sequence at once)")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "also time forward, forward+backward and update separately")


def bench_config():
    c = base_config()
    c.model.update(vocab_size=_VOCAB.value, vocab_multiple=128, num_layers=_LAYERS.value, hidden_size=_HIDDEN.value,
                   num_heads=_HEADS.value, num_kv_heads=_KV_HEADS.value, head_dim=_HIDDEN.value // _HEADS.value,
                   mlp_dim=_MLP.value, dtype=_DTYPE.value, attention=_ATTENTION.value)
    c.loss.chunk_size = _CHUNK.value
    c.data.seq_len, c.data.global_batch_size = _SEQ.value, _BATCH.value
    c.train.num_steps = 1000
    c.mesh.update(data=1, fsdp=1, tensor=1)
    return c


def naive_step_fn(cfg: ModelConfig):
    """A plain jnp Transformer train step of the same shapes: the baseline the ratio is measured against."""
    d, h, hd, f, v = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.padded_vocab_size
    kv = cfg.num_kv_heads

    def init(key):
        ks = jax.random.split(key, 9)
        n = cfg.num_layers
        norm = lambda k, *s: 0.02 * jax.random.normal(k, s, jnp.float32)  # noqa: E731
        return {
            "embed": norm(ks[0], v, d), "head": norm(ks[1], d, v),
            "wq": norm(ks[2], n, d, h * hd), "wk": norm(ks[3], n, d, kv * hd), "wv": norm(ks[4], n, d, kv * hd),
            "wo": norm(ks[5], n, h * hd, d), "w1": norm(ks[6], n, d, f), "w3": norm(ks[7], n, d, f),
            "w2": norm(ks[8], n, f, d),
        }

    def rms(x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5)

    def loss(p, tokens, targets):
        p = jax.tree.map(lambda a: a.astype(cfg.dtype), p)  # float32 master weights, compute in cfg.dtype
        x = p["embed"][tokens]
        b, t = tokens.shape

        def layer(x, w):
            y = rms(x)
            q = (y @ w["wq"]).reshape(b, t, h, hd)
            k = (y @ w["wk"]).reshape(b, t, kv, hd)
            vv = (y @ w["wv"]).reshape(b, t, kv, hd)
            a = jax.nn.dot_product_attention(q, k, vv, is_causal=True).reshape(b, t, h * hd)
            x = x + a @ w["wo"]
            y = rms(x)
            return x + (jax.nn.silu(y @ w["w1"]) * (y @ w["w3"])) @ w["w2"], None

        layers = {k: p[k] for k in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")}
        x, _ = jax.lax.scan(layer, x, layers)
        logits = rms(x) @ p["head"]
        logits = logits.astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])

    def sgd(p, g):
        return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)

    @jax.jit
    def step(p, tokens, targets):
        value, g = jax.value_and_grad(loss)(p, tokens, targets)
        return sgd(p, g), value

    return init, step, loss, sgd


def parts(loss, update, params, grad_args, update_args):
    """Best times of the forward, forward + backward and update of one step, each jitted on its own."""
    fwd, grads, upd = jax.jit(loss), jax.jit(jax.grad(loss)), jax.jit(update)
    g = grads(params, *grad_args)
    return {
        "forward": time_steps(lambda: jax.block_until_ready(fwd(params, *grad_args)), _STEPS.value),
        "forward+backward": time_steps(lambda: jax.block_until_ready(grads(params, *grad_args)), _STEPS.value),
        "update": time_steps(lambda: jax.block_until_ready(upd(*update_args(g))), _STEPS.value),
    }


def breakdown(trainer, state, gbatch, naive_loss, naive_sgd, naive_params, naive_args):
    """Prints the per-part times of both steps (see the module docstring)."""

    def ours_loss(params, batch):
        with parallel.axis_rules(trainer.rules):
            return trainer.loss(params, batch)[0]

    def ours_update(params, opt_state, grads):
        updates, opt_state = trainer.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    with jax.set_mesh(trainer.mesh):
        ours = parts(ours_loss, ours_update, state.params, (gbatch,), lambda g: (state.params, state.opt_state, g))
    naive = parts(naive_loss, naive_sgd, naive_params, naive_args, lambda g: (naive_params, g))
    for name in ours:
        print(f"  {name:17s} m3jax {ours[name]:7.3f} s   naive {naive[name]:7.3f} s")


def time_steps(run, steps: int) -> float:
    run()  # compile + one warm step
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv):
    del argv
    config = bench_config()
    trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    cfg = trainer.model_cfg
    b, t = _BATCH.value, _SEQ.value
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    batch = {
        "inputs": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": np.ones((b, t), np.int32),
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_weights": np.ones((b, t), np.int32),
    }
    holder = {"state": trainer.init_state()}
    gbatch = trainer.global_batch(batch)

    def ours():
        holder["state"], m = trainer.train_step(holder["state"], gbatch)
        jax.block_until_ready(m)

    init, naive, naive_loss, naive_sgd = naive_step_fn(cfg)
    naive_holder = {"p": init(jax.random.key(0))}
    jt, jy = jnp.asarray(tokens), jnp.asarray(batch["targets"])

    def baseline():
        naive_holder["p"], value = naive(naive_holder["p"], jt, jy)
        jax.block_until_ready(value)

    on_cpu = jax.devices()[0].platform == "cpu"
    # CPU: the best float32 matmul measured here, before and after; accelerators: the chip's bf16 peak (table).
    peak = flops_lib.measure_matmul_flops() if on_cpu else flops_lib.device_peak_flops()
    fpt = flops_lib.train_flops_per_token(cfg, t)
    t_ours = time_steps(ours, _STEPS.value)
    t_naive = time_steps(baseline, _STEPS.value)
    if on_cpu:
        peak = max(peak, flops_lib.measure_matmul_flops())  # re-measured after, best of both
    mfu_ours = flops_lib.mfu(b * t / t_ours, fpt, 1, peak)
    mfu_naive = flops_lib.mfu(b * t / t_naive, fpt, 1, peak)
    counts = cfg.param_counts()
    print(f"config: layers={cfg.num_layers} hidden={cfg.hidden_size} heads={cfg.num_heads}/{cfg.num_kv_heads} "
          f"mlp={cfg.mlp_dim} vocab={cfg.vocab_size} seq={t} batch={b}; matmul params {counts['matmul'] / 1e6:.1f}M, "
          f"total {counts['total'] / 1e6:.1f}M; {fpt / 1e9:.3f} GFLOP/token")
    kind = "float32 2048^3 matmul, measured" if on_cpu else f"{jax.devices()[0].device_kind} bf16 peak, table"
    print(f"peak ({kind}): {peak / 1e9:.1f} GFLOP/s; compute dtype {_DTYPE.value}")
    print(f"m3jax train step (AdamW, clip): {t_ours:.3f} s/step  MFU {mfu_ours:.1%}")
    print(f"naive jnp step (SGD):           {t_naive:.3f} s/step  MFU {mfu_naive:.1%}")
    print(f"ratio m3jax/naive MFU: {mfu_ours / mfu_naive:.3f}")
    if _BREAKDOWN.value:
        print("per part (best of --steps, each part jitted on its own):")
        breakdown(trainer, holder["state"], gbatch, naive_loss, naive_sgd, naive_holder["p"], (jt, jy))


if __name__ == "__main__":
    app.run(main)
