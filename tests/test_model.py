"""The model's math against naive references, and the sharded train step against the single-device step."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from test_memory import random_params

from m3jax.model import ModelConfig, Transformer
from m3jax.model import attention as attn_lib
from m3jax.model import params as params_lib
from m3jax.parallel import make_mesh
from m3jax.train.step import Trainer


def numpy_attention(q, k, v, seg):
    """Independent reference: explicit loops over batch and heads, float64, kv head = h // group."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi] @ k[bi, :, hi // group].T / np.sqrt(d)
            allowed = np.tril(np.ones((t, t), bool)) & (seg[bi][:, None] == seg[bi][None, :])
            logits = np.where(allowed, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, hi] = p @ v[bi, :, hi // group]
    return out


def jnp_attention_repeat_kv(q, k, v, seg):
    """A second, differently structured reference (repeat KV heads, full-width softmax) for gradients."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    t = q.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    logits = jnp.where(allowed[:, None], logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


@pytest.mark.parametrize("heads,kv_heads,t", [(4, 4, 9), (8, 2, 17), (6, 1, 5)])
def test_attention_matches_naive_values_and_grads(heads, kv_heads, t):
    rng = np.random.default_rng(heads * 100 + t)
    b, d = 2, 8
    q = rng.normal(size=(b, t, heads, d)).astype(np.float32)
    k = rng.normal(size=(b, t, kv_heads, d)).astype(np.float32)
    v = rng.normal(size=(b, t, kv_heads, d)).astype(np.float32)
    seg = np.sort(rng.integers(1, 4, size=(b, t)), axis=1).astype(np.int32)
    mask = attn_lib.attention_mask(jnp.asarray(seg), jnp.asarray(seg))
    out = attn_lib.dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, seg), atol=2e-5, rtol=1e-5)

    w = rng.normal(size=out.shape).astype(np.float32)
    g_fast = jax.grad(lambda *a: jnp.sum(attn_lib.dot_product_attention(*a, mask) * w), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(jnp_attention_repeat_kv(*a, jnp.asarray(seg)) * w), argnums=(0, 1, 2))(
        q, k, v)
    for a, r in zip(g_fast, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, rtol=1e-4)


def test_rope_matches_complex_rotation():
    """rotate-half RoPE == multiplying (x_i, x_{i+d/2}) as a complex number by e^{i·pos·θ_i}."""
    rng = np.random.default_rng(0)
    b, t, h, d, base = 2, 7, 3, 16, 50000.0
    x = rng.normal(size=(b, t, h, d)).astype(np.float32)
    pos = rng.integers(0, 1000, size=(b, t))
    cos, sin = attn_lib.rope_frequencies(jnp.asarray(pos), d, base)
    out = np.asarray(attn_lib.apply_rope(jnp.asarray(x), cos, sin))
    theta = base ** (-np.arange(0, d, 2) / d)
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * pos[:, :, None, None] * theta)
    np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), atol=2e-4)


def random_batch(config, seed=0, n=None):
    rng = np.random.default_rng(seed)
    n = n or config.data.global_batch_size
    L = config.data.seq_len
    # Two documents per row at a random cut, positions restarting at the boundary.
    cut = rng.integers(1, L, size=n)
    idx = np.arange(L)[None]
    seg = np.where(idx < cut[:, None], 1, 2).astype(np.int32)
    pos = np.where(idx < cut[:, None], idx, idx - cut[:, None]).astype(np.int32)
    return {
        "inputs": rng.integers(0, config.model.vocab_size, (n, L)).astype(np.int32),
        "targets": rng.integers(0, config.model.vocab_size, (n, L)).astype(np.int32),
        "segment_ids": seg,
        "positions": pos,
        "loss_weights": (rng.random((n, L)) > 0.1).astype(np.int32),
    }


class Run(NamedTuple):
    """What a few train steps leave: per-step losses and gradient norms, the parameters, AdamW's first moment."""

    losses: list[float]
    grad_norms: list[float]
    params: dict
    mu: dict


def run_steps(config, mesh_sizes, devices, steps=3) -> Run:
    config.mesh.update(mesh_sizes)
    trainer = Trainer(config, make_mesh(config.mesh, devices))
    state = trainer.init_state()
    metrics = []
    for i in range(steps):
        state, m = trainer.train_step(state, trainer.global_batch(random_batch(config, seed=i)))
        metrics.append(m)
    return Run(losses=[float(m["loss"]) for m in metrics], grad_norms=[float(m["grad_norm"]) for m in metrics],
               params=jax.device_get(state.params), mu=jax.device_get(optax.tree.get(state.opt_state, "mu")))


def max_param_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| over all leaves of two trees."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in pairs) / sum(np.sum(y**2) for _, y in pairs)))


def assert_same_training(run: Run, ref: Run):
    """The same training, gradient scale included. AdamW normalises a constant scale of the gradient away and
    clipping caps it, so losses and parameters alone would not see one; the gradient norms and the first moment
    (the clipped gradients the optimiser averaged) do."""
    np.testing.assert_allclose(run.losses, ref.losses, rtol=1e-5, err_msg="losses")
    np.testing.assert_allclose(run.grad_norms, ref.grad_norms, rtol=1e-5, err_msg="gradient norms")
    mu_error = relative_error(run.mu, ref.mu)
    assert mu_error < 1e-5, f"AdamW first moments differ by {mu_error:.3g} (relative)"
    assert max_param_diff(run.params, ref.params) < 1e-5


def test_sharded_step_equals_single_device():
    config = tiny_config()
    single = run_steps(config, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    sharded = run_steps(config, dict(data=2, fsdp=2, tensor=2), None)
    assert_same_training(sharded, single)
    assert single.losses[0] != single.losses[-1]  # it trained


def test_grad_accumulation_equals_full_batch():
    config = tiny_config()
    full = run_steps(config, dict(data=-1, fsdp=1, tensor=1), jax.devices()[:2])
    config.optimizer.grad_accum_steps = 2
    accum = run_steps(config, dict(data=-1, fsdp=1, tensor=1), jax.devices()[:2])
    assert_same_training(accum, full)


def test_remat_and_unscanned_layers_change_nothing():
    base = run_steps(tiny_config(), dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], steps=2)
    for variant in (dict(remat="full"), dict(remat="dots"), dict(scan_layers=False)):
        other = run_steps(tiny_config(**variant), dict(data=1, fsdp=1, tensor=1), jax.devices()[:1], steps=2)
        np.testing.assert_allclose(other.losses, base.losses, rtol=1e-5)
        assert max_param_diff(other.params, base.params) < 1e-5, variant


def forward_logits(cfg: ModelConfig, params, batch) -> np.ndarray:
    """The model's logits [b, t, vocab_size] (padding rows of the vocabulary dropped)."""
    fn = jax.jit(lambda p, b: params_lib.model_from(cfg, p)(b["inputs"], b["positions"], b["segment_ids"]))
    return np.asarray(fn(params, batch))[..., : cfg.vocab_size]


def assert_bf16_logits_close(bf16: np.ndarray, f32: np.ndarray):
    """bf16 logits within bf16's error of float32's: the error is a few % of the logits' spread over the vocab."""
    error = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32 - f32.mean(-1, keepdims=True))
    assert error < 0.05, f"bf16 logits differ from float32 by {error:.3f} of their spread"


