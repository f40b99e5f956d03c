"""The decoding cache of the memory model: prefill + decode steps equal fresh forwards, and a memory swap between
steps changes the result exactly as a fresh forward with the new memories does, with no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3jax.model import ModelConfig, Transformer
from m3jax.model.memory import Memory, group_memories

P, REF, CHUNK = 3, 128, 8


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=300, num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=96, memory_layers=(0, 2), memory_kv_heads=(1,), memory_chunk_size=CHUNK)
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(3))


def random_memory(rng, b, m, groups, slots, kk=4):
    shape = (2, b, m, 1, kk, 16)  # [memory layers, b, M, memory KV heads, kk, head_dim]
    index = rng.integers(-1, m, (b, groups, slots)).astype(np.int32)
    valid = rng.random((b, m, kk)) > 0.2
    return Memory(keys=jnp.asarray(rng.normal(size=shape), jnp.float32),
                  values=jnp.asarray(rng.normal(size=shape), jnp.float32), index=jnp.asarray(index),
                  valid=jnp.asarray(valid), sink_tokens=jnp.asarray([2, 17, 18], jnp.int32))


def test_decode_steps_and_memory_swaps_equal_fresh_forwards(model):
    rng = np.random.default_rng(0)
    b, prompt, new = 2, 13, 6
    t = prompt + new
    tokens = jnp.asarray(rng.integers(4, 300, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(P + REF, P + REF + t), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    # Prompt groups 0 and 1 (chunks of 8, the second partial); decoded tokens 13..15 inherit group 1, then a swap
    # to group 2 for tokens 16..18 (a new chunk of generated tokens retrieves new memories).
    group = jnp.asarray(np.broadcast_to(np.r_[np.arange(prompt) // CHUNK, [1, 1, 1], [2, 2, 2]], (b, t)), jnp.int32)
    memory = random_memory(rng, b, m=4, groups=3, slots=2)
    memory = memory.replace(index=memory.index.at[:, 2].set(jnp.asarray([[3, 0], [2, -1]])))

    fresh = model(tokens, positions, seg, group, memory)  # every token's logits in one forward
    logits, cache = model.prefill(tokens[:, :prompt], positions[:, :prompt], seg[:, :prompt], group[:, :prompt],
                                  memory, max_len=P + t + 2)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(fresh[:, :prompt]), atol=1e-5)

    step = nnx.jit(lambda m, tok, pos, c: m.decode_step(tok, pos, c))
    for i in range(prompt, t):
        if i == prompt + 3:
            cache = cache.with_memories(*group_memories(memory, jnp.full((b,), 2)))
        out, cache = step(model, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
        np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(fresh[:, i]), atol=1e-5, err_msg=f"token {i}")
    assert int(cache.length) == P + t


def test_swapping_memories_does_not_recompile(model):
    rng = np.random.default_rng(1)
    b = 2
    memory = random_memory(rng, b, m=3, groups=1, slots=3)
    tokens = jnp.asarray(rng.integers(4, 300, (b, 5)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(P + REF, P + REF + 5), (b, 5))
    _, cache = model.prefill(tokens, positions, jnp.ones((b, 5), jnp.int32), jnp.zeros((b, 5), jnp.int32), memory,
                             max_len=16)
    compiles = []

    @jax.jit
    def step(state, tok, pos, cache):
        compiles.append(1)  # runs once per trace
        return nnx.merge(graphdef, state).decode_step(tok, pos, cache)

    graphdef, state = nnx.split(model)
    tok, pos = tokens[:, :1], positions[:, -1:] + 1
    out_a, _ = step(state, tok, pos, cache)
    other = random_memory(rng, b, m=3, groups=1, slots=3)
    swapped = cache.with_memories(*group_memories(other, jnp.zeros((b,), jnp.int32)))
    out_b, _ = step(state, tok, pos, swapped)
    assert len(compiles) == 1 and step._cache_size() == 1  # one trace, one executable, for both memories
    assert not np.allclose(np.asarray(out_a), np.asarray(out_b))  # the memories were read
    with pytest.raises(ValueError, match="do not fit the cache"):
        cache.with_memories(swapped.memory_keys[:, :, :2], swapped.memory_values, swapped.memory_valid)
