"""Attention math: rotary embeddings and grouped-query dot-product attention.

Conventions (pinned by the Hugging Face Llama parity test):
- RoPE rotates the two *halves* of each head (`rotate_half`), frequency i = base^(-2i/head_dim), computed in
  float32 from explicit integer `positions`.
- GQA: query head h reads KV head h // (num_heads // num_kv_heads).
- Logits, softmax and log-sum-exp are float32 whatever the compute dtype.

Layers of the implementation:
- `attention_core` is the seam: exact masked softmax attention of one block of queries over a set of keys, in a
  head-major layout, returning the output *and* the per-query log-sum-exp of the logits. Results over disjoint
  key sets (e.g. memory slots and the causal context) combine exactly: lse = logaddexp(lse_1, lse_2) and
  out = sum_i exp(lse_i - lse) * out_i; the core's backward takes a cotangent for the lse, so such a merge trains.
- `dot_product_attention` is the model's entry point in the `[batch, seq, heads, head_dim]` layout. With
  `causal=True` it splits the queries into blocks and gives each block only the keys up to its last position,
  which skips the masked upper triangle of the logits: about (n+1)/2n of the full work for n blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows give zeros instead of NaNs
CAUSAL_BLOCK_SIZE = 128  # queries per block of the causal path (a multiple of 8 keeps the matmuls aligned)


def rope_frequencies(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [batch, seq, head_dim] float32 for integer `positions` [batch, seq]."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; cos/sin: [batch, seq, head_dim]. Returns x rotated, in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Causal mask within segments: [batch, q_len, kv_len] bool.

    Query i sees key j iff j <= i (queries are the last q_len of the kv_len positions) and both belong to the
    same segment. Padding (segment 0) only sees padding, so no row is empty.
    """
    q_len, kv_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    causal = jnp.arange(q_len)[:, None] + (kv_len - q_len) >= jnp.arange(kv_len)[None, :]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return causal[None] & same


# ------------------------------------------------------------------------------------------------ the core
def _probs_and_lse(q: jax.Array, k: jax.Array, mask: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """Softmax probabilities [b, kv, g, tq, s] and log-sum-exp [b, kv, g, tq] of the scaled, masked logits."""
    logits = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    return e / s, (m + jnp.log(s))[..., 0]


def _core_fwd(q, k, v, mask, scale):
    probs, lse = _probs_and_lse(q, k, mask, scale)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v)
    return (out, lse), (q, k, v, probs, out)


def _core_bwd(scale, res, cotangents):
    q, k, v, probs, out = res
    d_out, d_lse = cotangents
    dv = jnp.einsum("bkgts,bkgtd->bksd", probs.astype(v.dtype), d_out)
    d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_out, v, preferred_element_type=jnp.float32)
    # d logits = P * (dP - rowsum(P * dP)) + P * d_lse, and rowsum(P * dP) = rowsum(d_out * out): a [.., tq, d]
    # reduction instead of a pass over the [.., tq, s] probabilities. Masked entries have P = 0 and get none.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
    d_logits = (probs * (d_probs - delta[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksd->bkgtd", d_logits, k)
    dk = jnp.einsum("bkgts,bkgtd->bksd", d_logits, q)
    return dq, dk, dv, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q, k, v, mask, scale):
    return _core_fwd(q, k, v, mask, scale)[0]


_attention_core.defvjp(_core_fwd, _core_bwd)


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                   scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Masked softmax attention in the head-major layout, with its log-sum-exp.

    q: [batch, kv_heads, group, q_len, head_dim] (query head h = kv_head * group + g); k, v: [batch, kv_heads,
    kv_len, head_dim]; mask: [batch, q_len, kv_len] bool (True = visible); scale: the logit scale (default
    head_dim^-0.5). Returns out [batch, kv_heads, group, q_len, head_dim] in q's dtype and lse [batch,
    kv_heads, group, q_len] float32, the log-sum-exp of the scaled, masked float32 logits.

    The backward is written out (flash attention's identities, probabilities kept from the forward): the softmax
    backward's row sums come from out and d_out ([q_len, head_dim]), not from a pass over the probabilities.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention_core(q, k, v, mask, scale)


# ------------------------------------------------------------------------------------------------ entry point
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, causal: bool = False,
                          block_size: int = CAUSAL_BLOCK_SIZE) -> jax.Array:
    """Grouped-query attention.

    q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim];
    mask: [batch, q_len, kv_len] bool (True = visible). Returns [batch, q_len, num_heads, head_dim] in q's dtype.

    causal: the caller guarantees that `mask` is causal (query i sees no key after position
    i + kv_len - q_len, as `attention_mask` builds it). Queries then go in blocks of `block_size`, each over
    the keys up to its own last position only; the result is the same, without the masked upper triangle's
    logits, softmax and matmuls.
    """
    b, t, h, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    qh = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, s, d]
    if causal and block_size < t <= kv_len:
        offset = kv_len - t  # query i sits at position i + offset among the keys
        outs = []
        for start in range(0, t, block_size):
            stop = min(start + block_size, t)
            keys = stop + offset
            out, _ = attention_core(qh[:, :, :, start:stop], kh[:, :, :keys], vh[:, :, :keys],
                                    mask[:, start:stop, :keys])
            outs.append(out)
        out = jnp.concatenate(outs, axis=3)
    else:
        out, _ = attention_core(qh, kh, vh, mask)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
