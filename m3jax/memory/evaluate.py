"""Loss on held-out text with and without explicit memory: the read side measured on the write side's memories.

A *passage* is a reference cut from a held-out document (at most `ref_len` tokens). Each passage is scored as
the context `<s> + passage` (next-token loss on the passage's tokens) under these conditions:

    own k=K CODEC      the memory of the passage's own reference (encode_references, top-K tokens per memory
                       head, stored with CODEC and decoded as the bank would), read by every chunk of the context
    shuffled k=K CODEC the memory of another passage's reference (from another document when there is one)
    empty              memory on, every slot empty: the context sees the sink only (the paper's "without memory")
    off                the plain model on `<s> + passage` at positions 0… (what a warm-up model was trained on)

Positions follow docs/memory.md: the sink at [0, p), memory keys at [p, p + ref_len), the context at
p + ref_len + i. Memory conditions give the reference as the single memory of every `chunk_size`-token group
of the context. The context *is* the reference's text, so "own" measures how well a model reads back a text it
holds in memory; "shuffled" is the control for reading any memory at all.

Codecs: any of m3jax.memory.codecs (bf16, int8: encoded and decoded exactly as the bank does), or "none", the
encoder's output as computed (compute dtype), which is what the oracle of the read path pins.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.data.corpus import Document
from m3jax.data.prepare import heldout_split
from m3jax.data.tokenizer import Tokenizer
from m3jax.memory.codecs import get_codec
from m3jax.memory.encode import encode_references
from m3jax.model import params as params_lib
from m3jax.model.config import ModelConfig
from m3jax.model.memory import Memory, valid_keys

NO_CODEC = "none"  # the encoder's output as it is, not stored


# ------------------------------------------------------------------------------------------------ passages
@dataclasses.dataclass(frozen=True)
class Passages:
    """n passages: tokens [n, ref_len] int32 (0 past a passage's length), lengths [n], doc_ids (one each)."""

    tokens: np.ndarray
    lengths: np.ndarray
    doc_ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.doc_ids)


def heldout_passages(docs: Sequence[Document], tokenizer: Tokenizer, *, heldout_fraction: float, seed: int,
                     ref_len: int, num_passages: int, min_tokens: int = 32) -> Passages:
    """Passages of the held-out documents (the split `m3jax.data.prepare` never trains on).

    Each held-out document is tokenized whole and cut into consecutive `ref_len`-token pieces; pieces shorter
    than `min_tokens` (a document's tail) are dropped. Passages are taken round-robin over the documents (the
    first piece of every document, then the second, ...), so a small `num_passages` still spans the documents.
    """
    held = [d for d in docs if heldout_split(d.doc_id, heldout_fraction, seed)]
    if not held:
        raise ValueError(f"no held-out documents among {len(docs)} at heldout_fraction={heldout_fraction}")
    pieces_of = []
    for doc, ids in zip(held, tokenizer.encode_batch([d.text for d in held]), strict=True):
        pieces = [ids[s:s + ref_len] for s in range(0, len(ids), ref_len)]
        pieces_of.append([(doc.doc_id, p) for p in pieces if len(p) >= min_tokens])
    chosen = []
    for r in range(max(map(len, pieces_of))):
        chosen.extend(pieces[r] for pieces in pieces_of if r < len(pieces))
    chosen = chosen[:num_passages]
    if not chosen:
        raise ValueError(f"the {len(held)} held-out documents hold no passage of at least {min_tokens} tokens")
    tokens = np.zeros((len(chosen), ref_len), np.int32)
    for i, (_, ids) in enumerate(chosen):
        tokens[i, :len(ids)] = ids
    return Passages(tokens=tokens, lengths=np.asarray([len(p) for _, p in chosen], np.int32),
                    doc_ids=tuple(doc_id for doc_id, _ in chosen))


