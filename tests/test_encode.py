"""Memory writing (m3jax/memory/encode.py) against the exported Hugging Face Llama.

The oracle is `LlamaForCausalLM` loaded from our float32 export: its post-RoPE queries (captured from its own
`apply_rotary_pos_emb`), its `cache` key/values and its pre-RoPE keys (a hook on `k_proj`). From them a naive
float64 numpy loop computes w_j = Σ_h Σ_i exp(q_i^h · k_j / √d) and the top-k; the stored key/values must be
HF's, gathered at the selected positions; per-document pieces must hold HF's pre-RoPE key rotated by HF's RoPE
at the in-piece position. Also: ties and padding in `select_top_k`, later layers never computed (NaN weights,
matmul FLOPs of the traced encoder), memory-head subsets, and batch sharding over 8 CPU devices.
"""

import functools
from unittest import mock

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from transformers.models.llama import modeling_llama

from m3jax.export import save_hf_llama
from m3jax.memory import encode
from m3jax.model import params as params_lib
from m3jax.model.config import ModelConfig
from m3jax.parallel import DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES

# GQA 4 query heads on 2 KV heads; memory layers 0 and 2 of 4 (layer 3 is never computed, layer 2 stops at q/k/v).
MODEL = dict(vocab_size=300, num_layers=4, hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=80,
             rope_base=10000.0, norm_eps=1e-5, init_std=0.2, dtype="float32", memory_layers=(0, 2),
             memory_kv_heads=(0, 1))
SINK = np.array([1, 17, 42])  # "<s>Reference:" stand-in: p = 3
K, REF_LEN = 8, 128
LENGTHS = np.array([128, 37, 5])  # a full reference, a short one, one with fewer tokens than k
DOC_LEN = 300  # per-document encoding: pieces of 128, 128 and 44 tokens


