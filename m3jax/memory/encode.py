"""Writing explicit memory: references -> sparse post-RoPE key/values (Memory3 §3.1, §3.3).

A reference (at most `ref_len` = 128 tokens) is encoded on its own by the plain model: the sink "<s>Reference:"
at positions [0, p), the reference at [p, p + len), causal attention, through the memory layers only (the last
memory layer stops at its q/k/v projections; later layers are never read). For each memory layer and memory KV
head, the `k` reference tokens that receive the most attention from the reference are kept:

    w_j = Σ_{h ∈ group} Σ_i exp(q_i^h · k_j / √d)

over the query heads h of the KV head's GQA group and the reference's tokens i, with no causal mask, the sink and
padding excluded as queries and as keys. It is ranked in log space (one log-sum-exp over (h, i), float32).
Ties go to the lower position; the kept tokens are returned sorted by position. Keys are stored after RoPE,
with their in-reference positions p … p + ref_len − 1 (see docs/memory.md for the read side's layout).

Per-document encoding (the paper's Remark 3, `encode_documents` with a document longer than `ref_len`): the
whole document is encoded in one forward after the sink (document token t at position p + t), its key/values
are cut into consecutive `ref_len`-token pieces, and each piece keeps its top-k by the same w_j restricted to the
piece (queries i and keys j both in the piece: a piece ranks its tokens by the attention they get from the
piece itself, as a reference does). The logits q_i·k_j depend only on i − j under RoPE, so this score does not
depend on where the piece sits in the document. The kept keys of piece c are then re-rotated from document
position p + c·ref_len + r to the in-piece position p + r (RoPE rotations compose: one rotation by −c·ref_len),
so every memory lies in the same position interval as a reference's. Values are not rotated.

Outputs (n = references, Lm = memory layers, mkv = memory KV heads):
    kv         [n, Lm, 2, mkv, k, head_dim]   compute dtype; [:, :, 0] keys (post-RoPE), [:, :, 1] values
    positions  [n, Lm, mkv, k] int32          in-reference positions, sorted; -1 (and zero kv) = padding, for
                                              a reference with fewer than k tokens
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from m3jax import parallel
from m3jax.model import attention as attn_lib
from m3jax.model import params as params_lib
from m3jax.model.config import ModelConfig
from m3jax.model.transformer import Transformer
from m3jax.parallel import DEFAULT_LOGICAL_AXIS_RULES


# ------------------------------------------------------------------------------------------------ selection
def token_scores(q: jax.Array, keys: jax.Array, mask: jax.Array) -> jax.Array:
    """log w_j of every token, per KV head: [b, kv, t] float32; -inf for a masked token.

    q: [b, t, kv, group, d] (the query heads of each KV head's GQA group); keys: [b, t, kv, d] post-RoPE;
    mask: [b, t] bool (True = a reference token; False = sink or padding, excluded as query and as key).
    log w_j = logsumexp over (group heads h, queries i) of q_i^h · k_j / √d; no causal mask.
    """
    logits = jnp.einsum("bikgd,bjkd->bkgij", q, keys, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    logits = jnp.where(mask[:, None, None, :, None], logits, -jnp.inf)
    scores = jax.nn.logsumexp(logits, axis=(2, 3))
    return jnp.where(mask[:, None, :], scores, -jnp.inf)


def select_top_k(q: jax.Array, keys: jax.Array, mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k tokens of each KV head with the largest w_j (see `token_scores` for the shapes).

    Returns (index [b, kv, k] int32, kept [b, kv, k] bool), sorted by position with the kept tokens first;
    kept is False for the slots a sequence with fewer than k tokens cannot fill. Equal scores go to the lower
    position (`jax.lax.top_k`'s order).
    """
    t = keys.shape[1]
    if not 1 <= k <= t:
        raise ValueError(f"k={k} must be in [1, {t}] (the tokens of a reference)")
    _, index = jax.lax.top_k(token_scores(q, keys, mask), k)
    kept = jnp.take_along_axis(mask[:, None, :], index, axis=-1)
    order = jnp.argsort(jnp.where(kept, index, t + index), axis=-1)
    return jnp.take_along_axis(index, order, -1), jnp.take_along_axis(kept, order, -1)


def rerotate(keys: jax.Array, shift: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Post-RoPE keys [b, ..., head_dim] moved by `shift` [b] positions (RoPE at position + shift), in keys'
    dtype. Rotations compose, so this is one rotation by the shift."""
    b, d = keys.shape[0], keys.shape[-1]
    cos, sin = attn_lib.rope_frequencies(jnp.asarray(shift)[:, None], cfg.head_dim, cfg.rope_base)  # [b, 1, d]
    return attn_lib.apply_rope(keys.reshape(b, 1, -1, d), cos, sin).reshape(keys.shape)


# ------------------------------------------------------------------------------------------------ encoding
def encode(params, tokens, lengths, sink_tokens, *, cfg: ModelConfig, k: int, ref_len: int,
           rules=DEFAULT_LOGICAL_AXIS_RULES):
    """The pure encoder (jittable; `encode_documents` jits and shards it): each row of `tokens` [b, P·ref_len]
    (its first lengths[b] tokens real) encoded after the sink in one forward and cut into P pieces of `ref_len`.

    params: the model's parameter dict; sink_tokens: [p] int32. Returns (kv [b, P, Lm, 2, mkv, k, d] in the compute
    dtype, positions [b, P, Lm, mkv, k] int32), as the module docstring describes.
    """
    with parallel.axis_rules(rules):
        return encode_with(params_lib.model_from(cfg, params), tokens, lengths, sink_tokens, k=k, ref_len=ref_len)


def encode_with(model: Transformer, tokens, lengths, sink_tokens, *, k: int, ref_len: int):
    """`encode` by a model object (inside a traced step: the continued stage's online mode encodes with the
    parameters being trained, and may differentiate through it). Same inputs and outputs as `encode`."""
    cfg = model.cfg
    (b, t), p = tokens.shape, sink_tokens.shape[0]
    pieces = t // ref_len
    real = jnp.arange(t)[None, :] < lengths[:, None]  # [b, t]
    full = jnp.concatenate([jnp.broadcast_to(sink_tokens, (b, p)), jnp.where(real, tokens, 0)], axis=1)
    positions = jnp.broadcast_to(jnp.arange(p + t, dtype=jnp.int32), (b, p + t))
    segments = jnp.concatenate([jnp.ones((b, p), jnp.int32), real.astype(jnp.int32)], axis=1)
    heads = np.asarray(cfg.memory_kv_heads, np.int32)
    piece_real = real.reshape(b * pieces, ref_len)
    shift = -ref_len * jnp.tile(jnp.arange(pieces, dtype=jnp.int32), b)  # [b·P]: back to the piece's start

    def kept_kv(layer, q, keys, values):
        del layer

        def pieces_of(x):  # [b, p + t, heads, ...] -> [b·P, ref_len, mkv, ...]: the memory heads
            return x[:, p:].reshape(b * pieces, ref_len, *x.shape[2:])[:, :, heads]

        qg = q.reshape(*q.shape[:2], cfg.num_kv_heads, cfg.num_groups, cfg.head_dim)
        keys, values = pieces_of(keys), pieces_of(values)
        index, kept = select_top_k(pieces_of(qg), keys, piece_real, k)  # [b·P, mkv, k]

        def gather(x):  # [b·P, ref_len, mkv, d] -> [b·P, mkv, k, d], zero where not kept
            x = jnp.take_along_axis(x.transpose(0, 2, 1, 3), index[..., None], axis=2)
            return jnp.where(kept[..., None], x, jnp.zeros((), x.dtype))

        kept_keys = gather(keys)
        if pieces > 1:
            kept_keys = rerotate(kept_keys, shift, cfg)
        return kept_keys, gather(values), jnp.where(kept, p + index, -1)

    keys, values, kept_pos = model.layer_qkv(full, positions, segments, max(cfg.memory_layers) + 1, kept_kv)
    layers = np.asarray(cfg.memory_layers)
    kv = jnp.stack([keys[layers], values[layers]], axis=1)  # [Lm, 2, b·P, mkv, k, d]
    kv = kv.transpose(2, 0, 1, 3, 4, 5).reshape(b, pieces, *kv.shape[:2], *kv.shape[3:])
    kept_pos = kept_pos[layers].transpose(1, 0, 2, 3).reshape(b, pieces, len(layers), *kept_pos.shape[2:])
    return kv, kept_pos.astype(jnp.int32)


@functools.cache
def _encoder(cfg: ModelConfig, k: int, ref_len: int, rules, batch_sharding: NamedSharding | None):
    fn = functools.partial(encode, cfg=cfg, k=k, ref_len=ref_len, rules=rules)
    if batch_sharding is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=(batch_sharding, batch_sharding))


def _params_of(params_or_model: Transformer | Mapping[str, Any]):
    if isinstance(params_or_model, Transformer):
        return nnx.to_pure_dict(nnx.state(params_or_model, nnx.Param))
    return params_or_model


def encode_documents(params: Transformer | Mapping[str, Any], cfg: ModelConfig, tokens, lengths, sink_tokens, *,
                     k: int | None = None, ref_len: int | None = None, mesh: Mesh | None = None,
                     rules=DEFAULT_LOGICAL_AXIS_RULES) -> tuple[jax.Array, jax.Array]:
    """Memories of whole documents (Remark 3): each encoded in one forward, cut into `ref_len`-token pieces.

    params: the model's parameters (the pure dict of a checkpoint) or a `Transformer`; tokens: [b, T] int32,
    the documents without the sink; lengths: [b] (tokens at and after a row's length are padding: any value,
    e.g. -1 or a pad id, is ignored); sink_tokens: [p] int32. With `mesh` (this process's devices: each process
    encodes its own slice), the batch is sharded over the mesh axes of the logical axis "batch" in `rules`
    (data, fsdp by default; b must divide); parameters stay as given. Returns kv [b, P, Lm, 2, mkv, k, d] and
    positions [b, P, Lm, mkv, k] (P = ceil(T / ref_len); a piece's kept keys re-rotated to p + in-piece
    offset; a piece past a row's length is all padding: -1). k and ref_len default to the model's memory
    geometry (`cfg.memory_k`, `cfg.memory_ref_len`).
    """
    if not cfg.has_memory:
        raise ValueError("the model has no memory heads (config.memory.heads=False): nothing to encode")
    k = cfg.memory_k if k is None else k
    ref_len = cfg.memory_ref_len if ref_len is None else ref_len
    tokens, lengths = np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be [b, T] and lengths [b], got {tokens.shape} and {lengths.shape}")
    if lengths.min(initial=0) < 0 or lengths.max(initial=0) > tokens.shape[1]:
        raise ValueError(f"lengths must lie in [0, {tokens.shape[1]}], got {lengths.min()}..{lengths.max()}")
    pieces = max(1, -(-tokens.shape[1] // ref_len))
    tokens = np.pad(tokens, ((0, 0), (0, pieces * ref_len - tokens.shape[1])))
    sink_tokens = np.asarray(sink_tokens, np.int32)
    rules = tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in rules)
    if mesh is None:
        return _encoder(cfg, k, ref_len, rules, None)(_params_of(params), tokens, lengths, sink_tokens)
    sharding = NamedSharding(mesh, parallel.logical_to_spec(("batch",), rules))
    shards = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(sharding.spec))]))
    if tokens.shape[0] % shards:
        raise ValueError(f"the batch of {tokens.shape[0]} does not divide over {shards} batch shards of the mesh")
    tokens, lengths = jax.device_put((tokens, lengths), sharding)
    with jax.set_mesh(mesh):
        return _encoder(cfg, k, ref_len, rules, sharding)(_params_of(params), tokens, lengths, sink_tokens)


def encode_references(params: Transformer | Mapping[str, Any], cfg: ModelConfig, tokens, lengths, sink_tokens, *,
                      k: int | None = None, mesh: Mesh | None = None,
                      rules=DEFAULT_LOGICAL_AXIS_RULES) -> tuple[jax.Array, jax.Array]:
    """Memories of references, each encoded on its own: tokens [n, ref_len] int32 (padded to the reference
    length; see `encode_documents` for lengths, padding, params and the mesh), lengths [n],
    sink_tokens [p]. Returns kv [n, Lm, 2, mkv, k, head_dim] (compute dtype) and positions [n, Lm, mkv, k]
    int32 (p … p + ref_len − 1 sorted, −1 = padding)."""
    tokens = np.asarray(tokens, np.int32)
    kv, positions = encode_documents(params, cfg, tokens, lengths, sink_tokens, k=k, ref_len=tokens.shape[1],
                                     mesh=mesh, rules=rules)
    return kv[:, 0], positions[:, 0]
