"""Exact-match cloze evaluation of a Memory3 model: which facts it completes, by what memory it reads.

A cloze item is a prompt that ends right before a one-word answer (`m3jax.data.entities.cloze_items`). The model
completes `<s> + prompt` greedily for a few tokens; the item is correct when the first whitespace word of the
decoded continuation, stripped of punctuation, equals the answer.

The prompt (fewer than `chunk_size` tokens) is one memory group reading one slot, whose memory depends on the *arm*:

    retrieved  the reference the retrieval index ranks first for the prompt's text (the retrieval Embedder and the
               bank's ScaNN index, as retrieval at evaluation time does: no leakage filter)
    oracle     the entity's own reference
    shuffled   another entity's reference (a fixed random derangement of the references, by seed)
    empty      the sink kept, the slot empty: the context sees the sink and itself only
    off        the plain model: no sink, no memory, positions from 0

Memories come from a bank (`single_slot_memory`: `MemoryBank.gather`, decoded in the model's compute dtype) or
straight from the encoder (`slot_memory`). Positions follow
docs/memory.md: sink [0, p), memory keys [p, p + ref_len), the prompt from p + ref_len. "off" runs the same
jitted path with a zero-length sink and an empty slot, which is the plain model (tests/test_cloze.py checks it
against the model without a `Memory`).

Generation is batched: prompts are left-padded to one length (padding is segment 0, never attended), each row's
positions start at its first real token, and `Transformer.prefill` + `decode_step` run inside one jit per
(batch, prompt length, steps, sink length). Given a mesh (a training run's), the jit runs on it with the parameters
as they are sharded, the prompts' activations sharded by the logical axis rules like a train step's, and the
generated tokens replicated, so every process reads them.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3jax import parallel
from m3jax.model import params as params_lib
from m3jax.model.config import ModelConfig
from m3jax.model.memory import Memory, valid_keys

ARMS = ("retrieved", "oracle", "shuffled", "empty", "off")
MEMORY_ARMS = ("retrieved", "oracle", "shuffled", "empty")  # the arms that read a bank


# ------------------------------------------------------------------------------------------------ scoring
def first_word(text: str) -> str:
    """The first whitespace-separated word of `text` with surrounding punctuation stripped ("" if none)."""
    words = text.split()
    return words[0].strip(string.punctuation) if words else ""


def exact_match(continuation: str, answer: str) -> bool:
    """Whether the continuation's first word is the answer (case-sensitive)."""
    return first_word(continuation) == answer


# ------------------------------------------------------------------------------------------------ memories
def shuffled_references(ref_ids: np.ndarray, seed: int) -> np.ndarray:
    """Each item's reference replaced by another entity's: the distinct ids in `ref_ids` are deranged (a random
    cycle through all of them, by `seed`), so an item never reads its own reference. Needs 2 distinct ids."""
    ref_ids = np.asarray(ref_ids)
    distinct = np.unique(ref_ids)
    if distinct.size < 2:
        raise ValueError(f"a shuffled arm needs at least 2 distinct references, got {distinct.size}")
    cycle = distinct[np.random.default_rng(seed).permutation(distinct.size)]
    partner = dict(zip(cycle.tolist(), np.roll(cycle, -1).tolist(), strict=True))
    return np.asarray([partner[i] for i in ref_ids.tolist()], ref_ids.dtype)


def single_slot_memory(bank, ids: np.ndarray, sink: np.ndarray, dtype) -> Memory:
    """Row i reads memory `ids[i]` from `bank` in its one group and slot (-1: the slot is empty)."""
    ids = np.asarray(ids, np.int64)
    kv, positions = bank.gather(ids[:, None], dtype=dtype)  # [b, 1, Lm, 2, mkv, k, d], [b, 1, Lm, mkv, k]
    return slot_memory(kv, positions, ids >= 0, sink)


def slot_memory(kv, positions, present: np.ndarray, sink: np.ndarray) -> Memory:
    """Row i reads memory kv[i, 0] in its one group and slot, or nothing where not `present[i]`: kv [b, 1, Lm, 2,
    mkv, k, d] (a bank's decoded rows or the encoder's), positions [b, 1, Lm, mkv, k] (-1 = a padding key)."""
    index = np.where(present, 0, -1).astype(np.int32)[:, None, None]
    return Memory.from_rows(kv, index, valid_keys(positions), sink)


