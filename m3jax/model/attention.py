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
import numpy as np

from m3jax.model import kernels

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


# ------------------------------------------------------------------------------------------------ entry points
def _to_head_major(q: jax.Array, k: jax.Array, v: jax.Array):
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    qh = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # k, v: [b, kv, s, d]


def _from_head_major(out: jax.Array) -> jax.Array:
    b, kv, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


def _context_attention(qh, kh, vh, mask, causal: bool, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Head-major attention over the context: (out [b, kv, g, t, d], lse [b, kv, g, t]); see `dot_product_attention`."""
    t, kv_len = qh.shape[3], kh.shape[2]
    if not (causal and block_size < t <= kv_len):
        return attention_core(qh, kh, vh, mask)
    offset = kv_len - t  # query i sits at position i + offset among the keys
    outs, lses = [], []
    for start in range(0, t, block_size):
        stop = min(start + block_size, t)
        keys = stop + offset
        out, lse = attention_core(qh[:, :, :, start:stop], kh[:, :, :keys], vh[:, :, :keys], mask[:, start:stop, :keys])
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


def _fused_context(kernel: kernels.FusedAttention, qh, kh, vh, segment_ids, sink_len: int):
    """The context part by a fused kernel, with its LSE: causal within `segment_ids` [b, t] after a sink of
    `sink_len` positions that every query sees (and that sees only itself). The kernel runs over the positions
    after the sink; the sink's keys, a few, are attended in XLA and merged by LSE."""
    p, t = sink_len, qh.shape[3]
    out, lse = kernels.context_attention(kernel, qh[:, :, :, p:], kh[:, :, p:], vh[:, :, p:], segment_ids[:, p:],
                                         with_lse=True)
    if p == 0:
        return out, lse
    b = qh.shape[0]
    out_s, lse_s = attention_core(qh[:, :, :, p:], kh[:, :, :p], vh[:, :, :p], jnp.ones((b, t - p, p), bool))
    out, lse = merge_attention(out, lse, out_s, lse_s)
    sink_mask = jnp.broadcast_to(jnp.tril(jnp.ones((p, p), bool)), (b, p, p))
    out_ss, lse_ss = attention_core(qh[:, :, :, :p], kh[:, :, :p], vh[:, :, :p], sink_mask)
    return jnp.concatenate([out_ss, out.astype(out_ss.dtype)], axis=3), jnp.concatenate([lse_ss, lse], axis=3)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, causal: bool = False,
                          block_size: int = CAUSAL_BLOCK_SIZE, kernel: kernels.FusedAttention | None = None,
                          segment_ids: jax.Array | None = None) -> jax.Array:
    """Grouped-query attention.

    q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim];
    mask: [batch, q_len, kv_len] bool (True = visible). Returns [batch, q_len, num_heads, head_dim] in q's dtype.

    causal: the caller guarantees that `mask` is causal (query i sees no key after position
    i + kv_len - q_len, as `attention_mask` builds it). Queries then go in blocks of `block_size`, each over
    the keys up to its own last position only; the result is the same, without the masked upper triangle's
    logits, softmax and matmuls.

    kernel: a fused kernel (`m3jax.model.kernels`) computing the same causal attention within `segment_ids`
    [batch, seq] (0 = padding) instead; `mask` is then unused and must be what `attention_mask` builds from them.
    """
    qh, kh, vh = _to_head_major(q, k, v)
    if kernel is not None:
        return _from_head_major(kernels.context_attention(kernel, qh, kh, vh, segment_ids, with_lse=False))
    out, _ = _context_attention(qh, kh, vh, mask, causal, block_size)
    return _from_head_major(out)


# ------------------------------------------------------------------------------------------------ memory heads
def group_layout(memory_group: jax.Array, num_groups: int, chunk_size: int):
    """Where each memory group's tokens sit, for attending group by group.

    memory_group: [b, t] int32 (-1 = reads no memory). Contract: every token of group g lies within
    `chunk_size` positions of the group's first token. Returns
    - tokens [b, G, C] int32: the positions first(g) + c, clipped into [0, t);
    - member [b, G, C] bool: whether that position really belongs to group g;
    - flat [b, t] int32: each token's place g·C + (i − first(g)) in the flattened [G·C] layout;
    - reads [b, t] bool: whether the token reads memory (a group id >= 0 within the contract).
    """
    b, t = memory_group.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bucket = jnp.where((memory_group >= 0) & (memory_group < num_groups), memory_group, num_groups)
    first = jnp.full((b, num_groups + 1), t, jnp.int32).at[jnp.arange(b)[:, None], bucket].min(pos)[:, :num_groups]
    tokens = first[:, :, None] + jnp.arange(chunk_size, dtype=jnp.int32)
    clipped = jnp.minimum(tokens, t - 1)
    owner = jnp.take_along_axis(memory_group, clipped.reshape(b, -1), axis=1).reshape(clipped.shape)
    member = (tokens < t) & (owner == jnp.arange(num_groups, dtype=jnp.int32)[None, :, None])
    g = jnp.clip(memory_group, 0, num_groups - 1)
    offset = pos - jnp.take_along_axis(first, g, axis=1)
    reads = (bucket < num_groups) & (offset < chunk_size)
    return clipped, member, g * chunk_size + jnp.clip(offset, 0, chunk_size - 1), reads


