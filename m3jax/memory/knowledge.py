"""The knowledge base: references (the texts whose memories a bank holds) and the sink.

References. Documents come from `m3jax.data.corpus.load_corpus` ("embedded": sorted by doc_id; text and JSONL
files: in the order given, each glob sorted; JSONL lines in file order). Each document is tokenized whole,
without BOS, and cut into consecutive pieces of `ref_len` tokens; the last piece holds what is left (1 … ref_len
tokens) and is a reference of its own, shorter; a document without tokens gives none. Reference ids run over the
documents in that order, then over each document's pieces in order, so id r depends only on the knowledge base,
the tokenizer and ref_len: every process of a writer, every restart and every reader computes the same ids.
References loaded from a knowledge base carry its `corpus_sha256` (`m3jax.data.prepare.corpus_sha256`, as a prepared
data directory records its corpus): equal digests and tokenizers mean the references were cut from the data's own
documents, numbered as the data's records number them (the provenance filter of m3jax/retrieval/retrieve.py).

The sink is the modified BOS "<s>Reference:" that precedes every reference when it is encoded and every context
that reads memory (docs/memory.md): the ordinary <s> followed by the tokenized `config.memory.sink_text`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from m3jax.data.corpus import load_corpus
from m3jax.data.prepare import corpus_sha256
from m3jax.data.tokenizer import Tokenizer

_ENCODE_CHUNK = 256  # documents tokenized per call: bounds memory on large knowledge bases


def sink_tokens(tokenizer: Tokenizer, sink_text: str) -> np.ndarray:
    """The modified BOS "<s>Reference:": the ordinary <s> id followed by the tokenized `sink_text`, [p] int32."""
    return np.asarray([tokenizer.bos_id, *tokenizer.encode(sink_text)], np.int32)


# ------------------------------------------------------------------------------------------------ references
@dataclasses.dataclass(frozen=True)
class References:
    """n references of at most `ref_len` tokens, in id order (see the module docstring)."""

    ref_len: int
    tokens: np.ndarray  # [T] int32: every document's tokens, concatenated in order; each token in one reference
    starts: np.ndarray  # [n] int64: where reference r begins in `tokens`
    lengths: np.ndarray  # [n] int32: 1 … ref_len
    doc_index: np.ndarray  # [n] int32: the document of reference r (an index into doc_ids)
    doc_ids: tuple[str, ...]  # every document, including those that gave no reference
    corpus_sha256: str | None = None  # the texts cut (`load_references`); None when cut from tokens directly

    def __len__(self) -> int:
        return len(self.starts)

    def rows(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Reference tokens [m, ref_len] int32 (-1 past a reference's length) and lengths [m] of `ids`."""
        ids = np.asarray(ids, np.int64)
        lengths = self.lengths[ids]
        offsets = np.arange(self.ref_len)
        real = offsets[None, :] < lengths[:, None]
        index = np.where(real, self.starts[ids, None] + offsets[None, :], 0)
        return np.where(real, self.tokens[index], -1).astype(np.int32), lengths

    def sha256(self) -> str:
        """Identifies the references: ref_len, every reference's document, length and tokens."""
        h = hashlib.sha256(np.int64(self.ref_len).tobytes())
        for a in (self.doc_index, self.lengths, self.tokens):
            h.update(np.ascontiguousarray(a, np.int32).tobytes())
        return h.hexdigest()


def cut_references(documents: Sequence[tuple[str, Sequence[int]]], ref_len: int) -> References:
    """(doc_id, token ids) of each document, in order -> its consecutive `ref_len`-token pieces as references."""
    if ref_len < 1:
        raise ValueError(f"ref_len must be positive, got {ref_len}")
    doc_ids = tuple(doc_id for doc_id, _ in documents)
    doc_lengths = np.asarray([len(ids) for _, ids in documents], np.int64)
    tokens = np.concatenate([np.asarray(ids, np.int32) for _, ids in documents] or [np.zeros(0, np.int32)])
    pieces = -(-doc_lengths // ref_len)  # ceil: the tail is a piece of its own
    doc_index = np.repeat(np.arange(len(documents), dtype=np.int32), pieces)
    piece = np.arange(len(doc_index)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    doc_start = np.cumsum(doc_lengths) - doc_lengths
    starts = doc_start[doc_index] + piece * ref_len
    lengths = np.minimum(ref_len, doc_lengths[doc_index] - piece * ref_len).astype(np.int32)
    return References(ref_len=ref_len, tokens=tokens, starts=starts.astype(np.int64), lengths=lengths,
                      doc_index=doc_index, doc_ids=doc_ids)


def load_references(spec: str, tokenizer: Tokenizer, ref_len: int) -> References:
    """The references of a knowledge base: "embedded", or comma-separated text/JSONL paths or globs."""
    docs = load_corpus(spec)
    ids: list[list[int]] = []
    for start in range(0, len(docs), _ENCODE_CHUNK):
        ids.extend(tokenizer.encode_batch([d.text for d in docs[start:start + _ENCODE_CHUNK]]))
    refs = cut_references([(d.doc_id, i) for d, i in zip(docs, ids, strict=True)], ref_len)
    if not len(refs):
        raise ValueError(f"knowledge base {spec!r}: {len(docs)} documents and no tokens, so no references")
    return dataclasses.replace(refs, corpus_sha256=corpus_sha256(docs))
