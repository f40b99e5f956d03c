"""Fused attention kernels (config.model.attention) against independent references, in Pallas's interpreter.

- The kernel alone: causal attention within packed segments (padding included), GQA, its output and natural-log
  LSE against a float64 numpy loop, and gradients of a loss that uses both the output and the LSE (the exact LSE
  VJP of m3jax.model.kernels) against a naive jnp reference written here.
- The model: splash / pallas_gpu against the XLA path, logits and parameter gradients, plain and reading memory
  (sink, memory heads on a subset of KV heads, packed segments).
- Sharded: the 8-device train step with splash equals the single-device XLA step; the memory forward with splash
  under a mesh equals it without one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from test_memory import _groups, model_config, random_params
from test_model import assert_same_training, run_steps

from m3jax.config import ConfigError, validate
from m3jax.model import attention as attn_lib
from m3jax.model import kernels
from m3jax.model import params as params_lib
from m3jax.model.config import ModelConfig
from m3jax.model.memory import Memory
from m3jax.parallel import DEFAULT_LOGICAL_AXIS_RULES, axis_rules, make_mesh

IMPLS = ("splash", "pallas_gpu")


def numpy_attention_lse(q, k, v, seg):
    """Head-major q [b, kv, g, t, d], k, v [b, kv, t, d]: (out, natural-log LSE) by explicit loops, float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, kv, g, t, d = q.shape
    out, lse = np.zeros(q.shape), np.zeros(q.shape[:-1])
    for bi in range(b):
        for h in range(kv):
            for gi in range(g):
                for i in range(t):
                    keys = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]]
                    logits = k[bi, h, keys] @ q[bi, h, gi, i] / np.sqrt(d)
                    m = logits.max()
                    e = np.exp(logits - m)
                    out[bi, h, gi, i] = e @ v[bi, h, keys] / e.sum()
                    lse[bi, h, gi, i] = m + np.log(e.sum())
    return out, lse


def jnp_attention_lse(q, k, v, seg):
    """A naive jnp reference for gradients: full [t, t] logits, -inf mask, jax.nn.logsumexp."""
    t, d = q.shape[3], q.shape[4]
    logits = jnp.einsum("bkgtd,bksd->bkgts", q, k) / np.sqrt(d)
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    logits = jnp.where(allowed[:, None, None], logits, -jnp.inf)
    return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(logits, -1), v), jax.nn.logsumexp(logits, -1)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_matches_references_values_lse_and_gradients(impl):
    rng = np.random.default_rng(len(impl))
    b, kv, g, t, d = 2, 2, 2, 128, 16
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, kv, g, t, d), (b, kv, t, d),
                                                                         (b, kv, t, d)))
    seg = np.array([[1] * 50 + [2] * 70 + [0] * 8, [3] * t], np.int32)  # packed, padding, one long segment
    kernel = kernels.get(impl, interpret=True)
    out, lse = kernels.context_attention(kernel, q, k, v, jnp.asarray(seg), with_lse=True)
    ref_out, ref_lse = numpy_attention_lse(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=2e-5)

    w_out = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal(lse.shape), jnp.float32)

    def loss(fn, *args):
        o, s = fn(*args)
        return jnp.sum(o * w_out) + jnp.sum(s * w_lse)

    fused = jax.grad(lambda *a: loss(lambda *x: kernels.context_attention(kernel, *x, jnp.asarray(seg),
                                                                          with_lse=True), *a), (0, 1, 2))(q, k, v)
    naive = jax.grad(lambda *a: loss(jnp_attention_lse, *a, jnp.asarray(seg)), (0, 1, 2))(q, k, v)
    lse_only = jax.grad(lambda *a: jnp.sum(jnp_attention_lse(*a, jnp.asarray(seg))[1] * w_lse), (0, 1, 2))(q, k, v)
    for name, a, r, extra in zip("qkv", fused, naive, lse_only, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, err_msg=f"d{name}")
        if name != "v":  # the LSE's own gradient is large enough that dropping it would fail the check above
            assert float(jnp.abs(extra).max()) > 0.1, name

    plain = jax.grad(lambda q, k, v: jnp.sum(kernels.context_attention(kernel, q, k, v, jnp.asarray(seg),
                                                                       with_lse=False) * w_out), (0, 1, 2))(q, k, v)
    naive = jax.grad(lambda q, k, v: jnp.sum(jnp_attention_lse(q, k, v, jnp.asarray(seg))[0] * w_out), (0, 1, 2))(
        q, k, v)
    for a, r in zip(plain, naive, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5)


