"""Generation in three modes: the plain model, Memory3 (explicit memory, swapped every chunk) and RAG.

    generate(params, cfg, prompts, max_new_tokens, mode="memory3", source=BankMemories(...))

- "none": the plain model (no sink, positions from 0), whatever memory heads the model has.
- "memory3": the prompt is read chunk by chunk (`cfg.memory_chunk_size` = 64 tokens of each row's own text), each
  chunk with the `slots` (5) memories its text retrieves; decoding continues in the last prompt chunk's group, and
  after every 64 generated tokens the last 64 tokens of the row are the query for `slots` new memories, swapped
  into the KV cache (`KVCache.with_memories`: same shapes, no recompilation).
- "rag": the prompt retrieves `slots` references once; their text is put before the prompt and the plain model
  reads it.

Prompts are token lists of unequal lengths, batched left-padded (each row's positions start at its first real
token), decoded with a static-shape KV cache by jitted prefill and decode segments. Sampling is greedy
(`temperature=0`) or temperature with nucleus (top-p) truncation, from one PRNG key per step.

Memories come from a `MemorySource`: `BankMemories` reads a written bank through a `QueryRetriever` (embedder +
ScaNN index + the evaluation leakage filter, 2/3 against the question) and the bank's RAM cache.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.evals import cloze
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib
from m3jax.model.memory import Memory, valid_keys
from m3jax.retrieval.query import QueryRetriever

MODES = ("none", "memory3", "rag")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy; otherwise softmax(logits / temperature) restricted to the smallest set of tokens whose
    probability reaches `top_p`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class MemorySource(Protocol):
    """Where Memory3 and RAG generation get memories: a sink, retrieval, stored memories and reference tokens."""

    sink: np.ndarray  # [p] int32: the sink tokens the memories were written behind

    def retrieve(self, queries: Sequence[Sequence[int]], against: Sequence[Sequence[int]]) -> np.ndarray:
        """Token queries -> reference ids [q, slots] int32 (-1 = none), filtered against `against` [q]."""

    def memories(self, ids: np.ndarray, dtype) -> tuple[jax.Array, np.ndarray]:
        """ids [*s] -> (kv [*s, Lm, 2, mkv, k, d], positions [*s, Lm, mkv, k]; -1 = empty)."""

    def reference_tokens(self, ids: np.ndarray) -> np.ndarray:
        """ids [m] -> tokens [m, ref_len] (-1 padded)."""


class BankMemories:
    """A written bank (`m3jax.memory.bank.MemoryBank`, gathered through its RAM cache) and a `QueryRetriever` over
    its references' index; `tokenizer` decodes token queries to the text the embedder reads."""

    def __init__(self, bank, retriever: QueryRetriever, tokenizer):
        self.bank, self.retriever, self.tokenizer = bank, retriever, tokenizer
        self.sink = np.asarray(bank.metadata["sink_tokens"], np.int32)

    @classmethod
    def open(cls, bank_path: str, *, cfg: ModelConfig, retrieval, tokenizer, checkpoint, slots: int,
             index_path: str | None = None, allow_other_checkpoint: bool = False) -> BankMemories:
        """The bank at `bank_path` (refused unless written for `cfg`'s architecture and `tokenizer`, by the
        `checkpoint` identity, or another with `allow_other_checkpoint`), its index (default BANK/index, bound to
        the bank and the embedder of `retrieval` = a config's retrieval section) and a `slots`-reference retriever
        with the evaluation filter."""
        from m3jax.memory import bank as bank_lib
        from m3jax.retrieval import build
        from m3jax.retrieval.embedder import Embedder
        from m3jax.retrieval.index import Index

        bank = bank_lib.MemoryBank.open(bank_path, expect_architecture=bank_lib.architecture(cfg),
                                        expect_tokenizer=tokenizer.sha256, expect_checkpoint=checkpoint,
                                        allow_other_checkpoint=allow_other_checkpoint)
        embedder = Embedder.from_config(retrieval)
        index = Index.load(index_path or build.default_index_dir(bank_path), expect_embedder=embedder.identity,
                           expect_bank=build.bank_binding(bank))
        retriever = QueryRetriever.from_config(retrieval, embedder, index, bank.read_tokens, tokenizer, refs=slots)
        return cls(bank, retriever, tokenizer)

    def retrieve(self, queries, against):
        texts = [self.tokenizer.decode([t for t in q if t >= 0]) for q in queries]
        return self.retriever(texts, against=[np.asarray(a, np.int64) for a in against])

    def memories(self, ids, dtype):
        return self.bank.gather(np.asarray(ids, np.int64), dtype=dtype)

    def reference_tokens(self, ids):
        return self.bank.read_tokens(np.asarray(ids, np.int64))


