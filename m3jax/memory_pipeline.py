"""The memory-augmented input pipeline of continued training: packed records with the memories their chunks read.

Order, sharding, determinism and resume are the stage-1 pipeline's (`m3jax.data.pipeline`): the same global
record order, each process's rows of each global batch, `get_state()`/`set_state()` for exact resume. Each record
also gets, from the reference ids that `tools/retrieve.py` stored for it (`RetrievedIds`):

    positions      [b, L] int32    the record's positions + p + ref_len: the context starts after the sink [0, p)
                                   and the memory keys [p, p + ref_len) (docs/memory.md)
    memory_group   [b, L] int32    the chunk each token belongs to (`m3jax.memory.layout`); -1 = none
    memory_index   [b, G, S] int32 the slots of each group: indices into memory_ids; -1 = empty
    memory_ids     [b, M] int32    the record's unique references (M = G·R), sorted, -1 padded

and the memories themselves, read once per batch for the unique ids of every row (never a copy per chunk):

- "bank" mode (from a `MemoryBank`, written by a fixed checkpoint): the stored codes, as the bank keeps them
  (`memory_codes/<name>` [b, M, *row], e.g. bf16 key/values [b, M, Lm, 2, mkv, k, d]) and
  `memory_valid` [b, M, k] bool (False = a padding key or an empty id); `device_memory` turns them into the
  model's `Memory` on device;
- "online" mode (the paper: references encoded by the model being trained): `memory_tokens` [b, M, ref_len]
  int32 (-1 padded) and `memory_lengths` [b, M] int32 (0 = an empty id), from `References`.

Everything runs in grain's read threads (`prefetch` batches ahead), so a step does not wait for the bank.

The held-out batches (`memory_eval_batches`) are the stage-1 pipeline's (`m3jax.data.pipeline.eval_records`) with
the same memory inputs; a padding row of the last batch reads nothing (memory_index and memory_ids -1, no valid key
or zero length) and weighs nothing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import grain
import jax.numpy as jnp
import numpy as np

from m3jax.data.pipeline import eval_records, global_records, iterate, local_batch_size, process_batches
from m3jax.data.records import read_metadata
from m3jax.memory import layout as layout_lib
from m3jax.memory.bank import MemoryBank
from m3jax.memory.codecs import get_codec
from m3jax.memory.writer import read_record
from m3jax.model.memory import Memory, check_layout, valid_keys
from m3jax.retrieval.retrieve import RetrievedIds

MODES = ("bank", "online")
CODES_PREFIX = "memory_codes/"


def shuffled_references(num_refs: int, seed: int) -> np.ndarray:
    """The shuffled-memory control's map of reference ids: a fixed random permutation of [0, num_refs) (seeded),
    so a chunk reads a random reference instead of its retrieved one, the same one every epoch and on every
    process, with as many memories, slots and unique ids as the retrieved layout."""
    return np.random.default_rng([seed, 0x5EED]).permutation(num_refs).astype(np.int32)


def _add_slots(record: dict, ids: RetrievedIds, *, layout: str, slots: int, chunk_size: int,
               context_start: int, permutation: np.ndarray | None = None) -> dict:
    """One record -> the record with its memory groups, slots and unique ids (positions shifted). A padding record
    (`record` -1, `m3jax.data.pipeline.padding_record`) reads nothing: every slot empty."""
    refs = ids[record["record"]] if record["record"] >= 0 else np.full(ids.row_shape, -1, np.int32)  # [G, R]
    if permutation is not None:
        refs = np.where(refs >= 0, permutation[np.maximum(refs, 0)], -1)
    num_groups = refs.shape[0]
    group, _ = layout_lib.chunk_groups(record["segment_ids"], chunk_size, num_groups)
    starts, stops = layout_lib.group_spans(group, num_groups)
    group_segment = np.where(stops > starts, record["segment_ids"][starts], 0)
    unique, index = layout_lib.slot_index(refs, group_segment, layout, slots)
    check_layout(group[None], index[None], chunk_size)
    out = dict(record)
    out["positions"] = (record["positions"] + context_start).astype(np.int32)
    out.update(memory_group=group, memory_index=index, memory_ids=unique)
    return out


def _add_memories(batch: dict, *, mode: str, source) -> dict:
    """A batch -> the batch with the memories of its unique ids (bank codes, or reference tokens)."""
    ids = batch["memory_ids"]  # [b, M]
    out = dict(batch)
    if mode == "bank":
        codes, positions = source.gather_codes(ids)
        out.update({CODES_PREFIX + name: x for name, x in codes.items()})
        out["memory_valid"] = valid_keys(positions)  # [b, M, k]: False = a padding key or an empty id
    else:
        tokens, lengths = source.rows(np.maximum(ids, 0).reshape(-1))
        empty = (ids < 0).reshape(-1)
        tokens[empty] = -1
        lengths = np.where(empty, 0, lengths)
        out["memory_tokens"] = tokens.reshape(*ids.shape, -1)
        out["memory_lengths"] = lengths.reshape(ids.shape).astype(np.int32)
    return out


def make_memory_iterator(
    data_dir: str | os.PathLike,
    split: str,
    ids: RetrievedIds,
    source,
    *,
    mode: str,
    layout: str,
    slots: int,
    chunk_size: int,
    sink_len: int,
    ref_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    worker_count: int = 0,
    prefetch: int = 2,
    shuffle_references: bool = False,
) -> grain.DatasetIterator:
    """An iterator of this process's memory-augmented batches (the module docstring).

    ids: the split's retrieved reference ids; source: a `MemoryBank` ("bank") or `References` ("online");
    slots = memory.per_chunk (S), sink_len = p, ref_len: the memory positions' span. shuffle_references: the
    shuffled-memory control (`shuffled_references`, seeded by `seed`).
    """
    records = global_records(data_dir, split, global_batch_size, seed, num_epochs, shuffle, with_index=True)
    ds = _with_memories(records, data_dir, split, ids, source, mode=mode, layout=layout, slots=slots,
                        chunk_size=chunk_size, sink_len=sink_len, ref_len=ref_len,
                        global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                        process_count=process_count, shuffle_references=shuffle_references)
    return iterate(ds, prefetch, worker_count)


def make_memory_eval_batches(data_dir: str | os.PathLike, split: str, ids: RetrievedIds, source, *,
                             num_batches: int | None, global_batch_size: int, process_index: int = 0,
                             process_count: int = 1, **memory) -> list[dict[str, np.ndarray]]:
    """The held-out batches of `split` with their memories, as this process's rows: the records of
    `m3jax.data.pipeline.eval_records` (`num_batches`; `ALL_RECORDS` pads the last batch with rows that read
    nothing and weigh nothing). `memory`: the memory settings of `make_memory_iterator` (mode, layout, slots,
    chunk_size, sink_len, ref_len, seed, shuffle_references)."""
    records = eval_records(data_dir, split, global_batch_size, num_batches, with_index=True)
    ds = _with_memories(records, data_dir, split, ids, source, global_batch_size=global_batch_size,
                        process_index=process_index, process_count=process_count, **memory)
    return [ds[i] for i in range(len(ds))]


def _with_memories(records: grain.MapDataset, data_dir, split: str, ids: RetrievedIds, source, *, mode: str,
                   layout: str, slots: int, chunk_size: int, sink_len: int, ref_len: int, global_batch_size: int,
                   seed: int, process_index: int, process_count: int,
                   shuffle_references: bool) -> grain.MapDataset:
    """`records` (global order, each with its "record" index) -> this process's batches with their memories, once
    the ids are checked against the split and the source."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "bank" and not isinstance(source, MemoryBank):
        raise TypeError(f"bank mode reads a MemoryBank, got {type(source).__name__}")
    if mode == "online" and not hasattr(source, "rows"):
        raise TypeError(f"online mode reads References (m3jax.memory.knowledge), got {type(source).__name__}")
    if ids.meta["chunk_size"] != chunk_size:
        raise ValueError(f"retrieved ids {ids.directory} were cut in chunks of {ids.meta['chunk_size']} tokens, "
                         f"config.memory.chunk_size={chunk_size}")
    num_refs = source.num_refs if mode == "bank" else len(source)
    if ids.meta["num_refs"] != num_refs:
        raise ValueError(f"retrieved ids {ids.directory} index {ids.meta['num_refs']:,} references, the memory "
                         f"source holds {num_refs:,}")
    if "references_sha256" in ids.meta:  # the references the ids index into must be the source's
        record = read_record(source.path) if mode == "bank" else {"references_sha256": source.sha256()}
        theirs = (record or {}).get("references_sha256")
        if theirs != ids.meta["references_sha256"]:
            raise ValueError(f"retrieved ids {ids.directory} index the references of another knowledge base than "
                             f"the memory source's ({'bank ' + source.path if mode == 'bank' else 'References'}): "
                             "retrieve again against this bank")
    split_records = read_metadata(data_dir)["splits"].get(split, {}).get("num_records")
    if split_records is not None and ids.num_records != split_records:
        raise ValueError(f"retrieved ids {ids.directory} cover {ids.num_records:,} records, split {split!r} of "
                         f"{data_dir} holds {split_records:,}: retrieve this split again")
    local = local_batch_size(global_batch_size, process_index, process_count)
    permutation = shuffled_references(num_refs, seed) if shuffle_references else None
    ds = records.map(functools.partial(_add_slots, ids=ids, layout=layout, slots=slots, chunk_size=chunk_size,
                                       context_start=sink_len + ref_len, permutation=permutation))
    ds = process_batches(ds, local, process_index, process_count)
    return ds.map(functools.partial(_add_memories, mode=mode, source=source))


