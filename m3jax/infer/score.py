"""Log-likelihood of continuations given contexts, in generation's three modes: how evaluation scores answers.

    score(params, cfg, contexts, continuations, mode="memory3", source=BankMemories(...))

Each item is a context (token list, bos included) and a continuation (token list). One forward pass over
`context + continuation[:-1]` gives the log-probability of every continuation token; the item's score is their sum,
with the token count and whether greedy decoding would have produced the continuation (every token the argmax).
What the model reads is what `generate` would have read while producing the continuation:
- "none": the plain model (no sink, positions from 0);
- "memory3": context chunk g (tokens [64g, 64g + 64)) reads the `slots` memories its own text retrieves, filtered
  against the whole context; the continuation reads the last context chunk's memories (as generation's first
  decoded chunk does), in groups of at most 64 tokens. Retrieval never sees the continuation;
- "rag": the `slots` references the context retrieves, their text put before the context (after a leading bos).
Items are batched right-padded (padding is segment 0, never attended and never scored).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.evals import cloze
from m3jax.infer.generate import MODES, MemorySource, _prompt_memory, _rag_prompts
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per item: the continuation's summed log-probability, its token count, whether it is the greedy
    continuation, and (memory3, rag) the reference ids the context read: [groups, slots] or [1, refs]."""

    logprob: np.ndarray  # [n] float64
    tokens: np.ndarray  # [n] int64
    greedy: np.ndarray  # [n] bool
    references: list[np.ndarray]


def score(params, cfg: ModelConfig, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
          mode: str = "memory3", source: MemorySource | None = None, slots: int = 5, bos_id: int | None = None,
          batch_size: int = 16) -> Scores:
    """Scores every (context, continuation) pair (the module docstring), `batch_size` items per forward pass."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts for {len(continuations)} continuations")
    contexts = [list(map(int, c)) for c in contexts]
    continuations = [list(map(int, c)) for c in continuations]
    for i, (c, a) in enumerate(zip(contexts, continuations, strict=True)):
        if not c or not a:
            raise ValueError(f"item {i}: the context and the continuation each need at least one token")
    if mode != "none" and source is None:
        raise ValueError(f"mode {mode!r} needs a memory source (BankMemories)")
    if mode == "memory3" and not cfg.has_memory:
        raise ValueError("mode 'memory3' needs a model with memory heads (config.memory.heads)")
    logprob, count, greedy, references = [], [], [], []
    for lo in range(0, len(contexts), batch_size):
        ctx, cont = contexts[lo:lo + batch_size], continuations[lo:lo + batch_size]
        if mode == "rag":
            ctx, refs = _rag_prompts(ctx, source, slots, bos_id)
            references.extend(refs)
        lp, g, refs = _score_batch(params, cfg, ctx, cont, mode, source, slots)
        references.extend(refs)  # memory3's groups (rag's were kept above)
        logprob.append(lp)
        greedy.append(g)
        count.append([len(a) for a in cont])
    return Scores(np.concatenate(logprob), np.concatenate(count).astype(np.int64), np.concatenate(greedy),
                  references)


def _score_batch(params, cfg, contexts, continuations, mode, source, slots):
    chunk = cfg.memory_chunk_size
    b = len(contexts)
    seqs = [c + a[:-1] for c, a in zip(contexts, continuations, strict=True)]
    t = max(map(len, seqs))
    tokens = np.zeros((b, t), np.int32)
    segment = np.zeros((b, t), np.int32)
    targets = np.zeros((b, t), np.int32)
    scored = np.zeros((b, t), bool)
    for i, (c, a) in enumerate(zip(contexts, continuations, strict=True)):
        tokens[i, :len(seqs[i])] = seqs[i]
        segment[i, :len(seqs[i])] = 1
        targets[i, len(c) - 1:len(c) - 1 + len(a)] = a
        scored[i, len(c) - 1:len(c) - 1 + len(a)] = True
    references = []
    if mode == "memory3":
        memory, references = _prompt_memory(cfg, contexts, source, slots)
        index = np.asarray(memory.index)
        # The continuation reads the last context group's slots; a run longer than a chunk continues in new groups
        # that point at the same memories (several groups may read a memory; no group reads one twice).
        extra = max(-(-len(a) // chunk) for a in continuations)
        index = np.concatenate([index, np.full((b, extra, slots), -1, np.int32)], axis=1)
        memory_group = np.full((b, t), -1, np.int32)
        for i, c in enumerate(contexts):
            last = (len(c) - 1) // chunk
            memory_group[i, :len(c)] = np.arange(len(c)) // chunk
            g, run, fresh = last, len(c) - last * chunk, index.shape[1] - extra
            for m in range(len(c), len(seqs[i])):
                if run == chunk:
                    g, fresh, run = fresh, fresh + 1, 0
                    index[i, g] = index[i, last]
                memory_group[i, m], run = g, run + 1
        memory = dataclasses.replace(memory, index=jnp.asarray(index))
        start = cfg.context_start(len(source.sink))
    else:
        memory = cloze.no_memory(cfg, b)
        memory_group = np.where(segment > 0, 0, -1).astype(np.int32)
        start = 0
    positions = (start + np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))).astype(np.int32)
    lp, greedy = token_logprob_fn(cfg)(params, tokens, positions, segment, memory_group, memory, targets)
    lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
    return (np.where(scored, lp, 0.0).sum(axis=1), np.where(scored, greedy, True).all(axis=1), references)


@functools.cache
def token_logprob_fn(cfg: ModelConfig):
    """jit(params, tokens, positions, segment_ids, memory_group, memory, targets) -> (log-probability of each
    target [b, t] float32, whether it is the argmax [b, t]): one forward pass."""

    def forward(params, tokens, positions, segment, memory_group, memory, targets):
        logits = params_lib.model_from(cfg, params)(tokens, positions, segment, memory_group, memory)
        logits = logits[..., :cfg.vocab_size].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return target_lp, jnp.argmax(logits, axis=-1) == targets
    return jax.jit(forward)