@dataclasses.dataclass
class Generation:
    """tokens [b, n] int32 generated; logits [b, n, vocab] float32 (when asked) of each generated token's step;
    references: Memory3: per row, the ids each group read ([groups, slots]: the prompt's chunks, then one per 64
    generated tokens after the first); RAG: [1, slots], the references put before the prompt; prompts: the token
    lists the model was given (RAG: with the references' text)."""

    tokens: np.ndarray
    logits: np.ndarray | None
    references: list[np.ndarray]
    prompts: list[list[int]]


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             mode: str = "memory3", source: MemorySource | None = None, slots: int = 5,
             sampling: Sampling = Sampling(), return_logits: bool = False, bos_id: int | None = None) -> Generation:
    """`max_new_tokens` tokens after each prompt (token lists, bos included) in `mode` (the module docstring).
    `slots`: memories per chunk (Memory3) or references (RAG). `bos_id`: RAG puts the references after a leading
    bos of the prompt."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or min(map(len, prompts)) < 1:
        raise ValueError("every prompt needs at least one token")
    if mode != "none" and source is None:
        raise ValueError(f"mode {mode!r} needs a memory source (BankMemories)")
    if mode == "memory3" and not cfg.has_memory:
        raise ValueError("mode 'memory3' needs a model with memory heads (config.memory.heads)")
    references: list[np.ndarray] = []
    if mode == "rag":
        prompts, references = _rag_prompts(prompts, source, slots, bos_id)
    chunk = cfg.memory_chunk_size
    segment = min(chunk, max_new_tokens)
    segments = -(-max_new_tokens // segment)
    b, t = len(prompts), max(map(len, prompts))
    tokens, lengths = cloze.left_pad(prompts, t)
    col = np.arange(t)[None, :]
    pad = (t - lengths)[:, None]
    real = col >= pad
    offset = np.maximum(col - pad, 0)  # each row's own token index
    if mode == "memory3":
        memory, group_ids = _prompt_memory(cfg, prompts, source, slots)
        start = cfg.context_start(len(source.sink))
        memory_group = np.where(real, offset // chunk, -1).astype(np.int32)
        references = group_ids
    else:
        memory = cloze.no_memory(cfg, b)
        start = 0
        memory_group = np.where(real, 0, -1).astype(np.int32)
    max_len = memory.sink_len + t + segments * segment
    key = jax.random.PRNGKey(sampling.seed)
    cache, first_logits = _prefill_fn(cfg, max_len)(params, tokens, (start + offset).astype(np.int32),
                                                   real.astype(np.int32), memory_group, memory)
    token_logits = first_logits[:, :cfg.vocab_size]
    token = _sample(token_logits, jax.random.fold_in(key, 0), sampling, cfg.vocab_size)
    out_tokens, out_logits = [], []
    decode = _decode_fn(cfg, segment, sampling)
    history = [list(p) for p in prompts]
    for s in range(segments):
        if s > 0 and mode == "memory3":  # the last chunk generated is the query for the next chunk's memories
            queries = [h[-chunk:] for h in history]
            ids = source.retrieve(queries, against=queries)[:, :slots]
            kv, positions = source.memories(ids, cfg.compute_dtype)  # [b, S, Lm, 2, mkv, k, d]
            kv = jnp.moveaxis(jnp.asarray(kv), 2, 0)  # [Lm, b, S, 2, mkv, k, d]
            cache = cache.with_memories(kv[:, :, :, 0], kv[:, :, :, 1], jnp.asarray(valid_keys(positions)))
            references = [np.concatenate([r, i[None]]) for r, i in zip(references, ids, strict=True)]
        positions = (start + lengths + s * segment).astype(np.int32)
        cache, token, token_logits, seg_tokens, seg_logits = decode(params, cache, token, token_logits, positions,
                                                                    jax.random.fold_in(key, s + 1))
        seg_tokens = np.asarray(seg_tokens)
        out_tokens.append(seg_tokens)
        if return_logits:
            out_logits.append(np.asarray(seg_logits))
        for h, row in zip(history, seg_tokens, strict=True):
            h.extend(row.tolist())
    gen = np.concatenate(out_tokens, axis=1)[:, :max_new_tokens]
    logits = np.concatenate(out_logits, axis=1)[:, :max_new_tokens] if return_logits else None
    return Generation(tokens=gen, logits=logits, references=references, prompts=prompts)


# ------------------------------------------------------------------------------------------------ internals
def _rag_prompts(prompts, source, slots, bos_id):
    """The prompts with their `slots` references' tokens in front (after a leading bos), and the ids."""
    ids = source.retrieve(prompts, against=prompts)[:, :slots]
    out, refs = [], []
    for p, row in zip(prompts, ids, strict=True):
        row = row[row >= 0]
        text = [int(x) for r in (source.reference_tokens(row) if row.size else []) for x in r if x >= 0]
        head = [p[0]] if bos_id is not None and p and p[0] == bos_id else []
        out.append(head + text + p[len(head):])
        refs.append(row[None])
    return out, refs