def memory_inputs(cfg: ModelConfig, rng, b: int, t: int, p: int = 3):
    """A packed context of t tokens (two documents and padding in row 0) with its memory groups, and a Memory of
    random key/values (some slots empty, one memory with padding keys)."""
    V = cfg.vocab_size
    cut, pad = 70, 6
    seg = np.array([[1] * cut + [2] * (t - cut - pad) + [0] * pad, [1] * t], np.int32)
    start = np.where(seg == 2, cut, np.where(seg == 0, t - pad, 0))  # positions restart in each document
    pos = (p + cfg.memory_ref_len + np.arange(t)[None] - start).astype(np.int32)
    spans0 = [(1, 33, 0), (33, 65, 1), (71, 103, 2)]
    spans1 = [(1, 33, 3), (33, 65, 4), (65, 97, 5), (97, t, 6)]
    group = _groups(t, [spans0, spans1])
    M, S, kk, lm, mkv = 4, 2, cfg.memory_k, len(cfg.memory_layers), len(cfg.memory_kv_heads)
    index = rng.integers(0, M, (b, 7, S)).astype(np.int32)
    index[:, :, 1] = np.where(index[:, :, 0] == M - 1, -1, (index[:, :, 0] + 1) % M)
    valid = np.ones((b, M, kk), bool)
    valid[0, 1, kk - 3:] = False
    shape = (lm, b, M, mkv, kk, cfg.head_dim)
    memory = Memory(keys=jnp.asarray(rng.standard_normal(shape), jnp.float32),
                    values=jnp.asarray(rng.standard_normal(shape), jnp.float32), index=jnp.asarray(index),
                    valid=jnp.asarray(valid), sink_tokens=jnp.asarray(rng.integers(0, V, p), jnp.int32))
    tokens = rng.integers(0, V, (b, t)).astype(np.int32)
    return tokens, pos, seg, group, memory


def logits_and_grads(cfg: ModelConfig, params, tokens, pos, seg, group=None, memory=None):
    """The model's logits and the gradient of a weighted sum of them w.r.t. every parameter."""
    graphdef = params_lib.graphdef(cfg)
    w = jnp.asarray(np.random.default_rng(7).standard_normal((*tokens.shape, cfg.padded_vocab_size)), jnp.float32)
    w = jnp.where(jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size, w, 0.0)

    def f(params):
        logits = nnx.merge(graphdef, params)(tokens, pos, seg, memory_group=group, memory=memory)
        return jnp.sum(logits * w), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return np.asarray(logits)[..., :cfg.vocab_size], grads


def assert_same(got, ref, what: str):
    (lg, gg), (lr, gr) = got, ref
    np.testing.assert_allclose(lg, lr, atol=2e-4, rtol=2e-4, err_msg=f"{what}: logits")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gg), jax.tree.leaves(gr), strict=True):
        scale = float(np.abs(b).max()) + 1e-6
        err = float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
        assert err < 1e-4, f"{what}: d{jax.tree_util.keystr(path)} differs by {err:.2g} of its largest entry"


@pytest.mark.parametrize("impl", IMPLS)
def test_model_with_fused_attention_equals_xla_path(impl):
    """Logits and parameter gradients reading memory with the sink, packed segments, memory heads on KV head 1 of 2
    in layer 0 of 2 (GQA: 4 query heads). (The plain model's kernel path: the kernel test above, and for splash the
    sharded train step below.)"""
    base = dict(memory_layers=(0,), memory_kv_heads=(1,), memory_chunk_size=32)
    xla, fused = model_config(**base), model_config(**base, attention=impl, attention_interpret=True)
    params = random_params(xla, 3)
    tokens, pos, seg, group, memory = memory_inputs(xla, np.random.default_rng(4), b=2, t=128)
    with_memory = logits_and_grads(xla, params, tokens, pos, seg, group, memory)
    assert_same(logits_and_grads(fused, params, tokens, pos, seg, group, memory), with_memory, f"{impl}, memory")
    plain = np.asarray(params_lib.model_from(xla, params)(tokens, pos, seg))[..., :xla.vocab_size]
    assert np.abs(with_memory[0] - plain).max() > 0.05  # the memory and the sink matter: not a vacuous check


