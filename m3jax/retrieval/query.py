"""Retrieval for questions: text -> the references it reads, filtered against the question (evaluation, generation).

A query is embedded, the index returns `candidates` references, best first, and a reference whose overlap with the
question (eq. 6: longest common subsequence with a window of at most 2|r| tokens, over |r|) exceeds `max_overlap`
is dropped: the paper's evaluation filter, 2/3 against the question (`config.retrieval.eval_max_overlap`), so that
a reference that *is* the question is not the memory it answers from. The first `refs` survivors are the query's
references, -1 where fewer survive.

What the filter compares with is the question's tokens by default; `against` gives other token sequences (a scored
passage, for perplexity with causal retrieval: nothing of what is scored may be copied from memory).

Training data is retrieved per chunk by `m3jax.retrieval.retrieve.ChunkRetriever`, with its own filters
(provenance, eq. 6 at 0.9 against the whole training sequence); both search the same index through the same
embedder and test leakage with the same `m3jax.retrieval.overlap.leaking`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from m3jax.retrieval.overlap import leaking


class QueryRetriever:
    """Queries -> reference ids [q, refs] int32 (the module docstring).

    embed: texts -> unit vectors [n, d]; search: (queries [q, d], k) -> (ids [q, k], scores), best first, -1 = none;
    ref_tokens: ids [m] -> tokens [m, ref_len] (-1 padded); encode: text -> token ids (the data's tokenizer, the
    references' own)."""

    def __init__(self, embed: Callable, search: Callable, ref_tokens: Callable, encode: Callable[[str], Sequence[int]],
                 *, refs: int, candidates: int, max_overlap: float):
        if not 1 <= refs <= candidates:
            raise ValueError(f"refs={refs} references per query must be in [1, candidates={candidates}]")
        if not 0.0 < max_overlap <= 1.0:
            raise ValueError(f"max_overlap must be in (0, 1], got {max_overlap}")
        self.embed, self.search, self.ref_tokens, self.encode = embed, search, ref_tokens, encode
        self.refs, self.candidates, self.max_overlap = refs, candidates, max_overlap
        self.stats = {"queries": 0, "dropped_overlap": 0, "short": 0}

    @classmethod
    def from_config(cls, retrieval, embedder, index, ref_tokens: Callable, tokenizer, *,
                    refs: int | None = None) -> QueryRetriever:
        """With `config.retrieval`'s evaluation settings: `candidates`, `eval_max_overlap`, and `refs` references
        per query (default `retrieval.refs_per_chunk`)."""
        return cls(embedder.embed, index.search, ref_tokens, tokenizer.encode,
                   refs=int(retrieval.refs_per_chunk if refs is None else refs),
                   candidates=int(retrieval.candidates), max_overlap=float(retrieval.eval_max_overlap))

    def __call__(self, queries: Sequence[str], *, against: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """The references of each query [len(queries), refs] int32, best first, -1 = none left after the filter.
        against: per query, the token ids the filter compares with (default: the query's own tokens)."""
        queries = list(queries)
        if against is not None and len(against) != len(queries):
            raise ValueError(f"{len(against)} sequences to filter against for {len(queries)} queries")
        out = np.full((len(queries), self.refs), -1, np.int32)
        if not queries:
            return out
        cand, _ = self.search(self.embed(queries), self.candidates)
        cand = np.asarray(cand)
        for q, text in enumerate(queries):
            ids = cand[q][cand[q] >= 0]
            sequence = np.asarray(self.encode(text) if against is None else against[q], np.int64)
            if ids.size and sequence.size:
                leak = leaking(self.ref_tokens(ids), sequence, self.max_overlap)
                self.stats["dropped_overlap"] += int(leak.sum())
                ids = ids[~leak]
            chosen = ids[: self.refs]
            out[q, : chosen.size] = chosen
            self.stats["short"] += int(chosen.size < self.refs)
        self.stats["queries"] += len(queries)
        return out
