"""Evaluation suites of a checkpoint, each in generation's three modes (none, memory3, rag), side by side.

- `entity_knowledge`: the continued stage's controlled task (tools/make_entities.py). For each held-out entity's
  attribute prompt: greedy exact match of the answer's first word, the answer's loss (nats per token of
  " <answer>"), and the retrieval recall@1 of the entity's own reference, memory retrieved by the prompt only.
- `multiple_choice`: items {context, choices, answer}; each choice is scored by the log-likelihood of " <choice>"
  after the context (as lm-evaluation-harness does: `acc` by the summed log-likelihood, `acc_norm` by it per
  character of the choice); retrieval reads the context only, never the choices.
- `knowledge_cloze`: windows of held-out documents (in the knowledge base, never in the training data): the
  question is `question_tokens` of a document, the answer its next `answer_tokens`; the answer's loss, and as
  multiple choice its accuracy against the same-length continuations of `distractors` other documents.
- `passage_perplexity`: held-out passages with causal retrieval: chunk g reads the memories the text of chunk g - 1
  retrieves, filtered against the whole passage (the first chunk reads none); RAG puts the references the first
  chunk retrieves (filtered alike) before the passage. Reports nats per token and perplexity of the same tokens
  in every mode.
- `decode_speed`: generation throughput of the same prompts in every mode, timed side by side in one process
  (each mode's first run compiles and is not counted): Memory3 retrieves and swaps memories every 64 generated
  tokens, RAG decodes after its references in the context.

Every item is scored (nothing is dropped to fill a batch). Retrieval uses the `MemorySource`'s filter (the
evaluation threshold, eq. 6 at `retrieval.eval_max_overlap` against the question).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import numpy as np

from m3jax.evals import cloze
from m3jax.infer.generate import MODES, MemorySource, generate
from m3jax.infer.score import score, token_logprob_fn
from m3jax.model import ModelConfig
from m3jax.model.memory import Memory, valid_keys


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """What every suite needs: the parameters and their config, the tokenizer, the memory source (None: only mode
    "none" can run), the modes to report, memories per chunk, and the batch size of forward passes."""

    params: object
    cfg: ModelConfig
    tokenizer: object
    source: MemorySource | None
    modes: tuple[str, ...] = MODES
    slots: int = 5
    batch_size: int = 16

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"modes {bad} are not among {MODES}")
        if self.source is None and set(self.modes) - {"none"}:
            raise ValueError(f"modes {sorted(set(self.modes) - {'none'})} need a memory source (a bank and index)")

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.tokenizer.bos_id, *ids] for ids in self.tokenizer.encode_batch(list(texts))]

    def score(self, contexts, continuations, mode):
        return score(self.params, self.cfg, contexts, continuations, mode=mode, source=self.source, slots=self.slots,
                     bos_id=self.tokenizer.bos_id, batch_size=self.batch_size)


# ------------------------------------------------------------------------------------------------ entities
def entity_knowledge(ev: Evaluator, items: Sequence[dict], own_reference: np.ndarray,
                     max_new_tokens: int = 6) -> dict:
    """items: cloze items ({prompt, answer, attribute}); own_reference[i]: the id of item i's entity reference
    (-1 = not in the source). Returns per mode accuracy and answer loss (overall and per attribute), and the
    prompts' recall@1 of their own reference."""
    prompts = ev.encode([it["prompt"] for it in items])
    answers = ev.tokenizer.encode_batch([" " + it["answer"] for it in items])
    attributes = [it.get("attribute", "") for it in items]
    out: dict = {"items": len(items)}
    if ev.source is not None:
        top = ev.source.retrieve(prompts, against=prompts)[:, 0]
        out["recall_at_1"] = float(np.mean(top == np.asarray(own_reference)))
    for mode in ev.modes:
        texts = []
        for lo in range(0, len(prompts), ev.batch_size):
            gen = generate(ev.params, ev.cfg, prompts[lo:lo + ev.batch_size], max_new_tokens, mode=mode,
                           source=ev.source, slots=ev.slots, bos_id=ev.tokenizer.bos_id)
            texts.extend(ev.tokenizer.decode(row.tolist()) for row in gen.tokens)
        correct = np.asarray([cloze.exact_match(t, it["answer"]) for t, it in zip(texts, items, strict=True)])
        s = ev.score(prompts, answers, mode)
        nll = -s.logprob / s.tokens
        out[mode] = {"accuracy": float(correct.mean()), "answer_loss": float(nll.mean()),
                     "by_attribute": {a: {"accuracy": float(correct[m].mean()), "answer_loss": float(nll[m].mean())}
                                      for a in sorted(set(attributes))
                                      for m in [np.asarray(attributes) == a]}}
    return out