@pytest.mark.slow
def test_sharded_fused_attention_equals_single_device():
    """The warm-up train step with splash on a (data 2, fsdp 2, tensor 2) mesh == the single-device XLA step; the
    memory forward and gradients with splash under that mesh (rules active) == the single-device XLA ones."""
    config = tiny_config(attention="splash", attention_interpret=True)
    config.data.seq_len = 128
    config.data.global_batch_size = 4
    sharded = run_steps(config, dict(data=2, fsdp=2, tensor=2), None, steps=1)
    config.model.update(attention="xla", attention_interpret=False)
    assert_same_training(sharded, run_steps(config, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], steps=1))

    base = dict(memory_layers=(0, 1), memory_kv_heads=(0, 1), memory_chunk_size=32)
    xla, fused = model_config(**base), model_config(**base, attention="splash", attention_interpret=True)
    params = random_params(xla, 5)
    # Four rows: the batch divides data x fsdp (as the trainer requires; XLA's padding of an uneven batch shard
    # would leak the padded rows' gradient into embedding row 0).
    halves = [memory_inputs(xla, np.random.default_rng(seed), b=2, t=128) for seed in (6, 7)]
    tokens, pos, seg, group = (np.concatenate([halves[0][i], halves[1][i]]) for i in range(4))
    m0, m1 = halves[0][4], halves[1][4]
    memory = m0.replace(keys=jnp.concatenate([m0.keys, m1.keys], 1), values=jnp.concatenate([m0.values, m1.values], 1),
                        index=jnp.concatenate([m0.index, m1.index]), valid=jnp.concatenate([m0.valid, m1.valid]))
    ref = logits_and_grads(xla, params, tokens, pos, seg, group, memory)
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})), axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
        got = logits_and_grads(fused, params, tokens, pos, seg, group, memory)
    assert_same(got, ref, "splash under a mesh")


def test_auto_resolves_per_platform_and_a_kernel_of_another_platform_is_named():
    assert [kernels.resolve("auto", p) for p in ("tpu", "gpu", "cpu")] == ["splash", "xla", "xla"]
    assert kernels.resolve("pallas_gpu", "gpu") == "pallas_gpu" and kernels.resolve("splash", "cpu", True) == "splash"
    with pytest.raises(ValueError, match=r"config.model.attention='splash' is a TPU kernel, but this job runs on gpu"):
        ModelConfig.from_config(tiny_config(attention="splash").model, platform="gpu")
    # An evaluation of a checkpoint trained with splash, on this CPU: the XLA path.
    cfg = ModelConfig.from_config(tiny_config(attention="splash").model, attention_fallback=True)
    assert cfg.attention == "xla"
    assert ModelConfig.from_config(tiny_config().model).attention == "xla"  # the default, "auto", on CPU


def test_a_sequence_the_kernel_does_not_take_runs_the_xla_path():
    """A 40-token prompt (not a multiple of 128) with splash configured: the XLA path, the same logits."""
    fused, xla = model_config(attention="splash", attention_interpret=True), model_config()
    params = random_params(xla, 8)
    rng = np.random.default_rng(8)
    tokens, pos, seg = rng.integers(0, 300, (2, 40)), np.tile(np.arange(40), (2, 1)), np.ones((2, 40), np.int32)
    np.testing.assert_array_equal(np.asarray(params_lib.model_from(fused, params)(tokens, pos, seg)),
                                  np.asarray(params_lib.model_from(xla, params)(tokens, pos, seg)))


def test_bad_attention_settings_are_named():
    config = tiny_config(attention="flash")
    with pytest.raises(ConfigError, match=r"config.model.attention: must be one of \('auto', 'xla', 'splash'"):
        validate(config)
    kernel = kernels.get("splash", interpret=True)
    q = jnp.zeros((1, 1, 1, 96, 16))
    k = jnp.zeros((1, 1, 96, 16))
    with pytest.raises(ValueError, match=r"splash attention needs a sequence length that is a multiple of 128, "
                                         r"got 96 \(data.seq_len"):
        kernels.context_attention(kernel, q, k, k, jnp.ones((1, 96), jnp.int32), with_lse=False)


def test_the_xla_reference_is_what_the_kernels_are_checked_against():
    """The XLA path (the reference of the model-level checks) against the numpy loop, with its LSE."""
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 2, 2, 40, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 2, 40, 8)).astype(np.float32) for _ in range(2))
    seg = np.sort(rng.integers(0, 3, (2, 40)), axis=1).astype(np.int32)
    out, lse = attn_lib.attention_core(q, k, v, attn_lib.attention_mask(jnp.asarray(seg), jnp.asarray(seg)))
    ref_out, ref_lse = numpy_attention_lse(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=2e-5)


def test_a_training_sequence_the_kernel_does_not_take_is_refused_up_front():
    from m3jax.train.step import Trainer

    config = tiny_config(attention="splash", attention_interpret=True)  # data.seq_len = 32
    with pytest.raises(ConfigError, match=r"config.data.seq_len: 32 is not a multiple of 128, which "
                                          r"config.model.attention='splash' \(splash on cpu\) needs"):
        Trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
