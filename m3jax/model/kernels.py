"""Fused (Pallas) attention kernels for the context part of attention, chosen by `config.model.attention`.

    auto        splash on TPU, xla elsewhere (the default)
    xla         the reference: `m3jax.model.attention.attention_core` (logits materialised per query block)
    splash      TPU: Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention)
    pallas_gpu  GPU: the Pallas (Triton) flash attention of jax.experimental.pallas.ops.gpu.attention

`resolve` turns the setting into what a job on a given platform runs (`ModelConfig.from_config` does it for every
job). A sequence a kernel does not take (splash: a multiple of 128; e.g. a prompt being prefilled) runs the XLA
path; a training job checks its `data.seq_len` up front (`m3jax.train.step.Trainer`).

A kernel computes causal attention within packed segments (query i sees key j <= i of its own segment; padding,
segment 0, sees padding) in the head-major layout of `m3jax.model.attention`: q [b, kv, g, t, d], k, v
[b, kv, t, d], segment_ids [b, t]. It never materialises the [t, t] logits.

Memory attention must stay exact (docs/memory.md): the context part returns its log-sum-exp and the sink and
memory parts merge with it by LSE, and the merge is differentiated through the LSE. Neither library kernel
differentiates its LSE output, so `attention_with_lse` adds that term itself, from the kernels' own public forward
and backward, without approximation. With d_lse the cotangent of the LSE, the logits' cotangent gains
P_ij · d_lse_i, which is
    dq_i += scale · d_lse_i · (P k)_i        dk_j += scale · (Pᵀ (d_lse ⊙ q))_j.
Both come from one call each on KV heads doubled: the forward attends with values [v | k] (the second half
returns P k), the backward runs the kernel's VJP with values [v | 0] and cotangent [d_out | scale · d_lse ⊙ q]
(the second half's value gradient is Pᵀ(scale · d_lse ⊙ q); its query and key gradients are exactly zero).
Cost: the memory stage's context attention does twice the work of a plain flash attention forward and backward,
still without the [t, t] logits; the warm-up stage (no memory) calls the kernel alone.

`interpret=True` runs a kernel in Pallas's interpreter (CPU tests); on an accelerator it must be False.
Under a mesh, the kernel runs per shard (`jax.shard_map` over batch and KV heads, as the logical axis rules shard
them; the sequence must not be sharded).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from m3jax.parallel import active_rules, logical_to_spec

KERNEL_PLATFORMS = {"splash": "tpu", "pallas_gpu": "gpu"}  # the platform each fused kernel runs on
IMPLEMENTATIONS = ("auto", "xla", *KERNEL_PLATFORMS)  # auto: splash on TPU, xla elsewhere
SEQ_MULTIPLES = {"splash": 128, "pallas_gpu": 16}  # a kernel's sequence must be a multiple of this
SPLASH_HEAD_DIM_MULTIPLE = 128  # TPU lanes: head_dim is zero-padded to a multiple of this (exact: adds 0 to q·k)
SPLASH_MAX_BLOCK = 512
GPU_MAX_BLOCK = 128


def _block(t: int, largest: int, what: str, smallest: int) -> int:
    """The largest power-of-two block <= `largest` dividing `t`; at least `smallest`."""
    block = largest
    while block > 1 and t % block:
        block //= 2
    if block < smallest:
        raise ValueError(f"{what} needs a sequence length that is a multiple of {smallest}, got {t} "
                         f"(data.seq_len; or config.model.attention='xla')")
    return block


@dataclasses.dataclass(frozen=True)
class FusedAttention:
    """One fused attention kernel (hashable: a static argument of the custom VJP)."""

    impl: str
    interpret: bool = False

    def __post_init__(self):
        if self.impl not in KERNEL_PLATFORMS:
            raise ValueError(f"unknown fused attention {self.impl!r}: expected one of {tuple(KERNEL_PLATFORMS)}")

    def supports(self, seq_len: int) -> bool:
        """Whether the kernel takes a sequence of `seq_len` positions (else the caller uses the XLA path)."""
        return seq_len % SEQ_MULTIPLES[self.impl] == 0

    def __call__(self, q, k, v, segment_ids, *, with_lse: bool):
        """out [b, kv, g, t, d] in q's dtype, and with `with_lse` the natural-log LSE [b, kv, g, t] float32."""
        fn = _splash if self.impl == "splash" else _pallas_gpu
        return fn(q, k, v, segment_ids, with_lse=with_lse, interpret=self.interpret)