def device_memory(batch: Mapping[str, jnp.ndarray], codec: str, sink_tokens, dtype=jnp.bfloat16) -> Memory:
    """A bank-mode batch's memories as the model's `Memory` (jittable; decodes on device).

    codes [b, M, Lm, 2, mkv, k, d], decoded -> `Memory.from_rows`; index, valid as the batch holds them.
    """
    c = get_codec(codec)
    codes = {k[len(CODES_PREFIX):]: v for k, v in batch.items() if k.startswith(CODES_PREFIX)}
    b, m = batch["memory_ids"].shape
    rows = c.decode({k: v.reshape(b * m, *v.shape[2:]) for k, v in codes.items()}, dtype)
    return Memory.from_rows(rows.reshape(b, m, *rows.shape[1:]), batch["memory_index"], batch["memory_valid"],
                            sink_tokens)


def _config_settings(config, split: str) -> dict:
    """`make_memory_iterator`'s ids and memory settings as a run's config sets them (`memory_iterator`)."""
    d, r, mem = config.data, config.retrieval, config.memory
    ids_path = r.ids_path or os.path.join(d.path, f"retrieval-{split}")
    ids = RetrievedIds.open(ids_path, expect={"seq_len": int(d.seq_len), "chunk_size": int(mem.chunk_size)})
    return dict(ids=ids, mode=r.mode, layout=r.layout, slots=int(mem.per_chunk), chunk_size=int(mem.chunk_size),
                ref_len=int(mem.ref_len), global_batch_size=int(d.global_batch_size), seed=int(d.shuffle_seed),
                shuffle_references=bool(mem.shuffle_references))


