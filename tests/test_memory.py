"""The memory read path against independent references.

- `attention_with_memory` against a float64 numpy reference that lists, for every (row, query head, token), the
  full concatenation of the keys it may see (its group's memory keys, duplicates included, then the visible
  context keys) and takes one softmax over it; gradients against a second, naive jnp reference that
  materialises every token's memory keys and concatenates them with the context keys.
- The model with memory against a numpy forward of the plain model on one long sequence `sink + reference +
  context`: with every key of the reference kept in every head of every layer the two are the same computation
  (oracle 1); with a few keys kept per (memory layer, memory KV head), the sequence forward hides from the
  context the reference tokens that were not kept (oracle 2).
- Without a `Memory` the model is the plain model; with no memories it is the plain model on `sink + context`.
- Cost: the forward's FLOPs (XLA's cost analysis) do not grow with a row's unique memories, only with the slots
  each group reads.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax.model import attention as attn_lib
from m3jax.model import params as params_lib
from m3jax.model.config import ModelConfig
from m3jax.model.memory import Memory, check_layout

REF_LEN = 128  # reference tokens: memory keys lie at positions [p, p + REF_LEN)


# ------------------------------------------------------------------------------------------ attention references
def numpy_memory_attention(q, k, v, mask, mem_k, mem_v, mem_index, mem_valid, memory_group, mem_kv_heads):
    """Eq. 4 with explicit loops, float64: per (row, head, token) the list of visible keys, one softmax over it."""
    q, k, v, mem_k, mem_v = (np.asarray(x, np.float64) for x in (q, k, v, mem_k, mem_v))
    b, t, h, d = q.shape
    rep = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            kv_head = hi // rep
            for i in range(t):
                keys, values = [], []
                g = memory_group[bi, i]
                if g >= 0 and kv_head in mem_kv_heads:
                    j = list(mem_kv_heads).index(kv_head)
                    for m in mem_index[bi, g]:
                        if m < 0:
                            continue
                        for s in range(mem_k.shape[3]):
                            if mem_valid[bi, m, s]:
                                keys.append(mem_k[bi, m, j, s])
                                values.append(mem_v[bi, m, j, s])
                for c in np.flatnonzero(mask[bi, i]):
                    keys.append(k[bi, c, kv_head])
                    values.append(v[bi, c, kv_head])
                logits = np.stack(keys) @ q[bi, i, hi] / np.sqrt(d)
                p = np.exp(logits - logits.max())
                out[bi, i, hi] = (p / p.sum()) @ np.stack(values)
    return out


def jnp_memory_attention(q, k, v, mask, mem_k, mem_v, mem_index, mem_valid, memory_group, mem_kv_heads):
    """A second reference, for gradients, vectorised: every token's memory keys materialised through one-hot
    selections built in numpy from the (constant) index arrays, concatenated with the context keys, one
    -inf-masked softmax. The differentiable inputs go through einsums only."""
    b, t, h, d = q.shape
    kv_heads, rep = k.shape[2], h // k.shape[2]
    M, kk, S = mem_k.shape[1], mem_k.shape[3], mem_index.shape[2]
    slots = np.where(memory_group[..., None] >= 0, mem_index[np.arange(b)[:, None], np.maximum(memory_group, 0)], -1)
    pick = slots[..., None] == np.arange(M)  # [b, t, S, M]: slot s of the token's group holds memory m
    head_of = np.arange(kv_heads)[:, None] == np.asarray(mem_kv_heads)[None, :]  # [kv, mkv]
    tok_k = jnp.einsum("btsm,kj,bmjcd->btkscd", pick.astype(np.float32), head_of.astype(np.float32), mem_k)
    tok_v = jnp.einsum("btsm,kj,bmjcd->btkscd", pick.astype(np.float32), head_of.astype(np.float32), mem_v)
    tok_k, tok_v = (x.reshape(b, t, kv_heads, S * kk, d) for x in (tok_k, tok_v))
    key_ok = (pick[..., None] & mem_valid[:, None, None]).any(axis=3).reshape(b, t, S * kk)
    mem_vis = key_ok[:, :, None, None, :] & head_of.any(axis=1)[None, None, :, None, None]
    qg = q.reshape(b, t, kv_heads, rep, d)
    mem_logits = jnp.einsum("btkrd,btksd->btkrs", qg, tok_k) / np.sqrt(d)
    ctx_logits = jnp.einsum("btkrd,bskd->btkrs", qg, k) / np.sqrt(d)
    logits = jnp.concatenate([jnp.where(mem_vis, mem_logits, -jnp.inf),
                              jnp.where(mask[:, :, None, None, :], ctx_logits, -jnp.inf)], axis=-1)
    p = jax.nn.softmax(logits, axis=-1)
    out = (jnp.einsum("btkrs,btksd->btkrd", p[..., : S * kk], tok_v)
           + jnp.einsum("btkrs,bskd->btkrd", p[..., S * kk:], v))
    return out.reshape(b, t, h, d)


# ------------------------------------------------------------------------------------------ attention cases
def _groups(t, rows):
    """rows: per batch row, (start, stop, group) spans -> memory_group [b, t] int32, -1 outside the spans."""
    g = np.full((len(rows), t), -1, np.int32)
    for r, spans in enumerate(rows):
        for start, stop, gid in spans:
            g[r, start:stop] = gid
    return g


def _check_contract(group, chunk):
    """The caller's contract: a group's tokens lie within `chunk` positions of its first token, in one row."""
    for gid in np.unique(group[group >= 0]):
        rows, cols = np.nonzero(group == gid)
        assert len(set(rows)) == 1 and cols.max() - cols.min() < chunk, gid


def attention_case(name):
    """Inputs of one `attention_with_memory` case; group ids are unique across the rows of a batch."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    causal, kv_len, extra = True, None, {}
    if name == "aligned_empty_slots_duplicates":
        b, t, h, kv, heads, chunk, M, S, kk = 2, 16, 4, 2, (0, 1), 4, 5, 3, 3
        group = _groups(t, [[(4 * c, 4 * c + 4, c) for c in range(4)], [(4 * c, 4 * c + 4, 4 + c) for c in range(4)]])
        seg = np.ones((b, t), np.int32)
        index = rng.integers(-1, M, (b, 8, S))
        index[0, 2] = -1  # a group that retrieved nothing
        index[0, 0] = [1, 1, -1]  # the same memory twice
        index[1, 5] = [3, 0, 3]
        valid = rng.random((b, M, kk)) > 0.25
    elif name == "paper_layout_t37_chunk8":  # group g reads memories g, g-1, ..., g-4
        b, t, h, kv, heads, chunk, M, S, kk = 1, 37, 8, 2, (0, 1), 8, 5, 5, 4
        extra = dict(block_size=16)  # the blocked causal context path (3 query blocks), merged with the memory
        group = (np.arange(t) // chunk)[None].astype(np.int32)
        seg = np.ones((b, t), np.int32)
        g, s = np.arange(5)[:, None], np.arange(S)[None]
        index = np.where(g - s >= 0, g - s, -1)[None]
        valid = np.ones((b, M, kk), bool)
        valid[0, 3, 1] = False
    elif name == "gqa6_3_subset_and_ungrouped_tokens":
        b, t, h, kv, heads, chunk, M, S, kk = 2, 20, 6, 3, (1,), 6, 4, 2, 5
        group = _groups(t, [[(1, 7, 0), (7, 13, 1), (13, 19, 2)], [(0, 6, 3), (6, 12, 4), (12, 18, 5), (18, 20, 6)]])
        group[0, 9] = -1
        seg = np.ones((b, t), np.int32)
        index = rng.integers(-1, M, (b, 7, S))
        index[1, 4] = -1
        valid = rng.random((b, M, kk)) > 0.3
    elif name == "gqa8_4_noncontiguous_heads_non_causal_mask":
        b, t, h, kv, heads, chunk, M, S, kk = 1, 12, 8, 4, (0, 2), 5, 2, 2, 3
        causal = False
        group = (np.arange(t) // chunk)[None].astype(np.int32)
        seg = None  # a random mask (diagonal visible)
        index = np.array([[[0, 1], [1, -1], [1, 0]]])
        valid = rng.random((b, M, kk)) > 0.2
    elif name == "packed_rows_unaligned_groups":
        # Row 0: segment 1 = [0, 11), segment 2 = [11, 27), padding [27, 30); row 1: segments [0, 5), [5, 30).
        # A segment's first token (<s>) reads nothing; groups restart at each segment, off the multiples of 8.
        b, t, h, kv, heads, chunk, M, S, kk = 2, 30, 4, 2, (0, 1), 8, 6, 3, 4
        seg = np.array([[1] * 11 + [2] * 16 + [0] * 3, [1] * 5 + [2] * 25], np.int32)
        group = _groups(t, [[(1, 9, 0), (9, 11, 1), (12, 20, 2), (20, 27, 3)],
                            [(1, 5, 4), (6, 14, 5), (14, 22, 6), (22, 30, 7)]])
        index = rng.integers(-1, M, (b, 8, S))
        index[1, 6] = [2, 2, 2]
        valid = rng.random((b, M, kk)) > 0.25
        valid[0, 4] = False  # a memory whose keys are all padding
    elif name == "queries_are_the_last_t_of_kv_len":
        b, t, h, kv, heads, chunk, M, S, kk = 2, 8, 4, 2, (0, 1), 4, 3, 2, 3
        kv_len = 14
        group = _groups(t, [[(0, 4, 0), (4, 8, 1)], [(0, 3, 2), (3, 7, 3)]])
        seg = np.array([[1] * 14, [1] * 4 + [2] * 10], np.int32)
        index = rng.integers(-1, M, (b, 4, S))
        valid = rng.random((b, M, kk)) > 0.2
    else:
        raise ValueError(name)
    _check_contract(group, chunk)
    kv_len = kv_len or t
    hd = 8
    if seg is None:
        mask = rng.random((b, t, kv_len)) > 0.4
        mask[:, np.arange(t), np.arange(t)] = True
    else:
        # Causal within segments; query i sits at key position i + kv_len - t.
        mask = (np.arange(t)[:, None] + kv_len - t >= np.arange(kv_len)) & (seg[:, kv_len - t:, None] == seg[:, None])
    f32 = functools.partial(np.asarray, dtype=np.float32)
    return dict(
        arrays=dict(q=f32(rng.normal(size=(b, t, h, hd))), k=f32(rng.normal(size=(b, kv_len, kv, hd))),
                    v=f32(rng.normal(size=(b, kv_len, kv, hd))), mask=mask,
                    mem_k=f32(rng.normal(size=(b, M, len(heads), kk, hd))),
                    mem_v=f32(rng.normal(size=(b, M, len(heads), kk, hd))),
                    mem_index=np.asarray(index, np.int32), mem_valid=np.asarray(valid, bool),
                    memory_group=np.asarray(group, np.int32)),
        heads=heads, chunk=chunk, causal=causal, extra=extra)


ATTENTION_CASES = ["aligned_empty_slots_duplicates", "paper_layout_t37_chunk8", "gqa6_3_subset_and_ungrouped_tokens",
                   "gqa8_4_noncontiguous_heads_non_causal_mask", "packed_rows_unaligned_groups",
                   "queries_are_the_last_t_of_kv_len"]
DIFF = ("q", "k", "v", "mem_k", "mem_v")  # the differentiable inputs, in argument order
ORDER = ("q", "k", "v", "mask", "mem_k", "mem_v", "mem_index", "mem_valid", "memory_group")


@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_attention_with_memory_matches_naive_values_and_grads(name):
    case = attention_case(name)
    a, heads = case["arrays"], case["heads"]
    ja = {n: jnp.asarray(x) for n, x in a.items()}

    def fast(q, k, v, mem_k, mem_v):
        return attn_lib.attention_with_memory(q, k, v, ja["mask"], mem_k, mem_v, ja["mem_index"], ja["mem_valid"],
                                              ja["memory_group"], heads, chunk_size=case["chunk"],
                                              causal=case["causal"], **case["extra"])

    def naive(q, k, v, mem_k, mem_v):
        return jnp_memory_attention(q, k, v, a["mask"], mem_k, mem_v, a["mem_index"], a["mem_valid"],
                                    a["memory_group"], heads)

    def value_and_grads(f, *x):
        out, pull = jax.vjp(f, *x)
        return out, pull(w)

    w = jnp.asarray(np.random.default_rng(1).normal(size=a["q"].shape), jnp.float32)
    diff_args = [ja[n] for n in DIFF]
    out, g_fast = jax.jit(functools.partial(value_and_grads, fast))(*diff_args)
    naive_out, g_ref = jax.jit(functools.partial(value_and_grads, naive))(*diff_args)
    ref = numpy_memory_attention(*(a[n] for n in ORDER), heads)
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5, err_msg=f"{name}: values vs numpy")
    np.testing.assert_allclose(np.asarray(naive_out), ref, atol=2e-5, rtol=1e-5,
                               err_msg=f"{name}: the jnp reference itself")
    for n, gf, gr in zip(DIFF, g_fast, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(gf), np.asarray(gr), atol=2e-5, rtol=1e-4, err_msg=f"{name}: d{n}")


# ------------------------------------------------------------------------------------------ numpy model
def _rope(x, positions, base):
    """x: [T, heads, hd] rotated (rotate-half) at integer positions [T]."""
    hd = x.shape[-1]
    angles = positions[:, None].astype(np.float64) * base ** (-np.arange(0, hd, 2) / hd)
    angles = np.concatenate([angles, angles], -1)[:, None]
    rotated = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def numpy_forward(params, cfg, tokens, positions, visible):
    """The plain model on one sequence, float64.

    visible: [T, T] or [layers, kv_heads, T, T] bool (query, key). Returns logits [T, vocab_size] and every
    layer's post-RoPE keys and values [layers, T, kv_heads, head_dim].
    """
    P = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    T, rep, eps = len(tokens), cfg.num_heads // cfg.num_kv_heads, cfg.norm_eps
    visible = np.broadcast_to(visible, (cfg.num_layers, cfg.num_kv_heads, T, T))
    x = P["embed"][np.asarray(tokens)]
    keys, values = [], []
    for layer in range(cfg.num_layers):
        w = {name: p[layer] for name, p in P["layers"].items()}
        y = _rms(x, w["attn_norm"], eps)
        q = _rope(np.einsum("td,dhk->thk", y, w["wq"]), positions, cfg.rope_base)
        k = _rope(np.einsum("td,dhk->thk", y, w["wk"]), positions, cfg.rope_base)
        v = np.einsum("td,dhk->thk", y, w["wv"])
        keys.append(k)
        values.append(v)
        o = np.zeros_like(q)
        for hi in range(cfg.num_heads):
            kv_head = hi // rep
            logits = np.where(visible[layer, kv_head], q[:, hi] @ k[:, kv_head].T / np.sqrt(cfg.head_dim), -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            o[:, hi] = (p / p.sum(-1, keepdims=True)) @ v[:, kv_head]
        x = x + np.einsum("thk,hkd->td", o, w["wo"])
        y = _rms(x, w["mlp_norm"], eps)
        gate, up = y @ w["w_gate"], y @ w["w_up"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w["w_down"]
    logits = _rms(x, P["final_norm"], eps) @ P["lm_head"]
    return logits[:, : cfg.vocab_size], np.stack(keys), np.stack(values)


def random_params(cfg, seed, std=0.15):
    """Random parameters of the model's tree. Matrices ~ N(0, std²) and random norm weights: at 0.15 the logits
    are O(1) (so the tolerances mean something); a misplaced norm shows."""
    abstract = params_lib.abstract_params(cfg)
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = [(1.0 + 0.3 * rng.standard_normal(x.shape) if "norm" in jax.tree_util.keystr(p)
               else std * rng.standard_normal(x.shape)).astype(np.float32) for p, x in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def model_config(**kw):
    base = dict(vocab_size=300, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
                dtype="float32")
    return ModelConfig(**{**base, **kw})


@functools.cache
def model_fn(cfg, with_memory=True):
    graphdef = params_lib.graphdef(cfg)
    if with_memory:
        return jax.jit(lambda params, tokens, positions, seg, group, memory: nnx.merge(graphdef, params)(
            tokens, positions, seg, memory_group=group, memory=memory))
    return jax.jit(lambda params, tokens, positions, seg: nnx.merge(graphdef, params)(tokens, positions, seg))


def causal(n):
    return np.tril(np.ones((n, n), bool))


def encode_references(params, cfg, sink, refs):
    """Per-layer post-RoPE keys/values [b, L, REF_LEN, kv, hd] of each reference, from the numpy forward of
    `sink + reference` at positions 0 .. p + REF_LEN - 1 (sliced to the reference's positions)."""
    p = len(sink)
    ks, vs = [], []
    for r in refs:
        _, k, v = numpy_forward(params, cfg, np.concatenate([sink, r]), np.arange(p + REF_LEN), causal(p + REF_LEN))
        ks.append(k[:, p:])
        vs.append(v[:, p:])
    return np.stack(ks), np.stack(vs)


def memory_of(keys, values, index, valid, sink):
    """keys/values [Lm, b, M, mkv, kk, hd] float64 -> a float32 `Memory`."""
    return Memory(keys=jnp.asarray(keys, jnp.float32), values=jnp.asarray(values, jnp.float32),
                  index=jnp.asarray(index, jnp.int32), valid=jnp.asarray(valid, bool),
                  sink_tokens=jnp.asarray(sink, jnp.int32))


# ------------------------------------------------------------------------------------------ model oracles
def test_oracle_full_reference_memory_equals_one_long_sequence():
    """Every key of a 128-token reference in every head of every layer == the plain model on sink + r + c."""
    cfg = model_config(memory_layers=(0, 1), memory_kv_heads=(0, 1), memory_chunk_size=16)
    params = random_params(cfg, 0)
    rng = np.random.default_rng(10)
    b, p, t, V = 2, 3, 40, cfg.vocab_size
    sink = rng.integers(0, V, p)
    refs, ctx = rng.integers(0, V, (b, REF_LEN)), rng.integers(0, V, (b, t))
    k_ref, v_ref = encode_references(params, cfg, sink, refs)  # [b, L, 128, kv, hd]
    to_mem = lambda x: x.transpose(1, 0, 3, 2, 4)[:, :, None]  # -> [L, b, M=1, kv, 128, hd]
    group = np.stack([np.arange(t) // 16, 3 + np.arange(t) // 16]).astype(np.int32)  # 3 groups per row
    index = np.tile(np.array([0, -1]), (b, 6, 1))
    memory = memory_of(to_mem(k_ref), to_mem(v_ref), index, np.ones((b, 1, REF_LEN), bool), sink)
    ctx_pos = np.broadcast_to(p + REF_LEN + np.arange(t), (b, t))
    got = np.asarray(model_fn(cfg)(params, ctx, ctx_pos, np.ones((b, t), np.int32), group, memory))
    assert got.shape == (b, t, cfg.padded_vocab_size)
    got = got[..., :V]

    full = np.concatenate([np.broadcast_to(sink, (b, p)), refs, ctx], 1)
    n = full.shape[1]
    plain = np.asarray(model_fn(cfg, False)(params, full, np.broadcast_to(np.arange(n), (b, n)),
                                            np.ones((b, n), np.int32)))[:, -t:, :V]
    np.testing.assert_allclose(got, plain, atol=1e-4, rtol=1e-4, err_msg="memory model vs plain jax model")
    for bi in range(b):
        ref = numpy_forward(params, cfg, full[bi], np.arange(n), causal(n))[0][-t:]
        np.testing.assert_allclose(got[bi], ref, atol=1e-4, rtol=1e-4, err_msg=f"memory model vs numpy, row {bi}")
        no_mem = numpy_forward(params, cfg, np.concatenate([sink, ctx[bi]]),
                               np.concatenate([np.arange(p), p + REF_LEN + np.arange(t)]), causal(p + t))[0]
        assert np.abs(no_mem[p:] - ref).max() > 0.05  # the memory matters: the comparison is not vacuous


def test_oracle_sparse_memory_equals_masked_sequence():
    """k = 8 kept keys per (memory layer, memory KV head) == the long sequence with the other reference tokens
    hidden from the context in that head, and all of them hidden in non-memory layers and heads."""
    mem_layers, mem_heads, kk, chunk = (0, 2), (0, 2), 8, 16
    cfg = model_config(num_layers=3, num_heads=6, num_kv_heads=3, memory_layers=mem_layers, memory_kv_heads=mem_heads,
                       memory_chunk_size=chunk)
    params = random_params(cfg, 1)
    rng = np.random.default_rng(11)
    b, p, t, V = 2, 3, 40, cfg.vocab_size
    sink = rng.integers(0, V, p)
    refs, ctx = rng.integers(0, V, (b, REF_LEN)), rng.integers(0, V, (b, t))
    k_ref, v_ref = encode_references(params, cfg, sink, refs)  # [b, L, 128, kv, hd]
    # Token 0 (<s>) reads no memory; groups of 16 after it; row 1's middle group retrieved nothing.
    spans = [(1, 17, 0), (17, 33, 1), (33, 40, 2)]
    group = _groups(t, [spans, [(s, e, g + 3) for s, e, g in spans]])
    index = np.zeros((b, 6, 1), np.int32)
    index[1, 4] = -1
    sel = np.stack([[[rng.choice(REF_LEN, kk, replace=False) for _ in mem_heads] for _ in mem_layers]
                    for _ in range(b)])  # [b, Lm, mkv, kk], unsorted
    shape = (len(mem_layers), b, 1, len(mem_heads), kk, cfg.head_dim)
    mem_k, mem_v = np.zeros(shape), np.zeros(shape)
    for bi in range(b):
        for jl, layer in enumerate(mem_layers):
            for jh, head in enumerate(mem_heads):
                mem_k[jl, bi, 0, jh] = k_ref[bi, layer, sel[bi, jl, jh], head]
                mem_v[jl, bi, 0, jh] = v_ref[bi, layer, sel[bi, jl, jh], head]
    memory = memory_of(mem_k, mem_v, index, np.ones((b, 1, kk), bool), sink)
    ctx_pos = np.broadcast_to(p + REF_LEN + np.arange(t), (b, t))
    got = np.asarray(model_fn(cfg)(params, ctx, ctx_pos, np.ones((b, t), np.int32), group, memory))[..., :V]

    n = p + REF_LEN + t
    for bi in range(b):
        vis = np.tile(causal(n), (cfg.num_layers, cfg.num_kv_heads, 1, 1))
        vis[:, :, p + REF_LEN:, p:p + REF_LEN] = False  # the context sees no reference token ...
        for i in range(t):
            g = group[bi, i]
            if g < 0 or index[bi, g, 0] < 0:
                continue
            for jl, layer in enumerate(mem_layers):  # ... except the kept ones, in memory heads of memory layers
                for jh, head in enumerate(mem_heads):
                    vis[layer, head, p + REF_LEN + i, p + sel[bi, jl, jh]] = True
        tokens = np.concatenate([sink, refs[bi], ctx[bi]])
        ref = numpy_forward(params, cfg, tokens, np.arange(n), vis)[0][-t:]
        np.testing.assert_allclose(got[bi], ref, atol=1e-4, rtol=1e-4, err_msg=f"row {bi}")


# ------------------------------------------------------------------------------------------ no memory
def packed_context(rng, p, V):
    """Row 0: segments of 25 and 12 tokens and 3 padding tokens; row 1: one segment. Positions restart at
    p + REF_LEN in each segment; groups of <= 16 tokens restart at each segment."""
    t = 40
    seg = np.array([[1] * 25 + [2] * 12 + [0] * 3, [1] * t], np.int32)
    start = np.array([[0] * 25 + [25] * 12 + [37] * 3, [0] * t])
    pos = p + REF_LEN + np.arange(t)[None] - start
    group = _groups(t, [[(1, 17, 0), (17, 25, 1), (26, 37, 2)], [(1, 17, 3), (17, 33, 4), (33, 40, 5)]])
    return rng.integers(0, V, (2, t)), pos, seg, group


def test_memory_none_is_the_plain_model():
    cfg = model_config(memory_layers=(0, 1), memory_kv_heads=(1,), memory_chunk_size=16)
    plain_cfg = model_config()
    params = random_params(cfg, 2)
    tokens, pos, seg, _ = packed_context(np.random.default_rng(12), 3, cfg.vocab_size)
    plain = np.asarray(model_fn(plain_cfg, False)(params, tokens, pos, seg))
    np.testing.assert_array_equal(np.asarray(model_fn(cfg, False)(params, tokens, pos, seg)), plain)
    np.testing.assert_array_equal(np.asarray(model_fn(cfg)(params, tokens, pos, seg, None, None)), plain)


@pytest.mark.parametrize("kind", ["all_slots_empty", "all_keys_invalid", "Memory.empty"])
def test_no_memories_is_the_plain_model_on_sink_and_context(kind):
    """Nothing retrieved: the context still sees the sink in every head of every layer, and nothing else; the
    (garbage) keys of an empty slot or of invalid positions are never read."""
    cfg = model_config(memory_layers=(0, 1), memory_kv_heads=(0, 1), memory_chunk_size=16)
    params = random_params(cfg, 3)
    rng = np.random.default_rng(13)
    b, p, kk, V = 2, 3, REF_LEN, cfg.vocab_size  # the shapes of the first oracle: its compiled model serves
    sink = rng.integers(0, V, p)
    tokens, pos, seg, group = packed_context(rng, p, V)
    t = tokens.shape[1]
    garbage = 10 * rng.normal(size=(2, b, 1, 2, kk, cfg.head_dim))
    if kind == "all_slots_empty":
        memory = memory_of(garbage, garbage, np.full((b, 6, 2), -1), np.ones((b, 1, kk), bool), sink)
    elif kind == "all_keys_invalid":
        memory = memory_of(garbage, -garbage, np.zeros((b, 6, 2)), np.zeros((b, 1, kk), bool), sink)
    else:
        memory = Memory.empty(sink, batch=b, groups=6, slots=2, memory_layers=2, kv_heads=2, k=kk,
                              head_dim=cfg.head_dim)
    got = np.asarray(model_fn(cfg)(params, tokens, pos, seg, group, memory))[..., :V]

    n = p + t
    for bi in range(b):
        vis = np.zeros((n, n), bool)
        vis[:p, :p] = causal(p)  # the sink sees itself only
        vis[p:, :p] = True  # every context token, of any segment, sees the whole sink
        vis[p:, p:] = causal(t) & (seg[bi][:, None] == seg[bi][None, :])
        ref = numpy_forward(params, cfg, np.concatenate([sink, tokens[bi]]), np.concatenate([np.arange(p), pos[bi]]),
                            vis)[0][p:]
        real = seg[bi] > 0
        np.testing.assert_allclose(got[bi][real], ref[real], atol=1e-4, rtol=1e-4, err_msg=f"row {bi}")
        np.testing.assert_allclose(got[bi][~real], ref[~real], atol=1e-4, rtol=1e-4,
                                   err_msg=f"row {bi}: padding tokens (segment 0) should see the sink too")


def test_check_layout_names_what_breaks_the_contract():
    """The read path's layout contract, checked on host inputs: a group spans at most chunk_size positions and
    reads a memory at most once (the jitted path takes both as given)."""
    group = np.array([[0, 0, 0, 0, 1, 1, 1, -1, -1, 1]])
    index = np.array([[[0, 1, -1], [2, -1, -1]]])
    check_layout(group, index, chunk_size=6)
    with pytest.raises(ValueError, match="row 0, memory group 1: tokens at positions 4…9 span more than chunk_size=5"):
        check_layout(group, index, chunk_size=5)
    with pytest.raises(ValueError, match=r"row 0, memory group 1 reads memory 2 twice \(slots \[2, -1, 2\]\)"):
        check_layout(group, np.array([[[0, 1, -1], [2, -1, 2]]]), chunk_size=6)
    with pytest.raises(ValueError, match="memory_group 2 is out of range: the index has 2 groups"):
        check_layout(np.where(group == 1, 2, group), index, chunk_size=6)


# ------------------------------------------------------------------------------------------ cost
def memory_forward_flops(cfg, *, memories, slots, groups=4, batch=2, seq=64, kk=8, sink_len=3) -> float:
    """FLOPs of the model's forward with memory, from shapes alone (XLA's cost analysis of the lowered program):
    `memories` unique memories per row (M), `groups` x `slots` (G, S) read slots, `kk` keys per memory."""
    graphdef = params_lib.graphdef(cfg)
    # A fresh jit each call, traced anew: a monkeypatched read path is not hidden by a cached trace.
    forward = jax.jit(lambda params, tokens, positions, seg, group, memory: nnx.merge(graphdef, params)(
        tokens, positions, seg, memory_group=group, memory=memory))
    ints = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    kv = jax.ShapeDtypeStruct((len(cfg.memory_layers), batch, memories, len(cfg.memory_kv_heads), kk, cfg.head_dim),
                              jnp.float32)
    memory = Memory(keys=kv, values=kv, index=jax.ShapeDtypeStruct((batch, groups, slots), jnp.int32),
                    valid=jax.ShapeDtypeStruct((batch, memories, kk), bool),
                    sink_tokens=jax.ShapeDtypeStruct((sink_len,), jnp.int32))
    return forward.lower(params_lib.abstract_params(cfg), ints, ints, ints, ints, memory).cost_analysis()["flops"]


def test_memory_read_costs_seq_times_slots_not_unique_memories(monkeypatch):
    """The read path's cost claim (docs/memory.md): O(seq x slots) per head. Doubling a
    row's unique memories M at fixed slots per group leaves the forward's FLOPs unchanged; doubling the slots
    adds exactly the memory matmuls of the new slots (plus their softmax). Negative control: a read path that
    attends to every unique memory in every group costs more with more memories and fails the check."""
    # Layers unrolled: XLA's cost analysis counts the body of a scan's while loop once.
    cfg = model_config(memory_layers=(0, 1), memory_kv_heads=(0, 1), memory_chunk_size=16, scan_layers=False)
    groups, batch, kk = 4, 2, 8  # memory_forward_flops' defaults (G x chunk_size = its seq)

    def assert_flat_in_unique_memories():
        flops = [memory_forward_flops(cfg, memories=m, slots=2) for m in (8, 16, 32)]
        assert flops[0] == flops[1] == flops[2], f"forward FLOPs grow with the unique memories (8, 16, 32): {flops}"

    assert_flat_in_unique_memories()
    added = memory_forward_flops(cfg, memories=8, slots=4) - memory_forward_flops(cfg, memories=8, slots=2)
    # 2 more slots: q.k and p.v over 2·kk more keys, 2·head_dim FLOPs each per query of each memory query head,
    # for the G x chunk_size grid of queries, in every memory layer.
    heads = cfg.num_heads // cfg.num_kv_heads * len(cfg.memory_kv_heads)
    matmuls = len(cfg.memory_layers) * batch * heads * groups * cfg.memory_chunk_size * 2 * kk * 2 * 2 * cfg.head_dim
    assert matmuls <= added <= 1.25 * matmuls, (added, matmuls)

    read_by_slots = attn_lib.memory_attention

    def read_every_memory(qm, mem_k, mem_v, mem_index, *args, **kwargs):
        every = jnp.broadcast_to(jnp.arange(mem_k.shape[1], dtype=jnp.int32), (*mem_index.shape[:2], mem_k.shape[1]))
        return read_by_slots(qm, mem_k, mem_v, every, *args, **kwargs)

    monkeypatch.setattr(attn_lib, "memory_attention", read_every_memory)
    with pytest.raises(AssertionError, match="forward FLOPs grow with the unique memories"):
        assert_flat_in_unique_memories()