def resolve(requested: str, platform: str, interpret: bool = False, *, fallback: bool = False) -> str:
    """The attention a job on `platform` ("cpu", "gpu", "tpu") runs for `config.model.attention=requested`.

    "auto" is splash on TPU and the XLA path elsewhere. An explicit kernel on another platform is an error naming
    the key (a training job would silently run slower), unless it runs in the interpreter, or with `fallback` (an
    evaluation of a checkpoint trained elsewhere: the XLA path computes the same attention)."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={requested!r}: expected one of {IMPLEMENTATIONS}")
    if requested == "auto":
        return "splash" if platform == "tpu" else "xla"
    if requested == "xla" or interpret or KERNEL_PLATFORMS[requested] == platform:
        return requested
    if fallback:
        return "xla"
    raise ValueError(f"config.model.attention={requested!r} is a {KERNEL_PLATFORMS[requested].upper()} kernel, but "
                     f"this job runs on {platform}: use 'auto' (splash on TPU, xla elsewhere), 'xla', or the "
                     f"kernel of {platform}")


def get(impl: str, interpret: bool = False) -> FusedAttention | None:
    """The kernel for a resolved `config.model.attention` (None for the XLA reference; "auto" is resolved for
    this process's default backend)."""
    impl = resolve(impl, jax.default_backend(), interpret, fallback=True) if impl == "auto" else impl
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"config.model.attention={impl!r}: expected one of {IMPLEMENTATIONS}")
    return None if impl == "xla" else FusedAttention(impl, bool(interpret))


# ------------------------------------------------------------------------------------------------ TPU: splash
def _splash_kernel(t: int, group: int, with_lse: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bq = _block(t, SPLASH_MAX_BLOCK, "splash attention", SEQ_MULTIPLES["splash"])
    sizes = sk.BlockSizes(block_q=bq, block_kv=bq, block_kv_compute=bq, block_q_dkv=bq, block_kv_dkv=bq,
                          block_kv_dkv_compute=bq, block_q_dq=bq, block_kv_dq=bq)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(group)])
    # GQA: one multi-query kernel per KV head (its `group` query heads share that head's key/values). Made anew at
    # each trace (its mask tables become that program's constants; cheap for a causal mask).
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, save_residuals=with_lse, interpret=interpret)


def _splash(q, k, v, segment_ids, *, with_lse: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, kv, g, t, d = q.shape
    pad = -d % SPLASH_HEAD_DIM_MULTIPLE
    scale = d ** -0.5
    q = (q * jnp.asarray(scale, q.dtype))
    if pad:
        q, k, v = (jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]) for a in (q, k, v))
    kernel = _splash_kernel(t, g, with_lse, interpret)

    def one(q, k, v, seg):  # q [g, t, d'], k, v [t, d'], seg [t]
        return kernel(q, k, v, sk.SegmentIds(q=seg, kv=seg))

    out = jax.vmap(jax.vmap(one, (0, 0, 0, None)), (0, 0, 0, 0))(q, k, v, segment_ids.astype(jnp.int32))
    if with_lse:
        out, (lse,) = out
        return out[..., :d], lse.astype(jnp.float32)
    return out[..., :d]


# ------------------------------------------------------------------------------------------------ GPU: Pallas/Triton
def _pallas_gpu(q, k, v, segment_ids, *, with_lse: bool, interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, kv, g, t, d = q.shape
    bq = _block(t, GPU_MAX_BLOCK, "pallas_gpu attention", SEQ_MULTIPLES["pallas_gpu"])
    bb = min(bq, 32)
    sizes = gpu_attention.BlockSizes(block_q=bq, block_k=bq, block_q_dkv=bb, block_kv_dkv=bb, block_q_dq=bb,
                                     block_kv_dq=bb)
    # The kernel takes [b, t, heads, d] with one key/value head per query head: GQA repeats them (their
    # gradients sum back over the group).
    qs = q.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)
    ks, vs = (jnp.repeat(a.transpose(0, 2, 1, 3), g, axis=2) for a in (k, v))
    out = gpu_attention.mha(qs, ks, vs, segment_ids.astype(jnp.int32), sm_scale=d ** -0.5, causal=True,
                            block_sizes=sizes, interpret=interpret, return_residuals=with_lse)
    lse = None
    if with_lse:
        out, lse = out  # [b, heads, t], base 2
        lse = (lse.astype(jnp.float32) * math.log(2.0)).reshape(b, kv, g, t)
    out = out.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)
    return (out, lse) if with_lse else out