def shuffled_partners(doc_ids: Sequence[str]) -> np.ndarray:
    """partner[i] != i for every passage (n >= 2), from another document whenever the passages span several:
    passage i takes the first passage at or after i + n // 2 (cyclically) whose document differs from i's."""
    n = len(doc_ids)
    if n < 2:
        raise ValueError("a shuffled-memory control needs at least 2 passages")
    partner = np.empty(n, np.int64)
    for i in range(n):
        order = [(i + n // 2 + j) % n for j in range(n)]
        partner[i] = next((j for j in order if doc_ids[j] != doc_ids[i]), next(j for j in order if j != i))
    return partner


# ------------------------------------------------------------------------------------------------ scoring
@dataclasses.dataclass(frozen=True)
class Context:
    """The context of a batch of passages: inputs `<s> + passage[:-1]`, targets `passage`; all [b, ref_len]."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray  # 1.0 on a passage's tokens, 0.0 past its length
    segment_ids: np.ndarray  # 1 on a passage's tokens, 0 (padding) past it
    memory_group: np.ndarray  # i // chunk_size on a passage's tokens, -1 past it

    @classmethod
    def of(cls, tokens: np.ndarray, lengths: np.ndarray, bos_id: int, chunk_size: int) -> Context:
        b, t = tokens.shape
        real = np.arange(t)[None, :] < lengths[:, None]
        inputs = np.concatenate([np.full((b, 1), bos_id, np.int32), tokens[:, :-1]], axis=1)
        group = np.broadcast_to(np.arange(t, dtype=np.int32) // chunk_size, (b, t))
        return cls(inputs=np.where(real, inputs, 0).astype(np.int32), targets=np.where(real, tokens, 0),
                   weights=real.astype(np.float32), segment_ids=real.astype(np.int32),
                   memory_group=np.where(real, group, -1).astype(np.int32))

    def positions(self, start: int) -> np.ndarray:
        b, t = self.inputs.shape
        return np.broadcast_to(start + np.arange(t, dtype=np.int32), (b, t))


@functools.cache
def _nll_fn(cfg: ModelConfig):
    """jit(params, inputs, positions, segment_ids, targets, weights, memory_group, memory) -> nll sums [b]."""

    def nll(params, inputs, positions, segment_ids, targets, weights, memory_group, memory):
        logits = params_lib.model_from(cfg, params)(inputs, positions, segment_ids, memory_group, memory)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights, axis=-1)

    return jax.jit(nll)


def single_memory(kv, positions, sink: np.ndarray, groups: int) -> Memory:
    """A `Memory` in which row i reads memory i in every one of its `groups` groups (one slot each).

    kv: [b, Lm, 2, mkv, k, d] (encode_references' layout, decoded); positions: [b, Lm, mkv, k] (-1 = padding).
    """
    b = kv.shape[0]
    return Memory.from_rows(kv[:, None], np.zeros((b, groups, 1), np.int32), valid_keys(positions)[:, None], sink)


def stored(kv: jax.Array, codec: str) -> jax.Array:
    """kv as the bank gives it back with `codec` (encoded, decoded to kv's dtype); "none" = kv itself."""
    return kv if codec == NO_CODEC else _round_trip(codec)(kv)


@functools.cache
def _round_trip(codec: str):
    c = get_codec(codec)
    return jax.jit(lambda kv: c.decode(c.encode(kv), dtype=kv.dtype))


def condition_names(ks: Sequence[int], codecs: Sequence[str]) -> list[str]:
    """The conditions `passage_nll` scores, in table order."""
    names = [f"own k={k} {c}" for k in ks for c in codecs]
    names += [f"shuffled k={k} {codecs[0]}" for k in ks]
    return names + ["empty", "off"]


def passage_nll(params: Mapping[str, Any], cfg: ModelConfig, passages: Passages, sink: np.ndarray, *, bos_id: int,
                ks: Sequence[int], codecs: Sequence[str], batch_size: int = 16,
                partners: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Summed next-token loss of each passage's context under each condition (see the module docstring).

    params: the model's parameter dict; cfg: a ModelConfig with memory layers. Returns {condition: nll [n]
    float64} plus "tokens": the scored tokens of each passage [n]. Shuffled memories use `partners` (default
    `shuffled_partners`) and the first codec. Passages are `cfg.memory_ref_len` tokens long.
    """
    if not cfg.has_memory:
        raise ValueError("the model config has no memory heads (config.memory.heads=False)")
    n, p, ref_len = len(passages), len(sink), cfg.memory_ref_len
    if passages.tokens.shape[1] != ref_len:
        raise ValueError(f"passages of {passages.tokens.shape[1]} tokens, expected ref_len={ref_len}")
    partners = shuffled_partners(passages.doc_ids) if partners is None else np.asarray(partners)
    groups = math.ceil(ref_len / cfg.memory_chunk_size)
    nll = _nll_fn(cfg)
    batch_size = min(batch_size, n)
    out = {name: np.zeros(n) for name in condition_names(ks, codecs)}
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size).clip(max=n - 1)  # the last batch repeats its last row: one
        real = slice(0, min(batch_size, n - start))  # shape for every batch, one compilation
        ctx = Context.of(passages.tokens[rows], passages.lengths[rows], bos_id, cfg.memory_chunk_size)
        score = functools.partial(nll, params, ctx.inputs)
        mem_pos = ctx.positions(cfg.context_start(p))
        for k in ks:
            for who, ids in (("own", rows), ("shuffled", partners[rows])):
                kv, positions = encode_references(params, cfg, passages.tokens[ids], passages.lengths[ids], sink, k=k)
                for codec in codecs if who == "own" else codecs[:1]:
                    memory = single_memory(stored(kv, codec), positions, sink, groups)
                    out[f"{who} k={k} {codec}"][rows[real]] = score(
                        mem_pos, ctx.segment_ids, ctx.targets, ctx.weights, ctx.memory_group, memory)[real]
        empty = Memory.empty(sink, batch=batch_size, groups=groups, slots=1, memory_layers=len(cfg.memory_layers),
                             kv_heads=len(cfg.memory_kv_heads), k=1, head_dim=cfg.head_dim,
                             dtype=cfg.compute_dtype)
        out["empty"][rows[real]] = score(mem_pos, ctx.segment_ids, ctx.targets, ctx.weights, ctx.memory_group,
                                         empty)[real]
        out["off"][rows[real]] = score(ctx.positions(0), ctx.segment_ids, ctx.targets, ctx.weights, None, None)[real]
    out["tokens"] = passages.lengths.astype(np.float64)
    return out


def _sem(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def paired_difference(nll: Mapping[str, np.ndarray], a: str, b: str) -> dict[str, float]:
    """Condition a − condition b on the passages' mean losses: mean, standard error over passages, max |·|."""
    diff = (nll[a] - nll[b]) / nll["tokens"]
    return {"mean": float(diff.mean()), "sem": _sem(diff), "max_abs": float(np.abs(diff).max())}


def summarize(nll: Mapping[str, np.ndarray], baselines: Sequence[str] = ("empty", "off")) -> dict[str, dict]:
    """Per condition: the token-weighted mean loss, the mean of the passages' mean losses with its standard
    error over passages, and the paired difference of passage means against each baseline (± standard error)."""
    tokens = nll["tokens"]
    out = {}
    for name, sums in nll.items():
        if name == "tokens":
            continue
        per = sums / tokens
        row = {"loss": float(sums.sum() / tokens.sum()), "passage_mean": float(per.mean()), "passage_sem": _sem(per)}
        for base in baselines:
            d = paired_difference(nll, name, base)
            row[f"delta_{base}"], row[f"delta_{base}_sem"] = d["mean"], d["sem"]
        out[name] = row
    return out
