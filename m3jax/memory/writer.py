"""Writing a memory bank from a knowledge base: references, their ids, batched encoding, resumable slices.

References: `m3jax.memory.knowledge` (ids depend only on the knowledge base, the tokenizer and ref_len).

Encoding. By default each reference is encoded on its own (`encode_documents` with one piece per row, which is
`encode_references`). With `window_refs` = W > 1 (the paper's Remark 3), each document is encoded in windows of
W·ref_len tokens, aligned at the document's start, and each window's key/values are cut into the same pieces; a
document of at most W pieces is encoded whole. The unit of encoding (a *unit*) is a reference or a window.

Batches and determinism. Units are batched by their absolute index: batch j holds units [j·U, (j+1)·U), unit u
at row u − j·U, and the rows of units with nothing to write are padding (length 0). A unit is therefore always
encoded at the same row of a batch of the same shape by the same compiled program, whatever the other rows hold,
and rows of a batch never interact (tests/test_write_memory.py checks that a row's bits do not depend on the
other rows). So a resumed writer, and a writer of several processes, stores the bytes of one uninterrupted
single-process writer, provided the batch size, compute dtype and devices per process (the per-device program)
are the same; another device layout gives memories equal up to float rounding.

Processes. Process i of n writes `bank.process_range(i, n)`: whole shards, so no two processes write one file.
Each encodes on its own devices (its own mesh), with no collectives: processes never wait for each other. A
window across a slice boundary is encoded by both processes, each writing its own references.

Resume. Rows are written in runs that end at shard boundaries (a shard is written whole when its rows are all
to be written), from one background thread while the next batches encode; `MemoryBank.write` sets a row's flag
once its data is durable. A restarted writer encodes only the units that hold references of
`unwritten_ranges()` in its slice, and of written rows there whose stored bytes fail their checksums
(`MemoryBank.verify`, which reads the slice's written rows once). Fault point `after_bank_write` (`m3jax.faults`)
stops a writer right after its n-th write, for tests of this.

The writer record. `writer.json` at the bank's root records what the bank's metadata does not: the encoding
(references or windows of W), the compute dtype, and a sha256 of the references (their tokens, lengths and
documents). A writer whose record differs from a bank's (another encoding, or another knowledge base with the same
number of references) is refused rather than mixing two kinds of memories in one bank. The record also says where
the references came from: the knowledge base as the writer was given it and the digest of its texts
(`corpus_sha256`), which tools/retrieve.py compares with the training data's corpus. These two are not compared on
resume (a path may be spelled otherwise; the references' sha256 decides), and records written before them lack them.
"""

from __future__ import annotations

import collections
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from absl import logging
from jax.sharding import Mesh

from m3jax import faults, parallel
from m3jax.memory import bank as bank_lib
from m3jax.memory.bank import BankMismatchError, MemoryBank
from m3jax.memory.encode import encode_documents
from m3jax.memory.knowledge import References
from m3jax.model.config import ModelConfig
from m3jax.parallel import DEFAULT_LOGICAL_AXIS_RULES

RECORD_KEY = "writer.json"
RECORD_FORMAT = 1
_SOURCE_FIELDS = ("knowledge", "corpus_sha256")  # of the record: where the references came from, not compared
_WRITES_IN_FLIGHT = 2  # bank writes queued behind the encoder


def units(refs: References, window_refs: int) -> tuple[np.ndarray, np.ndarray]:
    """The units of encoding: (first reference [u] int64, references [u] int64) of each, in reference order.

    window_refs = 1: every reference; W > 1: each document's consecutive windows of W pieces.
    """
    if window_refs < 1:
        raise ValueError(f"window_refs must be positive, got {window_refs}")
    n = len(refs)
    if window_refs == 1:
        return np.arange(n, dtype=np.int64), np.ones(n, np.int64)
    new_doc = np.concatenate([[True], refs.doc_index[1:] != refs.doc_index[:-1]])
    doc_first = np.flatnonzero(new_doc)
    piece = np.arange(n) - np.repeat(doc_first, np.diff(np.append(doc_first, n)))
    first = np.flatnonzero(piece % window_refs == 0).astype(np.int64)
    return first, np.diff(np.append(first, n))