def no_memory(cfg: ModelConfig, batch: int) -> Memory:
    """The "off" arm's Memory: a zero-length sink and one empty slot, i.e. the plain model at positions 0…"""
    return Memory.empty(np.zeros(0, np.int32), batch=batch, groups=1, slots=1,
                        memory_layers=len(cfg.memory_layers), kv_heads=len(cfg.memory_kv_heads), k=1,
                        head_dim=cfg.head_dim, dtype=cfg.compute_dtype)


# ------------------------------------------------------------------------------------------------ generation
def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [n, length] int32 left-padded with `pad_id`, lengths [n] int32)."""
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if lengths.size and (lengths.min() < 1 or lengths.max() > length):
        raise ValueError(f"prompt lengths must be in [1, {length}], got {lengths.min()}…{lengths.max()}")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = p
    return tokens, lengths


def encode_prompts(tokenizer, prompts: Sequence[str], chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`<s> + prompt` of each prompt, left-padded to the longest: (tokens [n, t] int32, lengths [n] int32). Every
    prompt must be shorter than `chunk_size` tokens (one memory group)."""
    if not prompts:
        raise ValueError("no cloze prompts")
    encoded = [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(list(prompts))]
    too_long = [i for i, p in enumerate(encoded) if len(p) >= chunk_size]
    if too_long:
        i = too_long[0]
        raise ValueError(f"cloze prompt {i} ({prompts[i]!r}) is {len(encoded[i])} tokens: a prompt must fit one "
                         f"memory group (< chunk_size={chunk_size})")
    return left_pad(encoded, max(map(len, encoded)))


def hashable_rules(rules) -> tuple:
    """Logical axis rules as nested tuples (a config may hold lists), so that a jit can be cached by them."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


@functools.cache
def _greedy_fn(cfg: ModelConfig, steps: int, mesh: Mesh | None, rules):
    """jit(params, tokens [b, t], lengths [b], memory, start) -> greedy tokens [b, steps] int32 (replicated on
    `mesh`, activations sharded by `rules`, when given)."""

    def greedy(params, tokens, lengths, memory, start):
        model = params_lib.model_from(cfg, params)
        b, t = tokens.shape
        pad = (t - lengths)[:, None]
        col = jnp.arange(t, dtype=jnp.int32)[None, :]
        real = col >= pad
        positions = start + jnp.maximum(col - pad, 0)
        logits, cache = model.prefill(tokens, positions, real.astype(jnp.int32), jnp.where(real, 0, -1), memory,
                                      memory.sink_len + t + steps)
        first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

        def step(carry, i):
            token, cache = carry
            logits, cache = model.decode_step(token[:, None], (start + lengths + i)[:, None], cache)
            return (jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache), token

        (last, _), earlier = jax.lax.scan(step, (first, cache), jnp.arange(steps - 1, dtype=jnp.int32))
        return jnp.concatenate([earlier.T, last[:, None]], axis=1)

    if mesh is None:
        return jax.jit(greedy)

    def sharded(*args):
        with parallel.axis_rules(rules):
            return greedy(*args)

    return jax.jit(sharded, out_shardings=NamedSharding(mesh, PartitionSpec()))


def greedy_generate(params: Mapping[str, Any], cfg: ModelConfig, tokens: np.ndarray, lengths: np.ndarray,
                    memory: Memory, steps: int, *, mesh: Mesh | None = None, rules=()) -> np.ndarray:
    """`steps` greedy tokens after each left-padded prompt (tokens [b, t], lengths [b]) reading `memory` (one group
    per row; `no_memory(cfg, b)` for the plain model) -> [b, steps] int32. The prompt's first real token sits at
    position `cfg.context_start(p)` (0 without a sink). `mesh` and `rules`: run where `params` live (the module
    docstring); the memory is then read from the host, as every process holds it."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if not cfg.has_memory:
        raise ValueError("the model config has no memory heads (config.memory.heads=False)")
    start = 0 if memory.sink_len == 0 else cfg.context_start(memory.sink_len)
    args = (np.asarray(tokens, np.int32), np.asarray(lengths, np.int32), memory, np.int32(start))
    if mesh is None:
        return np.asarray(_greedy_fn(cfg, steps, None, ())(params, *args))
    with jax.set_mesh(mesh):
        return np.asarray(_greedy_fn(cfg, steps, mesh, hashable_rules(rules))(params, *jax.device_get(args)))