def random_params(cfg: ModelConfig, seed: int):
    """Numpy parameters of the model's tree; random norm weights expose a misplaced norm."""
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(params_lib.abstract_params(cfg))
    leaves = [(1.0 + 0.5 * rng.standard_normal(x.shape) if "norm" in jax.tree_util.keystr(p)
               else cfg.init_std * rng.standard_normal(x.shape)).astype(np.float32) for p, x in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def hf_internals(model, ids):
    """One HF forward of `ids` [T] at positions 0..T-1 -> per layer float64 arrays: q (post-RoPE) [T, h, d],
    k (post-RoPE, from the cache) [T, kv, d], v [T, kv, d], k_pre (before RoPE) [T, kv, d]."""
    captured, pre_keys = [], []
    rope = modeling_llama.apply_rotary_pos_emb

    def capture(q, k, cos, sin, *args, **kwargs):
        out = rope(q, k, cos, sin, *args, **kwargs)
        captured.append(out[0])
        return out

    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: pre_keys.append(o))
             for layer in model.model.layers]
    try:
        with mock.patch.object(modeling_llama, "apply_rotary_pos_emb", capture), torch.no_grad():
            out = model(input_ids=torch.as_tensor(ids[None], dtype=torch.long), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    cfg, T = model.config, len(ids)
    f64 = lambda x: x.double().numpy()  # noqa: E731
    layers = []
    for i, layer in enumerate(out.cache.layers):
        # transformers 5.x DynamicCache: layers[i].keys / .values are [batch, kv_heads, seq, head_dim]
        assert layer.keys.shape == (1, cfg.num_key_value_heads, T, cfg.head_dim)
        layers.append(dict(q=f64(captured[i][0]).transpose(1, 0, 2), k=f64(layer.keys[0]).transpose(1, 0, 2),
                           v=f64(layer.values[0]).transpose(1, 0, 2),
                           k_pre=f64(pre_keys[i][0]).reshape(T, cfg.num_key_value_heads, cfg.head_dim)))
    assert len(layers) == cfg.num_hidden_layers
    return layers


def hf_rope(model, x, positions):
    """HF's own RoPE of x [T, heads, d] at integer positions [T] (float64 in, float64 out)."""
    xt = torch.as_tensor(x, dtype=torch.float32).transpose(0, 1)[None]  # [1, heads, T, d]
    cos, sin = model.model.rotary_emb(xt, torch.as_tensor(np.array(positions)[None], dtype=torch.long))
    out, _ = modeling_llama.apply_rotary_pos_emb(xt, xt, cos, sin)
    return out[0].transpose(0, 1).double().numpy()


def naive_log_scores(q, k, lo, hi, kv_head, group):
    """log w_j for the tokens j of [lo, hi): loops over keys and query heads, queries i of [lo, hi), float64."""
    d = q.shape[-1]
    w = np.zeros(hi - lo)
    for j in range(lo, hi):
        for h in range(kv_head * group, (kv_head + 1) * group):
            w[j - lo] += np.exp(q[lo:hi, h] @ k[j, kv_head] / np.sqrt(d)).sum()
    return np.log(w)


def assert_top_k(got, log_w, k, tol=1e-5):
    """got: the encoder's selected offsets (sorted, -1 padded) of tokens whose naive log scores are log_w. The
    top-k must be exactly the naive one, except that tokens within `tol` of the k-th score may trade places."""
    n = min(k, len(log_w))
    assert np.all(got[n:] == -1), got
    sel = got[:n]
    assert np.all(np.diff(sel) > 0) and sel.min() >= 0, sel
    kth = np.sort(log_w)[::-1][n - 1]
    chosen = np.zeros(len(log_w), bool)
    chosen[sel] = True
    assert chosen[log_w > kth + tol].all() and not chosen[log_w < kth - tol].any(), (sel, np.argsort(-log_w)[:n])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """cfg, params, the HF model of the export, reference tokens and the encoder's output for them."""
    cfg = ModelConfig(**MODEL)
    params = random_params(cfg, 0)
    out = tmp_path_factory.mktemp("hf_encode")
    save_hf_llama(params, cfg, out, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (len(LENGTHS), REF_LEN))
    tokens[np.arange(REF_LEN)[None] >= LENGTHS[:, None]] = -1  # padding: any value past the length is ignored
    kv, positions = encode.encode_references(params, cfg, tokens, LENGTHS, SINK, k=K)
    return dict(cfg=cfg, params=params, model=model, tokens=tokens, kv=np.asarray(kv),
                positions=np.asarray(positions))


def test_output_shapes_and_padding(setup):
    cfg, kv, positions = setup["cfg"], setup["kv"], setup["positions"]
    assert kv.shape == (3, 2, 2, 2, K, cfg.head_dim) and kv.dtype == np.float32
    assert positions.shape == (3, 2, 2, K) and positions.dtype == np.int32
    p = len(SINK)
    for r, n in enumerate(LENGTHS):
        kept = positions[r] >= 0
        assert (kept.sum(-1) == min(K, n)).all()
        assert (positions[r][kept] >= p).all() and (positions[r][kept] < p + n).all()
        assert (kv[r][:, 0][~kept] == 0).all() and (kv[r][:, 1][~kept] == 0).all()  # padding: zero key/values


def test_selection_equals_naive_scores_of_hf_internals(setup):
    """The kept positions are the top-k of w_j computed naively from HF's post-RoPE queries and keys."""
    cfg, model, positions = setup["cfg"], setup["model"], setup["positions"]
    p, group = len(SINK), cfg.num_groups
    for r, n in enumerate(LENGTHS):
        hf = hf_internals(model, np.concatenate([SINK, setup["tokens"][r, :n]]))
        for jl, layer in enumerate(cfg.memory_layers):
            for jh, head in enumerate(cfg.memory_kv_heads):
                log_w = naive_log_scores(hf[layer]["q"], hf[layer]["k"], p, p + n, head, group)
                got = positions[r, jl, jh]
                assert_top_k(np.where(got >= 0, got - p, -1), log_w, K)


def test_kv_equals_hf_cache_sparsified(setup):
    """Stored keys (post-RoPE) and values == HF's cache for sink + reference, gathered at the kept positions."""
    cfg, model, kv, positions = setup["cfg"], setup["model"], setup["kv"], setup["positions"]
    for r, n in enumerate(LENGTHS):
        hf = hf_internals(model, np.concatenate([SINK, setup["tokens"][r, :n]]))
        for jl, layer in enumerate(cfg.memory_layers):
            for jh, head in enumerate(cfg.memory_kv_heads):
                pos = positions[r, jl, jh]
                pos = pos[pos >= 0]
                assert np.abs(hf[layer]["k"][pos, head]).max() > 0.5  # O(1) keys: the tolerance means something
                np.testing.assert_allclose(kv[r, jl, 0, jh, : len(pos)], hf[layer]["k"][pos, head], atol=1e-4)
                np.testing.assert_allclose(kv[r, jl, 1, jh, : len(pos)], hf[layer]["v"][pos, head], atol=1e-4)


def test_select_top_k_ties_and_masking():
    """Equal scores go to the lower position; masked tokens are never kept; short sequences pad at the end."""
    b, t, kv, g, d = 2, 10, 2, 3, 4
    q, keys = np.zeros((b, t, kv, g, d), np.float32), np.ones((b, t, kv, d), np.float32)  # every score equal
    mask = np.array([[0, 1, 1, 0, 1, 1, 1, 1, 0, 0], [1] * 10], bool)
    select = jax.jit(encode.select_top_k, static_argnums=3)
    index, kept = select(q, keys, mask, 3)
    np.testing.assert_array_equal(index, [[[1, 2, 4]] * kv, [[0, 1, 2]] * kv])
    assert np.asarray(kept).all()
    index, kept = select(q, keys, mask, 8)  # row 0 has 6 tokens only
    np.testing.assert_array_equal(np.asarray(index)[0, :, :6], [[1, 2, 4, 5, 6, 7]] * kv)
    np.testing.assert_array_equal(kept[0], [[True] * 6 + [False] * 2] * kv)
    # Scores decide over position: a large key wins wherever it is; no causal mask (the last token can win).
    keys[0, 7, 1], q[0, 1:, 1] = 3.0, 1.0
    index, _ = select(q, keys, mask, 1)
    assert int(index[0, 1, 0]) == 7 and int(index[0, 0, 0]) == 1
    with pytest.raises(ValueError, match="k=11"):
        encode.select_top_k(q, keys, mask, 11)


def test_later_layers_never_read(setup):
    """NaN in the last memory layer's attention output and MLP, in every later layer and in the head: the same
    memories, bit for bit."""
    cfg, params = setup["cfg"], jax.tree.map(np.copy, setup["params"])
    last = max(cfg.memory_layers)
    for name, w in params["layers"].items():
        w[last + 1:] = np.nan
        if name not in ("attn_norm", "wq", "wk", "wv"):
            w[last] = np.nan
    params["final_norm"][:] = np.nan
    params["lm_head"][:] = np.nan
    kv, positions = encode.encode_references(params, cfg, setup["tokens"], LENGTHS, SINK, k=K)
    np.testing.assert_array_equal(np.asarray(positions), setup["positions"])
    np.testing.assert_array_equal(np.asarray(kv), setup["kv"])


def _matmul_flops(jaxpr) -> int:
    """2·M·N·K of every dot_general, scan bodies counted `length` times."""
    total = 0
    for eqn in jaxpr.eqns:
        assert eqn.primitive.name != "while", "a loop of unknown trip count"
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    total += times * _matmul_flops(sub)
    return total


def test_later_layers_not_computed_flops():
    """The traced encoder's matmul FLOPs do not grow with the layers after the last memory layer."""

    def flops(**kw):
        cfg = ModelConfig(**{**MODEL, **kw})
        fn = functools.partial(encode.encode, cfg=cfg, k=K, ref_len=REF_LEN, rules=DEFAULT_LOGICAL_AXIS_RULES)
        spec = lambda shape: jax.ShapeDtypeStruct(shape, np.int32)  # noqa: E731
        jaxpr = jax.make_jaxpr(fn)(params_lib.abstract_params(cfg), spec((3, REF_LEN)), spec((3,)), spec((len(SINK),)))
        return _matmul_flops(jaxpr.jaxpr)

    base = flops()
    assert base > 0
    assert flops(num_layers=12) == base
    assert flops(memory_layers=(0, 3)) > base


def test_memory_layer_and_head_subset(setup):
    """Another memory layout over the same parameters stores the matching slice of the full layout."""
    cfg = ModelConfig(**{**MODEL, "memory_layers": (2,), "memory_kv_heads": (1,)})
    kv, positions = encode.encode_references(setup["params"], cfg, setup["tokens"], LENGTHS, SINK, k=K)
    np.testing.assert_array_equal(np.asarray(positions), setup["positions"][:, 1:, 1:])
    np.testing.assert_allclose(np.asarray(kv), setup["kv"][:, 1:, :, 1:], atol=1e-5)


def test_document_pieces_rerotated_and_selected_within_piece(setup):
    """Remark 3: one forward over sink + a 300-token document; each 128-token piece keeps the top-k of w_j over
    its own queries and keys, and stores HF's pre-RoPE key rotated by HF's RoPE at the in-piece position."""
    cfg, model = setup["cfg"], setup["model"]
    p, group = len(SINK), cfg.num_groups
    doc = np.random.default_rng(2).integers(0, cfg.vocab_size, DOC_LEN)
    kv, positions = encode.encode_documents(setup["params"], cfg, doc[None], [DOC_LEN], SINK, k=K)
    kv, positions = np.asarray(kv)[0], np.asarray(positions)[0]
    assert kv.shape == (3, 2, 2, 2, K, cfg.head_dim) and positions.shape == (3, 2, 2, K)
    hf = hf_internals(model, np.concatenate([SINK, doc]))
    for c in range(3):
        lo = p + REF_LEN * c  # the piece's first token in the document forward
        n = min(REF_LEN, DOC_LEN - REF_LEN * c)
        for jl, layer in enumerate(cfg.memory_layers):
            for jh, head in enumerate(cfg.memory_kv_heads):
                got = positions[c, jl, jh]
                assert_top_k(np.where(got >= 0, got - p, -1), naive_log_scores(hf[layer]["q"], hf[layer]["k"], lo,
                                                                              lo + n, head, group), K)
                rows = lo + got - p  # the kept tokens' places in the document forward
                want = hf_rope(model, hf[layer]["k_pre"][rows, head][:, None], got)[:, 0]
                np.testing.assert_allclose(kv[c, jl, 0, jh], want, atol=1e-4)
                np.testing.assert_allclose(kv[c, jl, 1, jh], hf[layer]["v"][rows, head], atol=1e-4)
                if c > 0:  # not the key at its document position: the re-rotation did something
                    assert np.abs(kv[c, jl, 0, jh] - hf[layer]["k"][rows, head]).max() > 0.1


def test_document_of_one_piece_is_a_reference(setup):
    """Documents of at most 128 tokens (128, 37 and 5 here) encode exactly as references."""
    kv, positions = encode.encode_documents(setup["params"], setup["cfg"], setup["tokens"], LENGTHS, SINK, k=K)
    np.testing.assert_array_equal(np.asarray(positions)[:, 0], setup["positions"])
    np.testing.assert_array_equal(np.asarray(kv)[:, 0], setup["kv"])


def test_accepts_a_transformer(setup):
    model = nnx.merge(params_lib.graphdef(setup["cfg"]), setup["params"])
    kv, positions = encode.encode_references(model, setup["cfg"], setup["tokens"], LENGTHS, SINK, k=K)
    np.testing.assert_array_equal(np.asarray(positions), setup["positions"])
    np.testing.assert_array_equal(np.asarray(kv), setup["kv"])


def test_batch_sharded_over_8_devices(setup):
    """A mesh shards the batch over (data, fsdp); the memories equal the single-device ones."""
    devices = jax.devices()
    assert len(devices) >= 8, "tests/conftest.py provides 8 fake CPU devices"
    mesh = jax.make_mesh((4, 2, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:8])
    rows = np.arange(8) % 3
    tokens, lengths = setup["tokens"][rows], LENGTHS[rows]
    kv, positions = encode.encode_references(setup["params"], setup["cfg"], tokens, lengths, SINK, k=K, mesh=mesh)
    want = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    assert kv.sharding.is_equivalent_to(want, kv.ndim) and positions.sharding.is_equivalent_to(want, 4)
    np.testing.assert_array_equal(np.asarray(positions), setup["positions"][rows])
    np.testing.assert_allclose(np.asarray(kv), setup["kv"][rows], atol=1e-5)
    with pytest.raises(ValueError, match="does not divide over 8"):
        encode.encode_references(setup["params"], setup["cfg"], tokens[:6], lengths[:6], SINK, k=K, mesh=mesh)
