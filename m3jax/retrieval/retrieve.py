"""Retrieval for training data: the references each chunk of every record reads, stored beside the data.

For each record of a prepared split (`m3jax.data.prepare`) and each of its chunks (`m3jax.memory.layout`):
the chunk's text (its tokens decoded by the data's tokenizer) is embedded, the index returns `candidates`
references, and the leaking ones are dropped:
- provenance: a reference cut from text of the record itself (same corpus document, token spans that meet) —
  known when the bank's knowledge base is the data's corpus (the knowledge split), so a chunk never retrieves its
  own source, even when only part of that reference lies in the record. `provenance_for` checks, by digests, that
  the references it loads are the bank's and the data's corpus, and refuses anything else;
- eq. 6: a reference whose overlap with the record's tokens exceeds `max_overlap` (`m3jax.retrieval.overlap`) —
  any near-copy of the record's text, from whatever document.
The first `refs_per_chunk` survivors, best first, are the chunk's references (−1 = none).

Storage (`RetrievedIds`), a directory (local, or a `gs://` URL):

    retrieval.json          what was retrieved, with what (data, bank, embedder, index, settings): a rerun
                            with other inputs is refused rather than mixing two retrievals
    block-{i:06d}.npy       int32 [records of block i, num_groups, refs_per_chunk], records [i·B, (i+1)·B)

Blocks are written whole and atomically (a local temporary file renamed; in a bucket, an upload, visible only
whole: `m3jax.retrieval.blocks`), so a restarted run redoes only the blocks that are missing. Process p of n takes
blocks p, p + n, …: no coordination, no two writers of a file.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from m3jax.data.records import METADATA_FILE, split_source
from m3jax.data.tokenizer import Tokenizer
from m3jax.memory import layout
from m3jax.memory.knowledge import load_references
from m3jax.paths import absolute
from m3jax.retrieval.blocks import Blocks, create_meta, read_meta
from m3jax.retrieval.overlap import leaking

META_FILE = "retrieval.json"
FORMAT = 1


# ------------------------------------------------------------------------------------------------ provenance
@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where each reference was cut from: corpus document [n], first token [n], length [n] (document tokens,
    without bos; see `m3jax.memory.knowledge.cut_references`)."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray

    @classmethod
    def of(cls, refs) -> Provenance:
        """From `m3jax.memory.knowledge.References` (starts there are offsets in the concatenated corpus)."""
        doc_first = np.zeros(len(refs.doc_ids), np.int64)
        new_doc = np.concatenate([[True], refs.doc_index[1:] != refs.doc_index[:-1]])
        doc_first[refs.doc_index[new_doc]] = refs.starts[new_doc]
        return cls(doc=refs.doc_index.astype(np.int64), start=refs.starts - doc_first[refs.doc_index],
                   length=refs.lengths.astype(np.int64))

    def from_record(self, ids: np.ndarray, documents: np.ndarray, doc_offsets: np.ndarray) -> np.ndarray:
        """[m] bool: reference ids [m] shares a token with the record (documents/doc_offsets [L], -1 = padding)."""
        real = documents >= 0
        docs, offsets = documents[real], doc_offsets[real] - 1  # document token index (bos = -1)
        out = np.zeros(ids.shape, bool)
        for d in np.unique(docs):  # a document's tokens in a row are one contiguous run
            lo, hi = offsets[docs == d].min(), offsets[docs == d].max()
            out |= (self.doc[ids] == d) & (self.start[ids] <= hi) & (self.start[ids] + self.length[ids] > lo)
        return out


def provenance_for(knowledge: str, tokenizer: Tokenizer, ref_len: int, *, data_dir: str, data_meta: Mapping[str, Any],
                   bank_path: str, bank_record: Mapping[str, Any], log: Callable[[str], None] = print
                   ) -> Provenance | None:
    """The provenance filter of a retrieval for the data at `data_dir` (metadata `data_meta`) from the bank at
    `bank_path` (writer record `bank_record`, m3jax/memory/writer.py), from the references of `knowledge`.

    The filter finds a record's own references by corpus document number, so it is right only for the references
    the bank holds (its record's `references_sha256`) cut from the corpus the data was prepared from (the data's
    `corpus_sha256`). Anything else would drop the wrong references, or none, and training chunks would read their
    own text: a ValueError naming both sides; so is data prepared before `corpus_sha256` was recorded. `knowledge`
    "" is no filter (None), for a bank whose knowledge base shares no text with the data: logged as a warning that
    says what it means and whether the bank's record says the bank was written from the data's own corpus.
    """
    data_corpus, bank_corpus = data_meta.get("corpus_sha256"), bank_record.get("corpus_sha256")
    source = bank_record.get("knowledge")
    bank_kb = f"written from {source!r}" if source else "its source not recorded"
    if not knowledge:
        if data_corpus is not None and bank_corpus == data_corpus:
            what = (f"the bank {bank_path} ({bank_kb}) was written from the data's own corpus (corpus sha256 "
                    f"{data_corpus[:12]}…): its training chunks will read references cut from their own text, which "
                    "the model learns to copy; omit --knowledge to filter by provenance")
        elif data_corpus is not None and bank_corpus is not None:
            what = (f"the bank's knowledge base ({bank_kb}, corpus sha256 {bank_corpus[:12]}…) is not the data's "
                    f"corpus ({data_meta['corpus']!r}, {data_corpus[:12]}…): right when it shares no text with the "
                    "training data")
        else:
            what = (f"whether the bank's knowledge base ({bank_kb}) is the data's corpus is not recorded: right only "
                    "when it shares no text with the training data")
        log("WARNING: --knowledge='': NO PROVENANCE FILTER. References cut from a record's own text are not dropped; "
            f"only near-copies of it are (eq. 6, retrieval.train_max_overlap). {what[0].upper()}{what[1:]}.")
        return None
    if data_corpus is None:
        raise ValueError(f"{os.path.join(data_dir, METADATA_FILE)} has no corpus_sha256 (prepared before it was "
                         f"recorded), so nothing shows that knowledge base {knowledge!r} is the corpus its records "
                         "number: prepare the data again (tools/prepare_data.py with the corpus, tokenizer, seq_len, "
                         "heldout_fraction and seed its metadata.json lists writes the same records), or give "
                         "--knowledge='' (no provenance filter)")
    named = f"knowledge base {knowledge!r}" + (f" (the corpus {data_dir} names, the default --knowledge)"
                                               if knowledge == data_meta["corpus"] else "")
    refs = load_references(knowledge, tokenizer, ref_len)
    if refs.sha256() != bank_record["references_sha256"]:
        raise ValueError(f"{named} is not the one the bank {bank_path} was written from ({bank_kb}): its references "
                         f"have sha256 {refs.sha256()[:12]}…, the bank's writer record "
                         f"{bank_record['references_sha256'][:12]}…; give --knowledge=<the bank's knowledge base>, or "
                         "--knowledge='' when that shares no text with the training data (no provenance filter)")
    if refs.corpus_sha256 != data_corpus:
        changed = ", its files changed since" if knowledge == data_meta["corpus"] else ""
        raise ValueError(f"{named} is the bank's but not the corpus {data_dir} was prepared from "
                         f"({data_meta['corpus']!r}{changed}): corpus sha256 {refs.corpus_sha256[:12]}… vs "
                         f"{data_corpus[:12]}…. The provenance filter finds a record's own references by the corpus "
                         "document numbers the records carry; give --knowledge='' when the bank's knowledge base "
                         "shares no text with the training data (no provenance filter), else prepare the data from it")
    log(f"provenance filter: {named}, the bank's references (sha256 {refs.sha256()[:12]}…) and the data's corpus "
        f"(corpus sha256 {data_corpus[:12]}…)")
    return Provenance.of(refs)


# ------------------------------------------------------------------------------------------------ retrieval
@dataclasses.dataclass(frozen=True)
class RetrievalSettings:
    chunk_size: int
    num_groups: int
    refs_per_chunk: int
    candidates: int
    max_overlap: float
    min_tokens: int

    @classmethod
    def from_config(cls, config) -> RetrievalSettings:
        r = config.retrieval
        return cls(chunk_size=config.memory.chunk_size,
                   num_groups=layout.max_groups(config.data.seq_len, config.memory.chunk_size),
                   refs_per_chunk=r.refs_per_chunk, candidates=r.candidates, max_overlap=r.train_max_overlap,
                   min_tokens=r.min_chunk_tokens)


class ChunkRetriever:
    """Records -> reference ids per chunk (the module docstring).

    embed: texts -> unit vectors [n, d]; search: (queries [q, d], k) -> (ids [q, k], scores); ref_tokens:
    ids [m] -> tokens [m, ref_len] (-1 padded); provenance: None when the knowledge base is not the data's corpus.
    """

    def __init__(self, settings: RetrievalSettings, tokenizer: Tokenizer, embed: Callable, search: Callable,
                 ref_tokens: Callable, provenance: Provenance | None):
        self.settings = settings
        self.tokenizer = tokenizer
        self.embed, self.search, self.ref_tokens = embed, search, ref_tokens
        self.provenance = provenance
        self.stats = {"records": 0, "chunks": 0, "queries": 0, "no_group_tokens": 0, "dropped_provenance": 0,
                      "dropped_overlap": 0, "empty_refs": 0}

    def __call__(self, records: Mapping[str, np.ndarray]) -> np.ndarray:
        """records: fields [n, L] (inputs, segment_ids, documents, doc_offsets) -> refs [n, G, R] int32."""
        s = self.settings
        inputs, seg = np.asarray(records["inputs"]), np.asarray(records["segment_ids"])
        n = inputs.shape[0]
        group, lost = layout.chunk_groups(seg, s.chunk_size, s.num_groups)
        queries, where = [], []
        used = np.zeros((n, s.num_groups), bool)
        for i in range(n):
            starts, stops = layout.group_spans(group[i], s.num_groups)
            used[i] = stops > starts
            for g in np.flatnonzero(stops - starts >= s.min_tokens):
                queries.append(self.tokenizer.decode(inputs[i, starts[g]:stops[g]]))
                where.append((i, g))
        out = np.full((n, s.num_groups, s.refs_per_chunk), -1, np.int32)
        if queries:
            cand, _ = self.search(self.embed(queries), s.candidates)  # [q, C], best first
            where = np.asarray(where)
            for i in range(n):
                rows = np.flatnonzero(where[:, 0] == i)
                if rows.size:
                    out[i] = self._choose(cand[rows], where[rows, 1], {f: np.asarray(records[f])[i]
                                                                       for f in ("inputs", "segment_ids",
                                                                                 "documents", "doc_offsets")})
        self.stats["records"] += n
        self.stats["chunks"] += int(used.sum())
        self.stats["queries"] += len(queries)
        self.stats["no_group_tokens"] += lost
        self.stats["empty_refs"] += int(np.count_nonzero(used & (out[..., 0] < 0)))
        return out

    def _choose(self, cand: np.ndarray, groups: np.ndarray, row: Mapping[str, np.ndarray]) -> np.ndarray:
        """One record's references [G, R] from its chunks' candidates [q, C] (q chunks at `groups`)."""
        s = self.settings
        uniq = np.unique(cand[cand >= 0])
        drop = np.zeros(uniq.shape, bool)
        if self.provenance is not None:
            drop = self.provenance.from_record(uniq, row["documents"], row["doc_offsets"])
            self.stats["dropped_provenance"] += int(drop.sum())
        rest = np.flatnonzero(~drop)
        if rest.size:
            sequence = row["inputs"][row["segment_ids"] > 0]
            leak = leaking(self.ref_tokens(uniq[rest]), sequence, s.max_overlap)
            drop[rest[leak]] = True
            self.stats["dropped_overlap"] += int(leak.sum())
        keep = ~drop[np.searchsorted(uniq, np.maximum(cand, 0))] & (cand >= 0)  # [q, C]
        out = np.full((s.num_groups, s.refs_per_chunk), -1, np.int32)
        for q, g in enumerate(groups):
            chosen = cand[q][keep[q]][: s.refs_per_chunk]
            out[g, : chosen.size] = chosen
        return out


# ------------------------------------------------------------------------------------------------ storage
class RetrievedIds(Blocks):
    """The reference ids per chunk of a split's records (the module docstring's directory)."""

    def __init__(self, directory: str | os.PathLike, meta: Mapping[str, Any]):
        self.meta = dict(meta)
        super().__init__(directory, num_rows=meta["num_records"], block_rows=meta["block_records"],
                         row_shape=(int(meta["num_groups"]), int(meta["refs_per_chunk"])), dtype=np.int32)
        self._blocks: dict[int, np.ndarray] = {}

    @property
    def num_records(self) -> int:
        return self.num_rows

    @classmethod
    def create(cls, directory, meta: Mapping[str, Any]) -> RetrievedIds:
        """A new store, or the existing one at `directory` when it holds the same retrieval (a resumed run)."""
        meta = create_meta(absolute(directory) / META_FILE, {"format": FORMAT, **meta}, what="another retrieval",
                           remedy="give a new --out or rerun with its inputs")
        return cls(directory, meta)

    @classmethod
    def open(cls, directory, *, expect: Mapping[str, Any] | None = None) -> RetrievedIds:
        """A complete store; `expect`: metadata fields that must equal (e.g. the data's num_records, seq_len)."""
        directory = absolute(directory)
        meta = read_meta(directory / META_FILE, missing_hint="not a directory of retrieved ids (write one with "
                         "tools/retrieve.py)")
        diffs = [f"{k}: stored {meta.get(k)!r}, expected {v!r}" for k, v in (expect or {}).items() if meta.get(k) != v]
        if diffs:
            raise ValueError(f"retrieved ids {directory} do not fit: {'; '.join(diffs)}")
        store = cls(directory, meta)
        missing = store.missing_blocks()
        if missing:
            raise FileNotFoundError(f"retrieved ids {directory} are incomplete: {len(missing)} of {store.num_blocks} "
                                    f"blocks missing (first: {store.block_path(missing[0]).name}); rerun "
                                    "tools/retrieve.py to finish them")
        return store

    def __getitem__(self, record: int) -> np.ndarray:
        """The ids [G, R] of a record of the split (indices past its length wrap, as grain's repeat gives them)."""
        record = int(record) % self.num_records
        i = record // self.block_rows
        if i not in self._blocks:
            self._blocks[i] = self.read_block(i, mmap=True)
        return np.asarray(self._blocks[i][record - i * self.block_rows])


def retrieve_split(store: RetrievedIds, data_dir, split: str, retriever: ChunkRetriever, *, process_index: int = 0,
                   process_count: int = 1, batch_records: int = 64, log: Callable[[str], None] = print,
                   log_every_s: float = 10.0) -> dict[str, Any]:
    """Writes this process's missing blocks (p, p + n, …) of `store` for `split` of `data_dir`; returns stats."""
    source, decode = split_source(data_dir, split)
    todo = store.process_blocks(process_index, process_count)
    t0 = last = time.perf_counter()
    done_records = 0
    total = sum(b - a for a, b in map(store.block_range, todo))
    for i in todo:
        a, b = store.block_range(i)
        parts = []
        for start in range(a, b, batch_records):
            idx = range(start, min(start + batch_records, b))
            recs = [decode(j, source[j]) for j in idx]
            parts.append(retriever({f: np.stack([r[f] for r in recs]) for f in recs[0]}))
            done_records += len(idx)
            if time.perf_counter() - last > log_every_s:
                last = time.perf_counter()
                rate = done_records / (last - t0)
                log(f"process {process_index}: {done_records:,}/{total:,} records, {rate:,.1f} records/s, "
                    f"eta {(total - done_records) / max(rate, 1e-9):,.0f} s")
        store.write_block(i, np.concatenate(parts))
    seconds = time.perf_counter() - t0
    return {"blocks": len(todo), "records": done_records, "seconds": seconds,
            "records_per_s": done_records / seconds if done_records else 0.0, **retriever.stats}