def _prompt_memory(cfg, prompts, source, slots):
    """Memory3's prompt memories: every row's chunk g (its tokens [64g, 64g + 64)) reads the `slots` references
    its own text retrieves (filtered against the whole prompt). Returns the Memory (row i's memories: its groups'
    slots, in order) and per row the ids [groups, slots]."""
    chunk = cfg.memory_chunk_size
    b = len(prompts)
    groups = -(-max(map(len, prompts)) // chunk)
    queries, against, where = [], [], []
    for i, p in enumerate(prompts):
        for g in range(-(-len(p) // chunk)):
            queries.append(p[g * chunk:(g + 1) * chunk])
            against.append(p)
            where.append((i, g))
    found = source.retrieve(queries, against=against)[:, :slots]
    ids = np.full((b, groups, slots), -1, np.int64)
    for (i, g), row in zip(where, found, strict=True):
        ids[i, g, : row.size] = row
    kv, positions = source.memories(ids.reshape(b, groups * slots), cfg.compute_dtype)
    index = np.where(ids >= 0, np.arange(groups * slots).reshape(groups, slots)[None], -1).astype(np.int32)
    memory = Memory.from_rows(kv, index, valid_keys(positions), source.sink)
    per_row = [ids[i, : -(-len(p) // chunk)] for i, p in enumerate(prompts)]
    return memory, per_row


def _sample(logits, key, sampling: Sampling, vocab_size: int):
    """logits [b, padded_vocab] -> tokens [b] int32 (greedy or temperature + top-p)."""
    logits = logits[:, :vocab_size].astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        order = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(order, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        cutoff = jnp.min(jnp.where(before < sampling.top_p, order, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.cache
def _prefill_fn(cfg: ModelConfig, max_len: int):
    def prefill(params, tokens, positions, segment_ids, memory_group, memory):
        logits, cache = params_lib.model_from(cfg, params).prefill(tokens, positions, segment_ids, memory_group,
                                                                   memory, max_len)
        return cache, logits[:, -1].astype(jnp.float32)
    return jax.jit(prefill)


@functools.cache
def _decode_fn(cfg: ModelConfig, steps: int, sampling: Sampling):
    """jit(params, cache, token [b] (sampled, not yet fed), token_logits [b, vocab] (what it was sampled from),
    positions [b] (its position), key) -> (cache, next token, its logits, tokens [b, steps], logits [b, steps,
    vocab]): `steps` tokens emitted, starting with `token`, each with the logits it was sampled from."""

    def decode(params, cache, token, token_logits, positions, key):
        model = params_lib.model_from(cfg, params)

        def step(carry, i):
            token, token_logits, cache = carry
            logits, cache = model.decode_step(token[:, None], (positions + i)[:, None], cache)
            logits = logits[:, 0, :cfg.vocab_size].astype(jnp.float32)
            nxt = _sample(logits, jax.random.fold_in(key, i), sampling, cfg.vocab_size)
            return (nxt, logits, cache), (token, token_logits)

        (nxt, nxt_logits, cache), (tokens, logits) = jax.lax.scan(
            step, (token, token_logits, cache), jnp.arange(steps, dtype=jnp.int32))
        return cache, nxt, nxt_logits, tokens.T, jnp.moveaxis(logits, 0, 1)

    return jax.jit(decode)