def generate(params: Mapping[str, Any], cfg: ModelConfig, tokens: np.ndarray, lengths: np.ndarray,
             memory_of: Callable[[np.ndarray], Memory], steps: int, *, batch_size: int, mesh: Mesh | None = None,
             rules=()) -> np.ndarray:
    """`greedy_generate` over every prompt, `batch_size` at a time: [n, steps] int32. The rows of a batch read
    `memory_of(rows)` (rows: indices into the prompts). Every batch has `batch_size` rows (the last one repeats
    its last prompt), so a run compiles once."""
    n = len(tokens)
    batch_size = min(batch_size, n)
    out = np.zeros((n, steps), np.int32)
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size).clip(max=n - 1)
        real = min(batch_size, n - start)
        out[start:start + real] = greedy_generate(params, cfg, tokens[rows], lengths[rows], memory_of(rows), steps,
                                                  mesh=mesh, rules=rules)[:real]
    return out


# ------------------------------------------------------------------------------------------------ evaluation
def arm_references(arms: Sequence[str], oracle: np.ndarray, *, retrieved: np.ndarray | None = None,
                   seed: int = 0) -> dict[str, np.ndarray | None]:
    """The reference id each item reads per arm ([n] int64; -1 = empty slot; None = no memory at all)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown cloze arms {unknown}; known: {list(ARMS)}")
    oracle = np.asarray(oracle, np.int64)
    if "retrieved" in arms:
        if retrieved is None:
            raise ValueError("the 'retrieved' arm needs the retrieved ids (m3jax.retrieval.query.QueryRetriever)")
        retrieved = np.asarray(retrieved, np.int64)
        if retrieved.shape != oracle.shape:
            raise ValueError(f"retrieved ids {retrieved.shape} and oracle ids {oracle.shape} differ in shape")
    make = {"retrieved": lambda: retrieved, "oracle": lambda: oracle,
            "shuffled": lambda: shuffled_references(oracle, seed), "empty": lambda: np.full_like(oracle, -1),
            "off": lambda: None}
    return {arm: make[arm]() for arm in arms}


def complete(params: Mapping[str, Any], cfg: ModelConfig, tokenizer, prompts: Sequence[str],
             references: Mapping[str, np.ndarray | None], *, bank=None, sink: np.ndarray | None = None,
             steps: int = 6, batch_size: int = 32) -> dict[str, list[str]]:
    """Greedy continuations (decoded text) of `<s> + prompt` for each arm of `references` (`arm_references`).

    Every prompt must be shorter than `cfg.memory_chunk_size` tokens (one memory group). Batches have a fixed
    number of rows and prompts one padded length, so each arm compiles once."""
    if any(ids is not None for ids in references.values()) and (bank is None or sink is None):
        raise ValueError("arms that read memory need the bank and its sink tokens")
    tokens, lengths = encode_prompts(tokenizer, prompts, cfg.memory_chunk_size)
    out = {}
    for arm, ids in references.items():
        if ids is not None and len(ids) != len(prompts):
            raise ValueError(f"arm {arm!r}: {len(ids)} reference ids for {len(prompts)} prompts")

        def memory_of(rows, ids=ids):
            if ids is None:
                return no_memory(cfg, len(rows))
            return single_slot_memory(bank, ids[rows], sink, cfg.compute_dtype)

        generated = generate(params, cfg, tokens, lengths, memory_of, steps, batch_size=batch_size)
        out[arm] = [tokenizer.decode(g) for g in generated]
    return out


def summarize(correct: Mapping[str, np.ndarray], attributes: Sequence[str], heldout: np.ndarray,
              oracle: np.ndarray, retrieved: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy per split ("heldout", "train"), arm, overall and per attribute; retrieval recall@1 per split.

    correct: arm -> [n] bool; attributes: [n]; heldout: [n] bool; oracle / retrieved: reference ids [n]."""
    attributes, heldout = np.asarray(attributes), np.asarray(heldout, bool)
    out: dict[str, Any] = {}
    for split, rows in (("heldout", heldout), ("train", ~heldout)):
        if not rows.any():
            continue
        entry: dict[str, Any] = {"items": int(rows.sum()), "accuracy": {}, "by_attribute": {}}
        for arm, ok in correct.items():
            ok = np.asarray(ok, bool)
            entry["accuracy"][arm] = float(ok[rows].mean())
            entry["by_attribute"][arm] = {a: float(ok[rows & (attributes == a)].mean())
                                          for a in dict.fromkeys(attributes[rows].tolist())}
        if retrieved is not None:
            entry["recall_at_1"] = float((np.asarray(retrieved)[rows] == np.asarray(oracle)[rows]).mean())
        out[split] = entry
    return out
