"""The inputs of the memory read path, and the decoding cache whose memory slots can be swapped.

Position layout (Memory3, pinned in docs/memory.md):

    [0, p)            the sink "<s>Reference:" (p tokens: the ordinary <s> + the tokenized "Reference:")
    [p, p + ref_len)  memory keys, at their in-reference positions (parallel positions; stored after RoPE)
    [p + ref_len, …)  the context, starting with its own <s>; positions are supplied by the caller

When a `Memory` is given, the model prepends the sink to every row at positions [0, p): it attends only to
itself and reads no memory, so its key/values are exactly those a reference's encoding sees. Every context
token, in every head of every layer, sees the sink; memory heads of memory layers also see their group's
memories, in the same softmax as the causal context. Without a `Memory` the model is the plain model.

Shapes (b = batch, M = unique memories of a row, G = memory groups of a row, S = slots per group, kk = kept
tokens per memory per KV head, mkv = memory KV heads, Lm = memory layers):

    Memory.keys, .values   [Lm, b, M, mkv, kk, head_dim]   compute dtype; keys after RoPE
    Memory.index           [b, G, S] int32                 indices into M; -1 = an empty slot
    Memory.valid           [b, M, kk] bool                 False = a padding key (a reference shorter than kk)
    Memory.sink_tokens     [p] int32                       the sink's token ids
    memory_group (a model input beside tokens)  [b, t] int32: the group each token reads; -1 = none

A memory read by several groups is passed once and referenced by index; the device gathers it per group.

The layout contract. Every token of group g lies within `chunk_size` positions of g's first token, and a group
reads a memory at most once. The jitted read path takes both as given and does not check them: a token further
out reads no memory, and a memory in two slots of a group counts twice in the softmax (documented in
`m3jax.model.attention`). Host code that builds memory inputs checks them with `check_layout`, which the
memory-augmented loader does for every batch.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SINK_SEGMENT = -1  # segment id of the sink: visible to every segment, sees only itself


@flax.struct.dataclass
class Memory:
    keys: jax.Array
    values: jax.Array
    index: jax.Array
    valid: jax.Array
    sink_tokens: jax.Array

    @property
    def sink_len(self) -> int:
        return self.sink_tokens.shape[0]

    @classmethod
    def from_rows(cls, rows, index, valid, sink_tokens) -> Memory:
        """From memories in the row layout of the encoder and the bank (decoded): rows [b, M, Lm, 2, mkv, kk, d]
        (each row's unique memories; [:, :, :, 0] keys, 1 values), index [b, G, S] int32 (-1 = empty slot), valid
        [b, M, kk] bool (`valid_keys`), sink_tokens [p]. Jittable: the transpose runs where `rows` live."""
        kv = jnp.moveaxis(jnp.asarray(rows), 2, 0)  # [Lm, b, M, 2, mkv, kk, d]
        return cls(keys=kv[:, :, :, 0], values=kv[:, :, :, 1], index=jnp.asarray(index, jnp.int32),
                   valid=jnp.asarray(valid), sink_tokens=jnp.asarray(sink_tokens, jnp.int32))

    @classmethod
    def empty(cls, sink_tokens, *, batch: int, groups: int, slots: int, memory_layers: int, kv_heads: int, k: int,
              head_dim: int, dtype=jnp.float32) -> Memory:
        """Every slot empty: the model sees the sink and its context only ("without memory" in evaluations)."""
        shape = (memory_layers, batch, 1, kv_heads, k, head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   index=jnp.full((batch, groups, slots), -1, jnp.int32), valid=jnp.zeros((batch, 1, k), bool),
                   sink_tokens=jnp.asarray(sink_tokens, jnp.int32))


def valid_keys(positions) -> np.ndarray:
    """Which kept tokens of each memory are real: positions [..., Lm, mkv, kk] (the encoder's or the bank's; -1 =
    padding, for a reference with fewer than kk tokens) -> [..., kk] bool. A short reference pads the same slots in
    every memory layer and head; anything else is an error."""
    kept = np.asarray(positions) >= 0
    if not (kept == kept[..., :1, :1, :]).all():
        raise ValueError("memory padding differs between memory layers or heads; Memory.valid is per memory")
    return kept[..., 0, 0, :]


def check_layout(memory_group, index, chunk_size: int) -> None:
    """The layout contract of the read path (module docstring), on host arrays: memory_group [b, t] (-1 = none),
    index [b, G, S] (-1 = empty). Raises ValueError naming the row and group that break it."""
    group, index = np.asarray(memory_group), np.asarray(index)
    b, num_groups = index.shape[:2]
    if group.max(initial=-1) >= num_groups:
        raise ValueError(f"memory_group {int(group.max())} is out of range: the index has {num_groups} groups")
    rows, pos = np.nonzero(group >= 0)
    first = np.full((b, num_groups), group.shape[1], np.int64)
    last = np.full((b, num_groups), -1, np.int64)
    np.minimum.at(first, (rows, group[rows, pos]), pos)
    np.maximum.at(last, (rows, group[rows, pos]), pos)
    bad = np.argwhere(last - first >= chunk_size)
    if bad.size:
        r, g = bad[0]
        raise ValueError(f"row {r}, memory group {g}: tokens at positions {first[r, g]}…{last[r, g]} span more than "
                         f"chunk_size={chunk_size}")
    slots = np.sort(index, axis=-1)
    twice = np.argwhere((slots[..., 1:] == slots[..., :-1]) & (slots[..., 1:] >= 0))
    if twice.size:
        r, g, s = twice[0]
        raise ValueError(f"row {r}, memory group {g} reads memory {slots[r, g, s]} twice (slots "
                         f"{index[r, g].tolist()}): a repeated memory would count twice in the softmax")


@flax.struct.dataclass
class KVCache:
    """Decoding state: the context's key/values (sink included) and the memory slots decoding reads now.

    keys, values   [L, b, max_len, kv_heads, head_dim]   post-RoPE, every layer
    segment_ids    [b, max_len] int32                    0 = padding or not yet written (never attended)
    length         [] int32                              positions written so far (the same for every row)
    memory_keys, memory_values  [Lm, b, S, mkv, kk, head_dim]   the current group's S memories
    memory_valid   [b, S, kk] bool                       False = empty slot or padding key

    Every decoded token is one group that reads all S slots. `with_memories` swaps them (every 64 generated
    tokens in Memory3's decoding); shapes do not change, so a jitted decode step does not recompile.
    """

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    length: jax.Array
    memory_keys: jax.Array
    memory_values: jax.Array
    memory_valid: jax.Array

    def with_memories(self, keys: jax.Array, values: jax.Array, valid: jax.Array) -> KVCache:
        """The same cache reading other memories: keys/values [Lm, b, S, mkv, kk, d], valid [b, S, kk]."""
        for name, new, old in (("keys", keys, self.memory_keys), ("values", values, self.memory_values),
                               ("valid", valid, self.memory_valid)):
            if new.shape != old.shape:
                raise ValueError(f"memory {name} of shape {new.shape} do not fit the cache's {old.shape}")
        return self.replace(memory_keys=keys.astype(self.memory_keys.dtype),
                            memory_values=values.astype(self.memory_values.dtype), memory_valid=valid)


def group_memories(memory: Memory, group: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The S slots of one group per row (group: [b] int32) as cache memories: (keys, values, valid)."""
    rows = jnp.arange(memory.index.shape[0])
    slots = memory.index[rows, group]  # [b, S]
    idx = jnp.maximum(slots, 0)
    keys = memory.keys[:, rows[:, None], idx]  # [Lm, b, S, mkv, kk, d]
    values = memory.values[:, rows[:, None], idx]
    valid = memory.valid[rows[:, None], idx] & (slots >= 0)[..., None]
    return keys, values, valid