def test_bf16_compute_close_to_float32(monkeypatch):
    """bf16 activations against float32 where the outputs carry information: parameters at std 0.25 put the
    predictions ~2 nats below uniform (at initialisation every model sits at ln(vocab), and so would a bf16 path
    that lost the signal). The logits agree to bf16 precision, the sharded bf16 train step's loss is the float32
    cross-entropy, and the parameters stay float32. Negative control: uniform bf16 logits fail the logits check."""
    config = tiny_config(dtype="bfloat16")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    f32_cfg = ModelConfig.from_config(tiny_config().model)
    params = random_params(f32_cfg, 0, std=0.25)
    batch = random_batch(config)
    f32 = forward_logits(f32_cfg, params, batch)
    log_probs = np.asarray(jax.nn.log_softmax(f32, -1))
    entropy = -np.sum(np.exp(log_probs) * log_probs, -1).mean()
    assert entropy < np.log(f32_cfg.vocab_size) - 1.5, f"float32 predictions are near uniform: entropy {entropy}"

    trainer = Trainer(config, make_mesh(config.mesh))
    assert_bf16_logits_close(forward_logits(trainer.model_cfg, params, batch), f32)
    state, metrics = trainer.train_step(trainer.state_from_params(params), trainer.global_batch(batch))
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    f32_loss = np.sum(nll * batch["loss_weights"]) / np.sum(batch["loss_weights"])
    np.testing.assert_allclose(float(metrics["loss"]), f32_loss, rtol=5e-3)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))  # float32 parameters

    def uniform_logits(self, x):
        return jnp.zeros((*x.shape[:2], self.cfg.padded_vocab_size), jnp.float32)

    monkeypatch.setattr(Transformer, "_logits", uniform_logits)
    with pytest.raises(AssertionError, match="bf16 logits differ"):
        assert_bf16_logits_close(forward_logits(trainer.model_cfg, params, batch), f32)


