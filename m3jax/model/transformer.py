"""The decoder-only Transformer of Memory3 (Flax NNX).

Token embedding -> N x [pre-norm RMSNorm -> GQA attention with RoPE -> residual; RMSNorm -> SwiGLU MLP ->
residual] -> RMSNorm -> untied LM head. No biases. Parameters are float32; activations run in `config.dtype`.

The N blocks are stored *stacked*: every block parameter has a leading `layers` axis, and the forward pass is a
`jax.lax.scan` over it, so compile time does not grow with depth.

Inputs are explicit: `tokens`, `positions` (RoPE positions, supplied by the caller so that packed documents,
decoding and Memory3's position layout are the caller's choice) and `segment_ids` (packed documents never
attend across a boundary; 0 = padding). Later stages add memory inputs beside these.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax.model import attention as attn_lib
from m3jax.model.config import ModelConfig
from m3jax.parallel import shard_activation

BATCH, SEQ, EMBED = "batch", "seq", "act_embed"


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), out_sharding=axes)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight).astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, num_in_axes: int = 1, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x [*lead, *in] contracted with a kernel w [*in, *out] -> [*lead, *out], as one 2-D matmul.

    The operands are flattened to [tokens, in] x [in, out] (bitcasts): the same math as an einsum such as
    "btd,dhk->bthk", but the weight gradient then contracts a single token axis. XLA:CPU lowers the
    multi-axis form ("btd,btf->df") with explicit transposes of the activations and their gradients; the 2-D
    form has none (a scanned SwiGLU MLP's forward + backward at 4096 x 1024 x 2816 is ~20% faster).
    """
    in_shape, out_shape = w.shape[:num_in_axes], w.shape[num_in_axes:]
    lead = x.shape[: x.ndim - num_in_axes]
    y = jnp.matmul(x.reshape(math.prod(lead), math.prod(in_shape)), w.reshape(math.prod(in_shape), -1),
                   preferred_element_type=out_dtype)
    return y.reshape(*lead, *out_shape)


class Block(nnx.Module):
    """`num_stacked` Transformer blocks whose parameters share a leading `layers` axis.

    Called on one layer's slice of the parameters (as the scan in `Transformer` does), it applies one block.
    """

    def __init__(self, cfg: ModelConfig, num_stacked: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        n, d, h, kv, hd, f = (num_stacked, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              cfg.mlp_dim)
        std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.attn_norm = nnx.Param(jnp.ones((n, d), jnp.float32), out_sharding=("layers", "norm"))
        self.wq = _param(rngs, (n, d, h, hd), ("layers", "embed", "heads", "head_dim"), std)
        self.wk = _param(rngs, (n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"), std)
        self.wv = _param(rngs, (n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"), std)
        self.wo = _param(rngs, (n, h, hd, d), ("layers", "heads", "head_dim", "embed"), out_std)
        self.mlp_norm = nnx.Param(jnp.ones((n, d), jnp.float32), out_sharding=("layers", "norm"))
        self.w_gate = _param(rngs, (n, d, f), ("layers", "embed", "mlp"), std)
        self.w_up = _param(rngs, (n, d, f), ("layers", "embed", "mlp"), std)
        self.w_down = _param(rngs, (n, f, d), ("layers", "mlp", "embed"), out_std)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [batch, seq, hidden]; cos/sin: [batch, seq, head_dim]; mask: [batch, seq, seq], causal."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h = rms_norm(x, self.attn_norm[...], cfg.norm_eps)
        q = dense(h, self.wq[...].astype(dt))
        k = dense(h, self.wk[...].astype(dt))
        v = dense(h, self.wv[...].astype(dt))
        q = shard_activation(attn_lib.apply_rope(q, cos, sin), (BATCH, SEQ, "heads", "head_dim"))
        k = shard_activation(attn_lib.apply_rope(k, cos, sin), (BATCH, SEQ, "kv_heads", "head_dim"))
        v = shard_activation(v, (BATCH, SEQ, "kv_heads", "head_dim"))
        o = attn_lib.dot_product_attention(q, k, v, mask, causal=True)
        x = x + shard_activation(dense(o, self.wo[...].astype(dt), num_in_axes=2), (BATCH, SEQ, EMBED))

        h = rms_norm(x, self.mlp_norm[...], cfg.norm_eps)
        gate = dense(h, self.w_gate[...].astype(dt))
        up = dense(h, self.w_up[...].astype(dt))
        act = shard_activation(jax.nn.silu(gate) * up, (BATCH, SEQ, "mlp"))
        return x + shard_activation(dense(act, self.w_down[...].astype(dt)), (BATCH, SEQ, EMBED))


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, vp = cfg.hidden_size, cfg.padded_vocab_size
        self.embed = _param(rngs, (vp, d), ("vocab", "embed"), cfg.init_std)
        self.layers = Block(cfg, cfg.num_layers, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("norm",))
        self.lm_head = _param(rngs, (d, vp), ("embed", "vocab"), cfg.init_std)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """tokens, positions, segment_ids: [batch, seq] int32 -> logits [batch, seq, padded_vocab] float32.

        Logits of the padding rows of the vocabulary (ids >= vocab_size) are set to a large negative value, so
        they take no probability in the loss or in sampling.
        """
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        x = shard_activation(x, (BATCH, SEQ, EMBED))
        cos, sin = attn_lib.rope_frequencies(positions, cfg.head_dim, cfg.rope_base)
        mask = attn_lib.attention_mask(segment_ids, segment_ids)
        x = self._blocks(x, cos, sin, mask)
        x = rms_norm(x, self.final_norm[...], cfg.norm_eps)
        logits = dense(x, self.lm_head[...].astype(dt), out_dtype=jnp.float32)
        logits = shard_activation(logits, (BATCH, SEQ, "vocab"))
        if cfg.padded_vocab_size == cfg.vocab_size:  # no padding rows: skip a pass over [b, t, V]
            return logits
        vocab_ok = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        return jnp.where(vocab_ok, logits, attn_lib.NEG_INF)

    def _blocks(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, cos, sin, mask)

        if self.cfg.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        if self.cfg.scan_layers:
            x, _ = jax.lax.scan(lambda c, s: (one_layer(c, s), None), x, stacked)
            return x
        for i in range(self.cfg.num_layers):
            x = one_layer(x, jax.tree.map(lambda p, i=i: p[i], stacked))
        return x
