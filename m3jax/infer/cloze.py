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

Memories come from a bank (`MemoryBank.gather`, decoded in the model's compute dtype). Positions follow
docs/memory.md: sink [0, p), memory keys [p, p + ref_len), the prompt from p + ref_len. "off" runs the same
jitted path with a zero-length sink and an empty slot, which is the plain model (tests/test_cloze.py checks it
against the model without a `Memory`).

Generation is batched: prompts are left-padded to one length (padding is segment 0, never attended), each row's
positions start at its first real token, and `Transformer.prefill` + `decode_step` run inside one jit per
(batch, prompt length, steps, sink length).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def retrieve_top1(embedder, index, prompts: Sequence[str]) -> np.ndarray:
    """The index's best reference for each prompt's text: ids [n] int64 (-1 where the index found none)."""
    ids, _ = index.search(embedder.embed(list(prompts)), 1)
    return ids[:, 0]


def single_slot_memory(bank, ids: np.ndarray, sink: np.ndarray, dtype) -> Memory:
    """Row i reads memory `ids[i]` from `bank` in its one group and slot (-1: the slot is empty)."""
    ids = np.asarray(ids, np.int64)
    kv, positions = bank.gather(ids[:, None], dtype=dtype)  # [b, 1, Lm, 2, mkv, k, d], [b, 1, Lm, mkv, k]
    index = np.where(ids >= 0, 0, -1).astype(np.int32)[:, None, None]
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


@functools.cache
def _greedy_fn(cfg: ModelConfig, steps: int):
    """jit(params, tokens [b, t], lengths [b], memory, start) -> greedy tokens [b, steps] int32."""

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

    return jax.jit(greedy)


def greedy_generate(params: Mapping[str, Any], cfg: ModelConfig, tokens: np.ndarray, lengths: np.ndarray,
                    memory: Memory, steps: int) -> np.ndarray:
    """`steps` greedy tokens after each left-padded prompt (tokens [b, t], lengths [b]) reading `memory` (one group
    per row; `no_memory(cfg, b)` for the plain model) -> [b, steps] int32. The prompt's first real token sits at
    position `cfg.context_start(p)` (0 without a sink)."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if not cfg.has_memory:
        raise ValueError("the model config has no memory heads (config.memory.heads=False)")
    start = 0 if memory.sink_len == 0 else cfg.context_start(memory.sink_len)
    out = _greedy_fn(cfg, steps)(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), memory,
                                 jnp.int32(start))
    return np.asarray(out)


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
            raise ValueError("the 'retrieved' arm needs the retrieved ids (retrieve_top1)")
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
    if not prompts:
        raise ValueError("no cloze prompts")
    if any(ids is not None for ids in references.values()) and (bank is None or sink is None):
        raise ValueError("arms that read memory need the bank and its sink tokens")
    encoded = [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(list(prompts))]
    too_long = [i for i, p in enumerate(encoded) if len(p) >= cfg.memory_chunk_size]
    if too_long:
        i = too_long[0]
        raise ValueError(f"cloze prompt {i} ({prompts[i]!r}) is {len(encoded[i])} tokens: a prompt must fit one "
                         f"memory group (< chunk_size={cfg.memory_chunk_size})")
    n, batch_size = len(encoded), min(batch_size, len(encoded))
    tokens, lengths = left_pad(encoded, max(map(len, encoded)))
    out = {}
    for arm, ids in references.items():
        if ids is not None and len(ids) != n:
            raise ValueError(f"arm {arm!r}: {len(ids)} reference ids for {n} prompts")
        generated = np.zeros((n, steps), np.int32)
        for start in range(0, n, batch_size):
            rows = np.arange(start, start + batch_size).clip(max=n - 1)  # the last batch repeats its last row
            real = min(batch_size, n - start)
            memory = (no_memory(cfg, batch_size) if ids is None
                      else single_slot_memory(bank, ids[rows], sink, cfg.compute_dtype))
            generated[start:start + real] = greedy_generate(params, cfg, tokens[rows], lengths[rows], memory,
                                                            steps)[:real]
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