# ------------------------------------------------------------------------------------------------ the bank
def writer_record(refs: References, window_refs: int, dtype: str, knowledge: str | None = None) -> dict[str, Any]:
    """What `writer.json` holds (see the module docstring); `knowledge`: the knowledge base `refs` were loaded from,
    as given (`m3jax.memory.knowledge.load_references`)."""
    return {"format": RECORD_FORMAT, "encoding": "references" if window_refs == 1 else "document_windows",
            "window_refs": int(window_refs), "dtype": str(dtype), "num_refs": len(refs),
            "references_sha256": refs.sha256(), "knowledge": knowledge, "corpus_sha256": refs.corpus_sha256}


def read_record(path) -> dict[str, Any] | None:
    """The writer record of the bank at `path` (None when it has none)."""
    text = bank_lib.read_side_file(path, RECORD_KEY)
    return None if text is None else json.loads(text)


def _check_record(path, record: Mapping[str, Any], *, store: bool = True) -> None:
    """Refuses a bank whose writer record differs from `record`; stores `record` beside a bank without one."""
    theirs = read_record(path)
    if theirs is None:
        if not store:
            return
        if bank_lib.create_side_file(path, RECORD_KEY, json.dumps(dict(record), indent=1, sort_keys=True)):
            return
        theirs = read_record(path)  # another process stored it first
    diffs = [f"{k}: bank {theirs.get(k)!r}, this writer {record[k]!r}" for k in record
             if k not in _SOURCE_FIELDS and theirs.get(k) != record[k]]
    if diffs:
        other_kb = theirs.get("references_sha256") != record["references_sha256"]
        raise BankMismatchError(f"memory bank {path} was written with other writer settings"
                                + (" (another knowledge base with as many references)" if other_kb else "")
                                + ": " + "; ".join(diffs) + "; rerun with its arguments or give a new --bank")


def open_for_writing(path, refs: References, *, architecture: Mapping[str, Any], tokenizer_sha256: str,
                     checkpoint: Mapping[str, Any], sink: Sequence[int], codec: str, refs_per_shard: int,
                     record: Mapping[str, Any], allow_other_checkpoint: bool = False) -> tuple[MemoryBank, bool]:
    """Creates the bank for `refs`, or opens the one at `path` to resume it; returns (bank, writable).

    An existing bank must hold as many references as the knowledge base gives, with the same identity
    (architecture, tokenizer, sink, codec, shard size: `MemoryBank.create`) and the same writer record. One
    written by another checkpoint is refused, unless `allow_other_checkpoint`: then a *complete* bank is accepted
    as it is (its age logged; writable is False: nothing is written) and an incomplete one is still refused, since
    completing it would mix memories of two checkpoints. Every process of a writer calls this.
    """
    try:
        meta = MemoryBank.read_metadata(path)
    except FileNotFoundError:
        meta = None
    if meta is not None:
        if meta["num_refs"] != len(refs):
            raise BankMismatchError(
                f"memory bank {path} holds {meta['num_refs']:,} references but the knowledge base gives "
                f"{len(refs):,} (of at most {refs.ref_len} tokens): it was written from another knowledge base "
                "(or tokenizer, or ref_len); give a new --bank")
        ours = {"run_id": str(checkpoint["run_id"]), "step": int(checkpoint["step"])}
        if meta["checkpoint"] != ours:
            if not allow_other_checkpoint:
                raise BankMismatchError(
                    f"memory bank {path} was written by checkpoint {meta['checkpoint']}, this writer has {ours}: "
                    "give a new --bank, or --allow_other_checkpoint to accept the complete bank as it is")
            bank = MemoryBank.open(path, expect_architecture=architecture, expect_tokenizer=tokenizer_sha256,
                                   expect_checkpoint=ours, allow_other_checkpoint=True, expect_sink_tokens=sink,
                                   cache_rows=0)
            _check_record(path, record, store=False)
            missing = sum(b - a for a, b in bank.unwritten_ranges())
            if missing:
                raise BankMismatchError(
                    f"memory bank {path} was written by checkpoint {meta['checkpoint']} and {missing:,} of its "
                    f"{bank.num_refs:,} references are unwritten: completing it with {ours} would mix memories "
                    "of two checkpoints; resume it with its own checkpoint or give a new --bank")
            return bank, False
    bank = MemoryBank.create(path, num_refs=len(refs), architecture=architecture, tokenizer_sha256=tokenizer_sha256,
                             checkpoint=checkpoint, sink_tokens=sink, codec=codec, refs_per_shard=refs_per_shard,
                             exist_ok=True)
    _check_record(path, record)
    return bank, True


