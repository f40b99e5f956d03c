"""The decoder-only Transformer of Memory3 (Flax NNX).

Token embedding -> N x [pre-norm RMSNorm -> GQA attention with RoPE -> residual; RMSNorm -> SwiGLU MLP ->
residual] -> RMSNorm -> untied LM head. No biases. Parameters are float32; activations run in `config.dtype`.

The N blocks are stored *stacked*: every block parameter has a leading `layers` axis, and the forward pass is a
`jax.lax.scan` over it, so compile time does not grow with depth.

Inputs are explicit: `tokens`, `positions` (RoPE positions, supplied by the caller so that packed documents,
decoding and Memory3's position layout are the caller's choice) and `segment_ids` (packed documents never
attend across a boundary; 0 = padding). Memory3's explicit memory adds `memory_group` and a `Memory` (see
m3jax/model/memory.py and docs/memory.md); without them the model is the plain model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from m3jax.model import attention as attn_lib
from m3jax.model import kernels
from m3jax.model.config import ModelConfig
from m3jax.model.memory import SINK_SEGMENT, KVCache, Memory, group_memories
from m3jax.parallel import shard_activation

BATCH, SEQ, EMBED = "batch", "seq", "act_embed"


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
    return _annotated(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes)


def _annotated(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    """A parameter carrying its *logical* axis names. They mean something only through the config's logical axis
    rules (`m3jax.model.params.param_shardings`), so flax never shards it by them eagerly: a model builds the same
    inside or outside a mesh."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


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
        self.attn_norm = _annotated(jnp.ones((n, d), jnp.float32), ("layers", "norm"))
        self.wq = _param(rngs, (n, d, h, hd), ("layers", "embed", "heads", "head_dim"), std)
        self.wk = _param(rngs, (n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"), std)
        self.wv = _param(rngs, (n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"), std)
        self.wo = _param(rngs, (n, h, hd, d), ("layers", "heads", "head_dim", "embed"), out_std)
        self.mlp_norm = _annotated(jnp.ones((n, d), jnp.float32), ("layers", "norm"))
        self.w_gate = _param(rngs, (n, d, f), ("layers", "embed", "mlp"), std)
        self.w_up = _param(rngs, (n, d, f), ("layers", "embed", "mlp"), std)
        self.w_down = _param(rngs, (n, f, d), ("layers", "mlp", "embed"), out_std)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, mem: dict | None = None,
                 *, collect_kv: bool = False, segment_ids: jax.Array | None = None, sink_len: int = 0):
        """x: [batch, seq, hidden]; cos/sin: [batch, seq, head_dim]; mask: [batch, seq, seq], causal.

        With a fused attention kernel (config `attention`), `segment_ids` [batch, seq] and `sink_len` say the same
        as `mask` (the first `sink_len` positions are the sink, seen by every token) and `mask` is unused.

        mem (memory layers): this layer's memory — keys/values [b, M, mkv, kk, d], index [b, G, S], valid
        [b, M, kk], group [b, seq], enabled (scalar bool). Returns x, or (x, (k, v)) with `collect_kv` (this
        layer's post-RoPE keys and values [b, seq, kv, d], for a decoding cache).
        """
        cfg = self.cfg
        q, k, v = self._qkv(x, cos, sin)
        kernel = kernels.get(cfg.attention, cfg.attention_interpret) if segment_ids is not None else None
        if kernel is not None and not kernel.supports(x.shape[1] - sink_len):
            kernel = None  # e.g. a prompt of any length: the XLA path computes the same attention
        if mem is None:
            o = attn_lib.dot_product_attention(q, k, v, mask, causal=True, kernel=kernel, segment_ids=segment_ids)
        else:
            o = attn_lib.attention_with_memory(
                q, k, v, mask, mem["keys"], mem["values"], mem["index"], mem["valid"], mem["group"],
                cfg.memory_kv_heads, chunk_size=cfg.memory_chunk_size, causal=True, enabled=mem["enabled"],
                kernel=kernel, segment_ids=segment_ids, sink_len=sink_len)
        x = self._out_and_mlp(x, o)
        return (x, (k, v)) if collect_kv else x

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
               index: jax.Array, visible: jax.Array, mem: dict | None):
        """One new token per row: x [b, 1, hidden]; cache_k/v [b, max_len, kv, d]; the new key/value are
        written at `index`; visible [b, 1, max_len]. mem: keys/values [b, S, mkv, kk, d], valid [b, S, kk],
        enabled. Returns (x, cache_k, cache_v)."""
        cfg = self.cfg
        q, k, v = self._qkv(x, cos, sin)
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, axis=1)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=1)
        if mem is None:
            o = attn_lib.dot_product_attention(q, cache_k, cache_v, visible)
        else:
            b, slots = mem["valid"].shape[:2]
            o = attn_lib.attention_with_memory(
                q, cache_k, cache_v, visible, mem["keys"], mem["values"],
                jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, 1, slots)), mem["valid"],
                jnp.zeros((b, 1), jnp.int32), cfg.memory_kv_heads, chunk_size=1, causal=False,
                enabled=mem["enabled"])
        return self._out_and_mlp(x, o), cache_k, cache_v

    def _qkv(self, x, cos, sin):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h = rms_norm(x, self.attn_norm[...], cfg.norm_eps)
        q = dense(h, self.wq[...].astype(dt))
        k = dense(h, self.wk[...].astype(dt))
        v = dense(h, self.wv[...].astype(dt))
        q = shard_activation(attn_lib.apply_rope(q, cos, sin), (BATCH, SEQ, "heads", "head_dim"))
        k = shard_activation(attn_lib.apply_rope(k, cos, sin), (BATCH, SEQ, "kv_heads", "head_dim"))
        v = shard_activation(v, (BATCH, SEQ, "kv_heads", "head_dim"))
        return q, k, v

    def _out_and_mlp(self, x, o):
        cfg, dt = self.cfg, self.cfg.compute_dtype
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
        self.final_norm = _annotated(jnp.ones((d,), jnp.float32), ("norm",))
        self.lm_head = _param(rngs, (d, vp), ("embed", "vocab"), cfg.init_std)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 memory_group: jax.Array | None = None, memory: Memory | None = None) -> jax.Array:
        """tokens, positions, segment_ids: [batch, seq] int32 -> logits [batch, seq, padded_vocab] float32.

        With `memory` (see m3jax/model/memory.py for shapes and the position layout) the sink is prepended at
        positions [0, p), every token sees it, and memory heads of memory layers read the memories of the token's
        `memory_group` ([batch, seq] int32, -1 = none) in the same softmax as the context. Without it, the plain
        model. Logits of the padding rows of the vocabulary (ids >= vocab_size) are set to a large negative
        value, so they take no probability in the loss or in sampling.
        """
        return self._logits(self.hidden(tokens, positions, segment_ids, memory_group, memory))

    def hidden(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               memory_group: jax.Array | None = None, memory: Memory | None = None) -> jax.Array:
        """The last block's output [batch, seq, hidden] (compute dtype, before the final norm; the sink dropped):
        what `__call__` turns into logits and `token_losses` into losses. Arguments as `__call__`."""
        if memory is None:
            return self._forward(tokens, positions, attn_lib.attention_mask(segment_ids, segment_ids),
                                 segment_ids=segment_ids)
        x, _ = self._forward_with_memory(tokens, positions, segment_ids, memory_group, memory)
        return x[:, memory.sink_len:]

    def token_losses(self, hidden: jax.Array, targets: jax.Array, chunk_size: int = 0):
        """(log-sum-exp of the logits, the target's logit), each [batch, seq] float32, from `hidden` (the output of
        `hidden`) and `targets` [batch, seq] int32.

        chunk_size > 0: the LM head runs over `chunk_size` positions of every row at a time, each chunk's logits
        recomputed in the backward (`jax.checkpoint`), so the float32 logits [batch, seq, padded_vocab] never
        exist whole: at most [batch, chunk_size, padded_vocab] at once. The sequence is cut at the largest
        divisor of it not above chunk_size. 0 = the whole sequence at once.
        """
        b, t = targets.shape

        def head(h, tgt):
            logits = self._logits(h)
            return (jax.nn.logsumexp(logits, axis=-1),
                    jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0])

        if chunk_size <= 0 or chunk_size >= t:
            return head(hidden, targets)
        chunk = next(c for c in range(chunk_size, 0, -1) if t % c == 0)
        n = t // chunk
        hs = hidden.reshape(b, n, chunk, hidden.shape[-1]).swapaxes(0, 1)  # [n, b, chunk, d]: rows stay sharded
        ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
        lse, target_logit = jax.lax.map(jax.checkpoint(lambda a: head(*a)), (hs, ts))
        return lse.swapaxes(0, 1).reshape(b, t), target_logit.swapaxes(0, 1).reshape(b, t)

    def prefill(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, memory_group: jax.Array,
                memory: Memory, max_len: int) -> tuple[jax.Array, KVCache]:
        """The forward pass of a prompt with memory, and the decoding cache it leaves: (logits, cache).

        The cache holds the sink and the prompt (`length` = p + seq) and, as decoding's memories, the slots of
        the group of each row's last prompt token (Memory3: the first decoded chunk inherits them).
        """
        b, t = tokens.shape
        p = memory.sink_len
        if p + t > max_len:
            raise ValueError(f"max_len={max_len} cannot hold the sink ({p}) and the prompt ({t})")
        x, (ks, vs) = self._forward_with_memory(tokens, positions, segment_ids, memory_group, memory,
                                                collect_kv=True)
        pad = ((0, 0), (0, 0), (0, max_len - p - t), (0, 0), (0, 0))
        seg = jnp.concatenate([jnp.full((b, p), SINK_SEGMENT, jnp.int32), segment_ids], axis=1)
        mk, mv, mvalid = group_memories(memory, memory_group[:, -1])
        cache = KVCache(keys=jnp.pad(ks, pad), values=jnp.pad(vs, pad),
                        segment_ids=jnp.pad(seg, ((0, 0), (0, max_len - p - t))),
                        length=jnp.asarray(p + t, jnp.int32), memory_keys=mk, memory_values=mv, memory_valid=mvalid)
        return self._logits(x[:, p:]), cache

    def decode_step(self, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One token per row (tokens, positions: [b, 1]) reading the cache and its memory slots -> (logits
        [b, 1, padded_vocab], the cache with the token appended). The memory heads of memory layers attend to
        the cache's S memories together with the context, in one softmax."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        b, max_len = cache.segment_ids.shape
        index = cache.length
        seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, jnp.ones((b, 1), jnp.int32), index, axis=1)
        visible = ((jnp.arange(max_len) <= index)[None, :] & (seg != 0))[:, None, :]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        cos, sin = attn_lib.rope_frequencies(positions, cfg.head_dim, cfg.rope_base)
        graphdef, stacked = nnx.split(self.layers)
        slot_of, is_memory = self._memory_layer_tables()

        def one_layer(x, xs):
            layer_state, layer, ck, cv = xs
            mem = None
            if cfg.has_memory:
                j = slot_of[layer]
                mem = {"keys": cache.memory_keys[j].astype(dt), "values": cache.memory_values[j].astype(dt),
                       "valid": cache.memory_valid, "enabled": is_memory[layer]}
            x, ck, cv = nnx.merge(graphdef, layer_state).decode(x, cos, sin, ck, cv, index, visible, mem)
            return x, (ck, cv)

        layers = jnp.arange(cfg.num_layers)
        x, (ks, vs) = jax.lax.scan(one_layer, x, (stacked, layers, cache.keys, cache.values))
        new_cache = cache.replace(keys=ks, values=vs, segment_ids=seg, length=index + 1)
        return self._logits(x), new_cache

    def layer_qkv(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, num_layers: int,
                  fn: Callable | None = None):
        """The plain model's post-RoPE queries, keys and values in its first `num_layers` layers, and nothing
        after them: the last of those layers stops at its q/k/v projections, later layers are never read.

        tokens, positions, segment_ids: [batch, seq] as in `__call__` (causal within segments, 0 = padding).
        Returns fn(layer, q [b, seq, heads, d], k [b, seq, kv, d], v [b, seq, kv, d]) of each layer (a traced
        int32 `layer`), stacked on a leading [num_layers] axis; `fn` defaults to (q, k, v). A reducing `fn`
        keeps only what the caller needs of each layer (memory encoding: the top-k key/values).
        """
        cfg = self.cfg
        if not 1 <= num_layers <= cfg.num_layers:
            raise ValueError(f"num_layers={num_layers} is not in [1, {cfg.num_layers}]")
        fn = fn or (lambda layer, q, k, v: (q, k, v))
        x = self._embed(tokens)
        cos, sin = attn_lib.rope_frequencies(positions, cfg.head_dim, cfg.rope_base)
        mask = attn_lib.attention_mask(segment_ids, segment_ids)
        graphdef, stacked = nnx.split(self.layers)

        def block(layer):  # one layer's slice of the stacked parameters (a dynamic slice: no copy of the stack)
            return nnx.merge(graphdef, jax.tree.map(lambda p: p[layer], stacked))

        def one_layer(x, layer):
            blk = block(layer)
            q, k, v = blk._qkv(x, cos, sin)
            o = attn_lib.dot_product_attention(q, k, v, mask, causal=True)
            return blk._out_and_mlp(x, o), fn(layer, q, k, v)

        if cfg.remat != "none":  # the continued stage differentiates through the encoding (memory.encode_grad)
            one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        last = jnp.asarray(num_layers - 1, jnp.int32)
        x, ys = jax.lax.scan(one_layer, x, jnp.arange(num_layers - 1, dtype=jnp.int32))
        y_last = fn(last, *block(last)._qkv(x, cos, sin))
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), ys, y_last)

    # ------------------------------------------------------------------------------------------- internals
    def _memory_layer_tables(self):
        """(memory slot of each layer, whether each layer is a memory layer) as constant arrays."""
        cfg = self.cfg
        slot_of = [0] * cfg.num_layers
        for j, layer in enumerate(cfg.memory_layers):
            slot_of[layer] = j
        is_memory = [layer in cfg.memory_layers for layer in range(cfg.num_layers)]
        return jnp.asarray(slot_of, jnp.int32), jnp.asarray(is_memory)

    def _embed(self, tokens):
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.compute_dtype)
        return shard_activation(x, (BATCH, SEQ, EMBED))

    def _forward(self, tokens, positions, mask, memory=None, memory_group=None, collect_kv=False,
                 segment_ids=None, sink_len=0):
        cfg = self.cfg
        x = self._embed(tokens)
        cos, sin = attn_lib.rope_frequencies(positions, cfg.head_dim, cfg.rope_base)
        return self._blocks(x, cos, sin, mask, memory, memory_group, collect_kv, segment_ids, sink_len)

    def _forward_with_memory(self, tokens, positions, segment_ids, memory_group, memory, collect_kv=False):
        """The sink prepended at [0, p), its own segment, visible to every token; returns the blocks' output."""
        if not self.cfg.has_memory:
            raise ValueError("a Memory was given to a model without memory layers (config.memory.enabled=False)")
        b, p = tokens.shape[0], memory.sink_len
        if memory_group is None:
            memory_group = jnp.full(tokens.shape, -1, jnp.int32)
        tokens = jnp.concatenate([jnp.broadcast_to(memory.sink_tokens, (b, p)), tokens], axis=1)
        positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(p, dtype=positions.dtype), (b, p)), positions], 1)
        seg = jnp.concatenate([jnp.full((b, p), SINK_SEGMENT, segment_ids.dtype), segment_ids], axis=1)
        group = jnp.concatenate([jnp.full((b, p), -1, jnp.int32), memory_group.astype(jnp.int32)], axis=1)
        t = tokens.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None]
        mask = attn_lib.attention_mask(seg, seg) | (causal & (seg == SINK_SEGMENT)[:, None, :])
        out = self._forward(tokens, positions, mask, memory, group, collect_kv, segment_ids=seg, sink_len=p)
        return out if collect_kv else (out, None)

    def _logits(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = rms_norm(x, self.final_norm[...], cfg.norm_eps)
        logits = dense(x, self.lm_head[...].astype(dt), out_dtype=jnp.float32)
        logits = shard_activation(logits, (BATCH, SEQ, "vocab"))
        if cfg.padded_vocab_size == cfg.vocab_size:  # no padding rows: skip a pass over [b, t, V]
            return logits
        vocab_ok = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        return jnp.where(vocab_ok, logits, attn_lib.NEG_INF)

    def _blocks(self, x, cos, sin, mask, memory=None, memory_group=None, collect_kv=False, segment_ids=None,
                sink_len=0):
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.layers)
        slot_of, is_memory = self._memory_layer_tables()

        def one_layer(x, xs):
            layer_state, layer = xs
            mem = None
            if memory is not None:
                j = slot_of[layer]
                mem = {"keys": memory.keys[j].astype(cfg.compute_dtype),
                       "values": memory.values[j].astype(cfg.compute_dtype), "index": memory.index,
                       "valid": memory.valid, "group": memory_group, "enabled": is_memory[layer]}
            out = nnx.merge(graphdef, layer_state)(x, cos, sin, mask, mem, collect_kv=collect_kv,
                                                   segment_ids=segment_ids, sink_len=sink_len)
            return out if collect_kv else (out, None)

        if cfg.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        layers = jnp.arange(cfg.num_layers)
        if cfg.scan_layers:
            x, kv = jax.lax.scan(one_layer, x, (stacked, layers))
        else:
            kvs = []
            for i in range(cfg.num_layers):
                x, kv_i = one_layer(x, (jax.tree.map(lambda p, i=i: p[i], stacked), layers[i]))
                kvs.append(kv_i)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs) if collect_kv else None
        return (x, kv) if collect_kv else x