def memory_iterator(config, split: str, source, sink_len: int, *, process_index: int = 0, process_count: int = 1,
                    num_epochs: int | None = None, shuffle: bool = True) -> grain.DatasetIterator:
    """`make_memory_iterator` as a run's config sets it up: the data (`config.data`), the retrieved ids
    (`retrieval.ids_path`, default DATA/retrieval-SPLIT), the mode and slot layout (`retrieval.mode`,
    `retrieval.layout`), the memory geometry (`memory.per_chunk`, `chunk_size`, `ref_len`) and the
    shuffled-memory control (`memory.shuffle_references`). source: the bank
    (bank mode) or the knowledge base's `References` (online mode); sink_len: the sink's tokens (p)."""
    d = config.data
    return make_memory_iterator(
        d.path, split, source=source, sink_len=sink_len, process_index=process_index, process_count=process_count,
        num_epochs=num_epochs, shuffle=shuffle, worker_count=int(d.worker_count), prefetch=int(d.prefetch),
        **_config_settings(config, split))


def memory_eval_batches(config, split: str, source, sink_len: int, *, num_batches: int | None,
                        process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """`make_memory_eval_batches` as a run's config sets it up (the settings of `memory_iterator`)."""
    return make_memory_eval_batches(config.data.path, split, source=source, sink_len=sink_len,
                                    num_batches=num_batches, process_index=process_index,
                                    process_count=process_count, **_config_settings(config, split))