def test_padded_vocab_is_masked():
    config = tiny_config(vocab_size=300)  # padded to 384
    trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    state = trainer.init_state()
    batch = trainer.global_batch(random_batch(config))
    model = params_lib.model_from(trainer.model_cfg, state.params)
    logits = np.asarray(model(batch["inputs"], batch["positions"], batch["segment_ids"]))
    assert logits.shape[-1] == 384
    probs = np.asarray(jax.nn.softmax(logits, -1))
    assert probs[..., 300:].max() == 0.0
    assert np.isfinite(logits[..., :300]).all()


@pytest.mark.parametrize("block_size", [4, 7, 16])
def test_causal_blocked_attention_matches_numpy(block_size):
    """The blocked causal path (queries in blocks over their visible keys only) against the numpy reference."""
    rng = np.random.default_rng(block_size)
    b, t, h, kv, d = 2, 19, 4, 2, 8
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, t, kv, d)).astype(np.float32)
    v = rng.normal(size=(b, t, kv, d)).astype(np.float32)
    seg = np.sort(rng.integers(0, 3, size=(b, t)), axis=1).astype(np.int32)
    mask = attn_lib.attention_mask(jnp.asarray(seg), jnp.asarray(seg))
    out = attn_lib.dot_product_attention(q, k, v, mask, causal=True, block_size=block_size)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, seg), atol=2e-5, rtol=1e-5)

    w = rng.normal(size=out.shape).astype(np.float32)
    g_fast = jax.grad(lambda *a: jnp.sum(
        attn_lib.dot_product_attention(*a, mask, causal=True, block_size=block_size) * w), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(jnp_attention_repeat_kv(*a, jnp.asarray(seg)) * w), argnums=(0, 1, 2))(
        q, k, v)
    for a, r in zip(g_fast, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, rtol=1e-4)


def test_attention_core_lse_and_its_gradient():
    """The core's log-sum-exp equals logsumexp of the masked scaled logits, in value and gradient."""
    rng = np.random.default_rng(3)
    b, kv, g, t, s, d = 2, 2, 2, 5, 7, 8
    q = jnp.asarray(rng.normal(size=(b, kv, g, t, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kv, s, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kv, s, d)), jnp.float32)
    mask = jnp.asarray(rng.random((b, t, s)) > 0.3).at[:, :, 0].set(True)
    w = jnp.asarray(rng.normal(size=(b, kv, g, t)), jnp.float32)

    def ref_lse(q, k):
        logits = jnp.einsum("bkgtd,bksd->bkgts", q, k) / np.sqrt(d)
        return jax.nn.logsumexp(jnp.where(mask[:, None, None], logits, -jnp.inf), axis=-1)

    np.testing.assert_allclose(np.asarray(attn_lib.attention_core(q, k, v, mask)[1]), np.asarray(ref_lse(q, k)),
                               atol=1e-5)
    g_fast = jax.grad(lambda q, k: jnp.sum(attn_lib.attention_core(q, k, v, mask)[1] * w), argnums=(0, 1))(q, k)
    g_ref = jax.grad(lambda q, k: jnp.sum(ref_lse(q, k) * w), argnums=(0, 1))(q, k)
    for a, r in zip(g_fast, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5)


