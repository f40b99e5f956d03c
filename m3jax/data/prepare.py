"""Corpus -> tokenised, packed, sharded train/heldout splits with their metadata.json."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from m3jax import paths
from m3jax.data import records
from m3jax.data.corpus import Document, load_corpus
from m3jax.data.packing import LM_FIELDS, pack_documents
from m3jax.data.tokenizer import Tokenizer

SPLITS = ("train", "heldout")
_ENCODE_CHUNK = 256  # documents tokenised per batch: bounds memory on large corpora


def heldout_split(doc_id: str, heldout_fraction: float, seed: int = 0) -> bool:
    """Whether `doc_id` belongs to the heldout split: a stable hash (sha256, not Python's salted `hash`) of
    the seed and doc_id, so the assignment is the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < heldout_fraction


def corpus_sha256(docs: Sequence[Document]) -> str:
    """Identifies a corpus as the knowledge split sees it: its documents' texts, in order (each prefixed by its
    length in bytes). Not their doc_ids, which name the files they were read from: the same texts elsewhere are
    the same corpus. Recorded by `prepare` and by the memory writer (`m3jax.memory.knowledge.load_references`), so
    a retrieval can check that the knowledge base of its provenance filter is the data's corpus."""
    h = hashlib.sha256()
    for doc in docs:
        text = doc.text.encode("utf-8", "surrogatepass")
        h.update(len(text).to_bytes(8, "little"))
        h.update(text)
    return h.hexdigest()


def _encoded(tokenizer: Tokenizer, docs: Sequence[Document]) -> Iterator[list[int]]:
    for start in range(0, len(docs), _ENCODE_CHUNK):
        yield from tokenizer.encode_batch([d.text for d in docs[start : start + _ENCODE_CHUNK]])


class _Counter:
    """Passes records through while counting input tokens (non-padding) and loss-bearing targets."""

    def __init__(self) -> None:
        self.num_tokens = 0
        self.num_loss_tokens = 0

    def __call__(self, rows: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for row in rows:
            self.num_tokens += int(np.count_nonzero(row["segment_ids"]))
            self.num_loss_tokens += int(row["loss_weights"].sum())
            yield row


def prepare(
    corpus_spec: str,
    tokenizer_path: str,
    out_dir: str | os.PathLike,
    seq_len: int,
    heldout_fraction: float,
    num_shards: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokenises and packs `corpus_spec` (see `load_corpus`) into `out_dir`; returns the metadata written.

    Each document goes whole to "heldout" (with probability `heldout_fraction`, by `heldout_split`) or
    "train", so no heldout text is ever trained on. Documents keep corpus order within a split.

    The knowledge split. The knowledge base of retrieval is the whole corpus (`corpus_spec`, every document in
    corpus order, as `m3jax.memory.knowledge.load_references` cuts it); the heldout documents are in the knowledge
    base but never in the training data, so their facts reach the model only through memory. Records carry each
    token's corpus document number and offset (`documents`, `doc_offsets`), which tie a training chunk to the
    references cut from its own text; `corpus_sha256` in the metadata identifies the corpus those numbers index
    (tools/retrieve.py checks it against the bank's knowledge base). The split is a pure function of (doc_id, seed,
    heldout_fraction).
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    records.local_data_dir(out_dir)  # before the work: the shards cannot go to a bucket
    docs = load_corpus(corpus_spec)
    tokenizer = Tokenizer(tokenizer_path)
    by_split: dict[str, list[Document]] = {name: [] for name in SPLITS}
    numbers: dict[str, list[int]] = {name: [] for name in SPLITS}  # each document's index in the corpus
    for number, doc in enumerate(docs):
        split = "heldout" if heldout_split(doc.doc_id, heldout_fraction, seed) else "train"
        by_split[split].append(doc)
        numbers[split].append(number)
    if not by_split["train"]:
        raise ValueError(f"corpus {corpus_spec!r} leaves no training documents at {heldout_fraction=}")

    splits = {}
    for name, split_docs in by_split.items():
        counter = _Counter()
        rows = pack_documents(_encoded(tokenizer, split_docs), seq_len, tokenizer.bos_id, tokenizer.eos_id,
                              doc_numbers=numbers[name])
        num_records = records.write_split(counter(rows), out_dir, name, num_shards)
        splits[name] = {
            "num_documents": len(split_docs),
            "num_records": num_records,
            "num_tokens": counter.num_tokens,
            "num_loss_tokens": counter.num_loss_tokens,
            "shards": records.shard_names(name, num_shards),
        }
    meta = {
        "format_version": records.FORMAT_VERSION,
        "fields": records.field_specs({name: (seq_len,) for name in LM_FIELDS}),
        "seq_len": seq_len,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "tokenizer_path": str(paths.absolute(tokenizer_path)),
        "tokenizer_sha256": tokenizer.sha256,
        "corpus": corpus_spec,
        "corpus_sha256": corpus_sha256(docs),
        "num_corpus_documents": len(docs),
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "splits": splits,
    }
    records.write_metadata(out_dir, meta)
    return meta
