"""Attention math: rotary embeddings and grouped-query dot-product attention.

Conventions (pinned by the Hugging Face Llama parity test):
- RoPE rotates the two *halves* of each head (`rotate_half`), frequency i = base^(-2i/head_dim), computed in
  float32 from explicit integer `positions`.
- GQA: query head h reads KV head h // (num_heads // num_kv_heads).
- Logits, softmax and log-sum-exp are float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows give zeros instead of NaNs


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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim];
    mask: [batch, q_len, kv_len] bool (True = visible). Returns [batch, q_len, num_heads, head_dim] in q's dtype.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (d**-0.5)
    logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