# ------------------------------------------------------------------------------------------------ decode speed
def decode_speed(ev: Evaluator, prompts: Sequence[Sequence[int]], new_tokens: int, repeats: int = 2) -> dict:
    """Greedy generation of `new_tokens` after every prompt (token lists, bos included), all prompts in one batch,
    in each mode: the best of `repeats` timed runs after one compiling run. Per mode: tokens_per_s (generated tokens
    over wall seconds, retrieval and memory loading included) and seconds."""
    if not prompts:
        raise ValueError("decode_speed: no prompts")
    out: dict = {"prompts": len(prompts), "new_tokens": int(new_tokens)}
    for mode in ev.modes:
        runs = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            gen = generate(ev.params, ev.cfg, prompts, new_tokens, mode=mode, source=ev.source, slots=ev.slots,
                           bos_id=ev.tokenizer.bos_id)
            jax.block_until_ready(gen.tokens)
            runs.append(time.perf_counter() - t0)
        seconds = min(runs[1:])
        out[mode] = {"tokens_per_s": len(prompts) * new_tokens / seconds, "seconds": seconds}
    return out


# ------------------------------------------------------------------------------------------------ choices
def multiple_choice(ev: Evaluator, items: Sequence[dict]) -> dict:
    """items: {context, choices (list of str), answer (index)}. Per mode: acc, acc_norm."""
    for i, it in enumerate(items):
        if not it.get("choices") or not 0 <= int(it.get("answer", -1)) < len(it["choices"]):
            raise ValueError(f"item {i}: needs choices and an answer index into them, got {it!r}"[:300])
    contexts, conts, owner, chars = [], [], [], []
    encoded = ev.encode([it["context"] for it in items])
    for i, (it, ctx) in enumerate(zip(items, encoded, strict=True)):
        for choice in it["choices"]:
            contexts.append(ctx)
            conts.append(ev.tokenizer.encode(" " + choice))
            owner.append(i)
            chars.append(len(" " + choice))
    owner, chars = np.asarray(owner), np.asarray(chars, np.float64)
    answers = np.asarray([int(it["answer"]) for it in items])
    out: dict = {"items": len(items)}
    for mode in ev.modes:
        lp = ev.score(contexts, conts, mode).logprob
        acc, acc_norm = [], []
        for i in range(len(items)):
            mine = owner == i
            acc.append(np.argmax(lp[mine]) == answers[i])
            acc_norm.append(np.argmax(lp[mine] / chars[mine]) == answers[i])
        out[mode] = {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}
    return out


# ------------------------------------------------------------------------------------------------ held-out text
def document_windows(documents: Sequence[Sequence[int]], question_tokens: int, answer_tokens: int,
                     distractors: int, seed: int = 0) -> list[dict]:
    """One cloze item per document long enough: the question is its first `question_tokens` tokens (after bos),
    the answer the next `answer_tokens`; the choices are the answer and the same span of `distractors` other
    documents (seeded), in a random order. Documents are token lists without bos."""
    long = [d for d in documents if len(d) >= question_tokens + answer_tokens]
    if len(long) <= distractors:
        raise ValueError(f"{len(long)} documents of at least {question_tokens + answer_tokens} tokens: too few for "
                         f"{distractors} distractors each")
    rng = np.random.default_rng(seed)
    spans = [list(d[question_tokens:question_tokens + answer_tokens]) for d in long]
    items = []
    for i, d in enumerate(long):
        others = rng.choice([j for j in range(len(long)) if j != i], distractors, replace=False)
        choices = [spans[i], *(spans[j] for j in others)]
        order = rng.permutation(len(choices))
        items.append({"question": list(d[:question_tokens]), "choices": [choices[k] for k in order],
                      "answer": int(np.flatnonzero(order == 0)[0])})
    return items