# ------------------------------------------------------------------------------------------------ exact LSE VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_with_lse(kernel: FusedAttention, q, k, v, segment_ids):
    return kernel(q, k, v, segment_ids, with_lse=True)


def _with_lse_fwd(kernel, q, k, v, segment_ids):
    kv = k.shape[1]
    out2, lse2 = kernel(jnp.concatenate([q, q], 1), jnp.concatenate([k, k], 1), jnp.concatenate([v, k], 1),
                        segment_ids, with_lse=True)
    out, pk = out2[:, :kv], out2[:, kv:]
    return (out, lse2[:, :kv]), (q, k, v, segment_ids, pk)


def _with_lse_bwd(kernel, res, cotangents):
    q, k, v, segment_ids, pk = res
    d_out, d_lse = cotangents
    kv, scale = k.shape[1], q.shape[-1] ** -0.5
    d_lse = d_lse.astype(jnp.float32)[..., None]
    extra = (scale * d_lse * q.astype(jnp.float32)).astype(q.dtype)

    def attend(q2, k2, v2):
        return kernel(q2, k2, v2, segment_ids, with_lse=False)

    _, vjp = jax.vjp(attend, jnp.concatenate([q, q], 1), jnp.concatenate([k, k], 1),
                     jnp.concatenate([v, jnp.zeros_like(k)], 1))
    dq2, dk2, dv2 = vjp(jnp.concatenate([d_out.astype(q.dtype), extra], 1))
    dq = dq2[:, :kv] + dq2[:, kv:] + (scale * d_lse * pk.astype(jnp.float32)).astype(dq2.dtype)
    dk = dk2[:, :kv] + dk2[:, kv:] + dv2[:, kv:]
    return dq, dk, dv2[:, :kv], None


_attention_with_lse.defvjp(_with_lse_fwd, _with_lse_bwd)


# ------------------------------------------------------------------------------------------------ entry point
def _local_specs(shapes: dict[str, tuple[int, ...]], logical: dict[str, tuple], rules, mesh):
    """PartitionSpecs for shard_map from logical axes, dropping a mesh axis that does not divide its dimension."""
    sizes = dict(mesh.shape)
    specs = {}
    for name, axes in logical.items():
        spec = list(logical_to_spec(axes, rules))
        for i, entry in enumerate(spec):
            names = (entry,) if isinstance(entry, str) else tuple(entry or ())
            if names and shapes[name][i] % math.prod(sizes[n] for n in names):
                spec[i] = None
        specs[name] = jax.sharding.PartitionSpec(*spec)
    return specs


def context_attention(kernel: FusedAttention, q, k, v, segment_ids, *, with_lse: bool):
    """Causal attention within segments by `kernel`: out [b, kv, g, t, d] (q's dtype), and with `with_lse` also
    the LSE [b, kv, g, t] float32, differentiable (module docstring). Under active logical axis rules and a mesh,
    the kernel runs per shard of batch and KV heads."""

    def local(q, k, v, segment_ids):
        if with_lse:
            return _attention_with_lse(kernel, q, k, v, segment_ids)
        return kernel(q, k, v, segment_ids, with_lse=False)

    rules, mesh = active_rules(), jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return local(q, k, v, segment_ids)
    if logical_to_spec(("seq",), rules)[0] is not None:
        raise ValueError(f"config.model.attention={kernel.impl!r} needs the sequence unsharded (logical axis "
                         f"'seq' -> None in config.logical_axis_rules)")
    logical = {"q": ("batch", "kv_heads", None, None, None), "k": ("batch", "kv_heads", None, None),
               "seg": ("batch", None), "lse": ("batch", "kv_heads", None, None)}
    shapes = {"q": q.shape, "k": k.shape, "seg": segment_ids.shape, "lse": q.shape[:-1]}
    s = _local_specs(shapes, logical, rules, mesh)
    out_specs = (s["q"], s["lse"]) if with_lse else s["q"]
    return jax.shard_map(local, mesh=mesh, in_specs=(s["q"], s["k"], s["k"], s["seg"]), out_specs=out_specs,
                         check_vma=False)(q, k, v, segment_ids)