def test_the_model_builds_inside_or_outside_a_mesh():
    """Transformer(cfg, rngs=...) and init_params need no mesh; under one, the same values (logical names are only
    read through the rules)."""
    from flax import nnx

    cfg = ModelConfig.from_config(tiny_config().model)
    outside = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(3)), nnx.Param))
    with jax.set_mesh(make_mesh({"data": -1, "fsdp": 1, "tensor": 1})):
        inside = params_lib.init_params(cfg, 3)
        abstract = params_lib.abstract_params(cfg)
    assert max_param_diff(outside, inside) == 0.0
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype), inside)


def test_a_batch_is_checked_against_the_task_schema():
    config = tiny_config()
    trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    assert set(trainer.schema) == {"inputs", "targets", "segment_ids", "positions", "loss_weights"}
    batch = random_batch(config)
    with pytest.raises(KeyError, match=r"batch is missing fields \['loss_weights'\] of task 'lm'"):
        trainer.global_batch({k: v for k, v in batch.items() if k != "loss_weights"})
    with pytest.raises(ValueError, match=r"batch field 'targets' of task 'lm' has shape \(8, 31\), expected \(8, 32\)"):
        trainer.global_batch({**batch, "targets": batch["targets"][:, :-1]})
    abstract = trainer.abstract_batch()  # what the ahead-of-time compile lowers with
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {k: ((8, 32), np.int32) for k in trainer.schema}


def test_chunked_lm_head_loss_equals_whole_and_never_holds_all_logits():
    """`Transformer.token_losses` in chunks (here 10 positions: the largest divisor of 40 not above 16) == the whole
    sequence at once == numpy, values and parameter gradients; and the compiled loss gradient's temporaries shrink
    with the chunk (the [batch, seq, vocab] float32 logits are never held whole)."""
    cfg = ModelConfig(vocab_size=4000, num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                      mlp_dim=48, dtype="float32")
    params = random_params(cfg, 11, std=0.1)
    rng = np.random.default_rng(12)
    b, t = 4, 40
    tokens, targets = (rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32) for _ in range(2))
    pos, seg = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32), np.ones((b, t), np.int32)

    def losses(params, chunk):
        model = params_lib.model_from(cfg, params)
        lse, target_logit = model.token_losses(model.hidden(tokens, pos, seg), jnp.asarray(targets), chunk)
        return jnp.sum(lse - target_logit) + 0.1 * jnp.sum(lse ** 2), (lse, target_logit)

    (whole, (lse, tl)), g_whole = jax.value_and_grad(losses, has_aux=True)(params, 0)
    (chunked, (lse_c, tl_c)), g_chunked = jax.value_and_grad(losses, has_aux=True)(params, 16)
    logits = np.asarray(forward_logits(cfg, params, {"inputs": tokens, "positions": pos, "segment_ids": seg}),
                        np.float64)
    m = logits.max(-1, keepdims=True)
    ref_lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    np.testing.assert_allclose(np.asarray(lse_c), ref_lse, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tl_c), np.take_along_axis(logits, targets[..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-6)
    assert max_param_diff(g_chunked, g_whole) < 1e-5 and max_param_diff(g_whole, jax.tree.map(np.zeros_like,
                                                                                             g_whole)) > 1e-3

    def temp_bytes(chunk):
        grad = jax.jit(jax.grad(lambda p: losses(p, chunk)[0]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    whole_logits = b * t * cfg.padded_vocab_size * 4
    whole, chunked = temp_bytes(0), temp_bytes(4)
    assert whole > 2 * whole_logits, whole  # the unchunked gradient holds the logits and their gradient whole
    assert chunked < whole_logits / 1.5 and chunked < whole / 4, (chunked, whole)