def knowledge_cloze(ev: Evaluator, items: Sequence[dict]) -> dict:
    """items of `document_windows`. Per mode: the answer's loss (nats per token) and multiple-choice accuracy."""
    bos = ev.tokenizer.bos_id
    contexts = [[bos, *it["question"]] for it in items for _ in it["choices"]]
    conts = [c for it in items for c in it["choices"]]
    owner = np.repeat(np.arange(len(items)), [len(it["choices"]) for it in items])
    out: dict = {"items": len(items)}
    for mode in ev.modes:
        s = ev.score(contexts, conts, mode)
        loss, correct = [], []
        for i, it in enumerate(items):
            lp, n = s.logprob[owner == i], s.tokens[owner == i]
            loss.append(-lp[it["answer"]] / n[it["answer"]])
            correct.append(np.argmax(lp) == it["answer"])
        out[mode] = {"answer_loss": float(np.mean(loss)), "accuracy": float(np.mean(correct))}
    return out


def passage_perplexity(ev: Evaluator, passages: Sequence[Sequence[int]]) -> dict:
    """passages: token lists without bos, each at most what the model reads at once. Per mode: nats per token of
    every passage token after the first, and perplexity."""
    bos = ev.tokenizer.bos_id
    out: dict = {"passages": len(passages), "tokens": int(sum(len(p) for p in passages))}
    for mode in ev.modes:
        total, count = 0.0, 0
        for lo in range(0, len(passages), ev.batch_size):
            batch = [[bos, *p] for p in passages[lo:lo + ev.batch_size]]
            lp, n = _passage_logprob(ev, batch, mode)
            total, count = total + float(lp.sum()), count + int(n.sum())
        out[mode] = {"loss": -total / count, "perplexity": math.exp(-total / count)}
    return out


def _passage_logprob(ev: Evaluator, passages: list[list[int]], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probabilities of tokens 1.. of each passage (bos first) and their counts."""
    if mode == "rag":  # the references the first chunk retrieves, before the whole passage
        chunk = ev.cfg.memory_chunk_size
        ids = ev.source.retrieve([p[:chunk] for p in passages], against=passages)[:, :ev.slots]
        contexts = []
        for p, row in zip(passages, ids, strict=True):
            row = row[row >= 0]
            text = [int(x) for r in (ev.source.reference_tokens(row) if row.size else []) for x in r if x >= 0]
            contexts.append([p[0], *text])
        s = ev.score(contexts, [p[1:] for p in passages], "none")
        return s.logprob, s.tokens
    if mode == "none":
        s = ev.score([[p[0]] for p in passages], [p[1:] for p in passages], "none")
        return s.logprob, s.tokens
    return _causal_memory_logprob(ev, passages)


def _causal_memory_logprob(ev: Evaluator, passages: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    cfg, source, slots = ev.cfg, ev.source, ev.slots
    chunk = cfg.memory_chunk_size
    b, t = len(passages), max(map(len, passages)) - 1
    groups = -(-t // chunk)
    tokens, targets = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    segment = np.zeros((b, t), np.int32)
    queries, against, where = [], [], []
    for i, p in enumerate(passages):
        n = len(p) - 1
        tokens[i, :n], targets[i, :n], segment[i, :n] = p[:-1], p[1:], 1
        for g in range(1, -(-n // chunk)):  # group g reads what chunk g - 1's text retrieves
            queries.append(p[(g - 1) * chunk:g * chunk])
            against.append(p)
            where.append((i, g))
    ids = np.full((b, groups, slots), -1, np.int64)
    if queries:
        found = source.retrieve(queries, against=against)[:, :slots]
        for (i, g), row in zip(where, found, strict=True):
            ids[i, g, :row.size] = row
    kv, positions = source.memories(ids.reshape(b, groups * slots), cfg.compute_dtype)
    index = np.where(ids >= 0, np.arange(groups * slots).reshape(groups, slots)[None], -1).astype(np.int32)
    memory = Memory.from_rows(kv, index, valid_keys(positions), source.sink)
    memory_group = np.where(segment > 0, np.arange(t)[None] // chunk, -1).astype(np.int32)
    start = cfg.context_start(len(source.sink))
    pos = (start + np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))).astype(np.int32)
    lp, _ = token_logprob_fn(cfg)(ev.params, tokens, pos, segment, memory_group, memory, targets)
    lp = np.asarray(lp, np.float64)
    return np.where(segment > 0, lp, 0.0).sum(axis=1), segment.sum(axis=1).astype(np.int64)