def memory_attention(qm: jax.Array, mem_k: jax.Array, mem_v: jax.Array, mem_index: jax.Array,
                     mem_valid: jax.Array, memory_group: jax.Array, *, chunk_size: int,
                     enabled: jax.Array | bool = True) -> tuple[jax.Array, jax.Array]:
    """Each token's attention over its group's memory slots alone: (out, lse), to merge with the context's.

    qm: [b, mkv, g, t, d] (the memory heads' queries, head-major); mem_k, mem_v: [b, M, mkv, kk, d];
    mem_index: [b, G, S] (-1 = empty); mem_valid: [b, M, kk]; memory_group: [b, t]. Returns out [b, mkv, g, t, d]
    (float32) and lse [b, mkv, g, t] float32 (NEG_INF-ish for a token with nothing to read, so it merges to
    nothing). The queries are gathered group by group ([G, chunk_size] of them) against each group's own S·kk keys:
    O(t · S · kk) per head, never O(t · G · S · kk).
    """
    b, mkv, grp, t, d = qm.shape
    mem_index, mem_valid, memory_group = jnp.asarray(mem_index), jnp.asarray(mem_valid), jnp.asarray(memory_group)
    num_groups, slots = mem_index.shape[1], mem_index.shape[2]
    kk = mem_k.shape[3]
    tokens, member, flat, reads = group_layout(memory_group, num_groups, chunk_size)
    qg = jnp.take_along_axis(qm, tokens.reshape(b, 1, 1, -1, 1), axis=3)  # [b, mkv, g, G·C, d]
    qg = qg.reshape(b, mkv, grp, num_groups, chunk_size, d)
    rows = jnp.arange(b)[:, None, None]
    idx = jnp.maximum(mem_index, 0)
    kg, vg = mem_k[rows, idx], mem_v[rows, idx]  # [b, G, S, mkv, kk, d]
    key_ok = (mem_index >= 0)[..., None] & mem_valid[rows, idx] & enabled  # [b, G, S, kk]
    scale = d ** -0.5
    logits = jnp.einsum("bjhGcd,bGsjkd->bjhGcsk", qg, kg, preferred_element_type=jnp.float32) * scale
    visible = key_ok[:, None, None, :, None] & member[:, None, None, :, :, None, None]
    logits = jnp.where(visible, logits, NEG_INF).reshape(b, mkv, grp, num_groups, chunk_size, slots * kk)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(s))[..., 0]  # [b, mkv, g, G, C]
    probs = (e / s).reshape(b, mkv, grp, num_groups, chunk_size, slots, kk)
    out = jnp.einsum("bjhGcsk,bGsjkd->bjhGcd", probs, vg.astype(jnp.float32))
    # Back to token order: token i takes its group's row at its offset.
    out = jnp.take_along_axis(out.reshape(b, mkv, grp, -1, d), flat[:, None, None, :, None], axis=3)
    lse = jnp.take_along_axis(lse.reshape(b, mkv, grp, -1), flat[:, None, None, :], axis=3)
    lse = jnp.where(reads[:, None, None, :], lse, NEG_INF)
    return out, lse


def merge_attention(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array):
    """Two attentions over disjoint key sets -> the attention over their union (one softmax), exactly."""
    lse = jnp.logaddexp(lse_a, lse_b)
    wa, wb = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
    return wa * out_a.astype(jnp.float32) + wb * out_b.astype(jnp.float32), lse


def attention_with_memory(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, mem_k: jax.Array,
                          mem_v: jax.Array, mem_index: jax.Array, mem_valid: jax.Array, memory_group: jax.Array,
                          mem_kv_heads: tuple[int, ...], *, chunk_size: int, causal: bool = True,
                          block_size: int = CAUSAL_BLOCK_SIZE, enabled: jax.Array | bool = True,
                          kernel: kernels.FusedAttention | None = None, segment_ids: jax.Array | None = None,
                          sink_len: int = 0) -> jax.Array:
    """Grouped-query attention in which memory heads also read their group's memories (eq. 4 of Memory3).

    q: [b, t, h, d]; k, v: [b, kv_len, kv, d] (post-RoPE context); mask: [b, t, kv_len] bool;
    mem_k, mem_v: [b, M, mkv, kk, d]: the unique memories of each row for this layer (post-RoPE keys), memory KV
    head j being KV head mem_kv_heads[j]; mem_index: [b, G, S] int32 slots of each group (-1 = empty);
    mem_valid: [b, M, kk] bool (False = a padding key); memory_group: [b, t] int32 (-1 = none), each group's
    tokens within `chunk_size` positions of its first token; enabled: a scalar that switches the memory off
    (non-memory layers of a scanned stack).

    For a query head whose KV head is a memory head, token i of group g attends in one softmax to the valid keys
    of g's non-empty slots (all visible to every token of g; a memory in two slots counts twice) and to the
    context keys its mask allows. The context part is the ordinary (blocked causal) attention; the memory part
    is computed group by group and merged with it by log-sum-exp. Returns [b, t, h, d] in q's dtype.

    kernel: the context part by a fused kernel instead (`mask` unused): causal within `segment_ids` [b, t] after
    a sink of `sink_len` positions that every query sees, as `Transformer` lays them out.
    """
    qh, kh, vh = _to_head_major(q, k, v)
    if kernel is not None:
        out, lse = _fused_context(kernel, qh, kh, vh, segment_ids, sink_len)
    else:
        out, lse = _context_attention(qh, kh, vh, mask, causal, block_size)
    if not mem_kv_heads:
        return _from_head_major(out)
    every = tuple(mem_kv_heads) == tuple(range(kh.shape[1]))
    heads = slice(None) if every else np.asarray(mem_kv_heads, np.int32)
    out_m, lse_m = memory_attention(qh[:, heads], mem_k, mem_v, mem_index, mem_valid, memory_group,
                                    chunk_size=chunk_size, enabled=enabled)
    merged, _ = merge_attention(out[:, heads], lse[:, heads], out_m, lse_m)
    merged = merged.astype(out.dtype)
    return _from_head_major(merged if every else out.at[:, heads].set(merged))
