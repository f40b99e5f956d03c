"""Device memory of context attention's forward + backward on one TPU chip: the XLA path vs Pallas splash attention,
compiled side by side for a TPU topology with libtpu (no TPU needed; `make venv-tpu`).

    python tools/bench/attention_memory.py [--topology=v5p:2x2x1 --seqs=2048,4096,8192 --heads=16 --kv_heads=8]

For each sequence length it compiles the gradient of a loss of the attention output (and of its log-sum-exp, for
the memory stage's exact merge) with respect to q, k and v, bf16, one sequence, on one chip of the topology, and
prints the compiler's temporary bytes: the XLA path keeps float32 probabilities of every query block over its keys
(~T²/2 per head), a flash kernel O(T) statistics. Pallas kernels are Mosaic custom calls, which XLA's cost analysis
does not count, so this benchmark reports memory, not FLOPs or time; time needs a TPU (tools/bench/train_step_mfu.py
--attention=splash).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from m3jax.model import attention as attn_lib
from m3jax.model import kernels
from m3jax.train import aot

_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "a TPU topology (its first chip is used)")
_SEQS = flags.DEFINE_list("seqs", ["2048", "4096", "8192"], "sequence lengths")
_HEADS = flags.DEFINE_integer("heads", 16, "query heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dimension")


def temp_bytes(device, fn, t: int) -> int:
    kv, g, d = _KV_HEADS.value, _HEADS.value // _KV_HEADS.value, _HEAD_DIM.value
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    args = (spec((1, kv, g, t, d)), spec((1, kv, t, d)), spec((1, kv, t, d)), spec((1, t), jnp.int32))
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def grad_of(attend, with_lse: bool):
    def loss(q, k, v, seg):
        if with_lse:
            out, lse = attend(q, k, v, seg)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.sin(lse))
        return jnp.sum(attend(q, k, v, seg).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))


def main(argv):
    del argv
    device = aot.tpu_devices(_TOPOLOGY.value)[0]
    splash = kernels.get("splash")

    def xla(q, k, v, seg, with_lse):
        mask = attn_lib.attention_mask(seg, seg)
        out, lse = attn_lib._context_attention(q, k, v, mask, True, attn_lib.CAUSAL_BLOCK_SIZE)
        return (out, lse) if with_lse else out

    print(f"context attention fwd+bwd on one {device.device_kind} chip ({_TOPOLOGY.value}), bf16, heads "
          f"{_HEADS.value}/{_KV_HEADS.value} kv, head_dim {_HEAD_DIM.value}: compiler temporaries")
    print(f"{'seq':>6} {'stage':<22} {'xla MiB':>9} {'splash MiB':>11} {'xla/splash':>10}")
    for t in map(int, _SEQS.value):
        for with_lse, stage in ((False, "warm-up (output)"), (True, "memory (output + LSE)")):
            a = temp_bytes(device, grad_of(lambda *x, w=with_lse: xla(*x, w), with_lse), t)
            b = temp_bytes(device, grad_of(lambda q, k, v, s, w=with_lse: kernels.context_attention(
                splash, q, k, v, s, with_lse=w), with_lse), t)
            print(f"{t:>6} {stage:<22} {a / 2**20:>9.1f} {b / 2**20:>11.1f} {a / max(b, 1):>9.1f}x")


if __name__ == "__main__":
    app.run(main)