# ------------------------------------------------------------------------------------------------ writing
def batch_shards(mesh: Mesh | None, rules=DEFAULT_LOGICAL_AXIS_RULES) -> int:
    """How many ways the encoder splits a batch over `mesh` (the mesh axes of the logical axis "batch")."""
    if mesh is None:
        return 1
    axes = parallel.logical_to_spec(("batch",), rules)[0]
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes if a)


def units_per_batch(batch_size: int, window_refs: int, shards: int) -> int:
    """Units per forward for `batch_size` references per forward: batch_size // window_refs, which the batch
    shards of the mesh must divide."""
    per_batch = batch_size // window_refs
    if per_batch < 1 or per_batch % shards:
        what = f"{per_batch} windows of {window_refs} references" if window_refs > 1 else f"{per_batch} references"
        raise ValueError(f"batch_size={batch_size} gives {what} per forward, which must be a positive multiple of "
                         f"the {shards} batch shards of this process's mesh")
    return per_batch


class _RunWriter:
    """Collects encoded rows into runs that end at shard boundaries and writes them from one background thread."""

    def __init__(self, bank: MemoryBank):
        self.bank = bank
        self.rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bank-write")
        self.in_flight: collections.deque[Future] = collections.deque()
        self.written, self.writes = 0, 0

    def add(self, ref: int, kv: np.ndarray, positions: np.ndarray, tokens: np.ndarray) -> None:
        if self.rows and (ref != self.rows[-1][0] + 1 or ref // self.bank.refs_per_shard
                          != self.rows[0][0] // self.bank.refs_per_shard):
            self.flush()
        self.rows.append((ref, kv, positions, tokens))
        if (ref + 1) % self.bank.refs_per_shard == 0:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        start, n = self.rows[0][0], len(self.rows)
        kv, positions, tokens = (np.stack([r[i] for r in self.rows]) for i in (1, 2, 3))
        self.rows = []
        while len(self.in_flight) >= _WRITES_IN_FLIGHT:
            self.in_flight.popleft().result()
        self.in_flight.append(self.pool.submit(self._write, start, kv, positions, tokens, n))

    def _write(self, start, kv, positions, tokens, n) -> None:
        self.bank.write(start, kv, positions, tokens)
        self.written += n
        self.writes += 1
        faults.reached("after_bank_write", self.writes)

    def close(self) -> None:
        """Flushes and waits for every write; raises the first write error."""
        try:
            self.flush()
            while self.in_flight:
                self.in_flight.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


def write_references(bank: MemoryBank, params, cfg: ModelConfig, refs: References, sink: np.ndarray, *,
                     batch_size: int, k: int | None = None, window_refs: int = 1, mesh: Mesh | None = None,
                     rules=DEFAULT_LOGICAL_AXIS_RULES, process_index: int = 0, process_count: int = 1,
                     log_every_s: float = 10.0, log: Callable[[str], None] = logging.info) -> dict[str, Any]:
    """Encodes and writes the unwritten references of this process's slice of `bank`; returns a summary.

    params: the model's parameters (placed for `mesh`: this process's devices); cfg: a ModelConfig with memory
    layers; sink: [p] int32; batch_size: references per forward (window_refs > 1: batch_size // window_refs
    windows). See the module docstring for the order, batching and resume. `log` gets a progress line every
    `log_every_s` seconds.
    """
    if len(refs) != bank.num_refs or refs.ref_len != bank.metadata["ref_len"]:
        raise BankMismatchError(f"memory bank {bank.path}: {bank.num_refs} references of {bank.metadata['ref_len']} "
                                f"tokens, the knowledge base gives {len(refs)} of {refs.ref_len}")
    per_batch = units_per_batch(batch_size, window_refs, batch_shards(mesh, rules))
    lo, hi = bank.process_range(process_index, process_count)
    todo = np.zeros(len(refs), bool)
    todo[bank.verify(lo, hi)] = True  # written rows whose stored bytes are damaged: written again
    for a, b in bank.unwritten_ranges(lo, hi):
        todo[a:b] = True
    total = int(todo.sum())
    first, count = units(refs, window_refs)
    unit_of_ref = np.repeat(np.arange(len(first)), count)
    needed = np.unique(unit_of_ref[todo])
    batches = np.split(needed, np.flatnonzero(np.diff(needed // per_batch)) + 1) if needed.size else []
    width = window_refs * refs.ref_len
    log(f"process {process_index} of {process_count}: refs [{lo}, {hi}) of {len(refs):,}, {total:,} to write "
        f"in {len(batches)} batches of {per_batch} {'references' if window_refs == 1 else 'windows'}")

    writer = _RunWriter(bank)
    t0 = time.perf_counter()
    t_first = None
    last_log = t0

    def store(batch_units, out) -> None:
        # [U, W, ...], waiting for this batch only. Rows are cut on the host: indexing a batch-sharded array on
        # device may gather it by a cross-shard sum, which turns the -0.0 of re-rotated padding keys into +0.0.
        kv, positions = np.asarray(out[0]), np.asarray(out[1])
        for u in batch_units:
            ids = np.arange(first[u], first[u] + count[u])
            ids = ids[todo[ids]]
            tokens, _ = refs.rows(ids)
            for ref, row in zip(ids, tokens, strict=True):
                writer.add(int(ref), kv[u % per_batch, ref - first[u]], positions[u % per_batch, ref - first[u]],
                           row)

    try:
        pending = None
        for batch_units in batches:
            tokens = np.full((per_batch, width), -1, np.int32)
            lengths = np.zeros(per_batch, np.int32)
            for u in batch_units:
                start, n = refs.starts[first[u]], int(refs.lengths[first[u]:first[u] + count[u]].sum())
                tokens[u % per_batch, :n] = refs.tokens[start:start + n]
                lengths[u % per_batch] = n
            out = encode_documents(params, cfg, tokens, lengths, sink, k=k, ref_len=refs.ref_len, mesh=mesh,
                                   rules=rules)  # dispatched; runs while the previous batch is stored
            if pending is not None:
                store(*pending)
                if t_first is None:
                    t_first = time.perf_counter()
            pending = (batch_units, out)
            now = time.perf_counter()
            if now - last_log >= log_every_s:
                last_log = now
                log(f"written {writer.written:,}/{total:,} refs, {writer.written / (now - t0):,.1f} refs/s")
        if pending is not None:
            store(*pending)
            t_first = t_first or time.perf_counter()
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    per_ref = sum(bank_lib.bytes_per_reference(bank.codec, bank.metadata["architecture"]).values())
    first_batch = sum(int(count[u]) for u in batches[0]) if batches else 0
    steady = (total - first_batch) / (seconds - (t_first - t0)) if batches and seconds > t_first - t0 else None
    log(f"written {writer.written:,}/{total:,} refs in {seconds:.1f} s")
    return {"process_index": process_index, "process_count": process_count, "slice": [lo, hi], "refs": total,
            "bytes": total * per_ref, "batches": len(batches), "seconds": seconds,
            "refs_per_s": total / seconds if seconds > 0 else None, "refs_per_s_after_first_batch": steady}
