"""The grain input pipeline: globally ordered, process-sharded batches of packed records.

The order is defined once, globally: records are (optionally) shuffled with a seeded per-epoch permutation
and repeated, and global batch s is records [s*G, (s+1)*G) of that stream. Process p of P takes rows
[p*G/P, (p+1)*G/P) of each global batch. The data a step sees therefore does not depend on how many processes
read it, and resuming from `get_state()` reproduces the uninterrupted stream exactly.

Held-out batches are the split's records in stored order, sharded the same way; scoring every record fills the last
global batch up with padding records (loss weight 0), so a weighted mean is over exactly the split's tokens.
"""

from __future__ import annotations

import os

import grain
import numpy as np

from m3jax.data.records import split_source

ALL_RECORDS = 0  # num_batches of the held-out batches: every record of the split, the last global batch padded


def local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}"
        )
    return global_batch_size // process_count


def split_records(data_dir: str | os.PathLike, split: str, with_index: bool = False) -> grain.MapDataset:
    """The split's decoded records in stored order. `with_index`: each record also holds "record", its index in the
    split (int64 scalar)."""
    source, decode = split_source(data_dir, split)
    ds = grain.MapDataset.source(source).map_with_index(decode)
    if with_index:
        ds = ds.map_with_index(lambda i, record: {**record, "record": np.int64(i)})
    return ds


def global_records(
    data_dir: str | os.PathLike,
    split: str,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None,
    shuffle: bool,
    with_index: bool = False,
) -> grain.MapDataset:
    """The split's decoded records in global order, cut to a whole number of global batches when finite.

    `with_index`: each record also holds "record", its index in the split (int64 scalar)."""
    ds = split_records(data_dir, split, with_index)
    if len(ds) < global_batch_size:
        raise ValueError(
            f"split {split!r} of {data_dir} has {len(ds)} records, fewer than global_batch_size "
            f"{global_batch_size}"
        )
    if shuffle:
        ds = ds.seed(seed).shuffle()  # reshuffled every epoch by the repeat below
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        ds = ds[: len(ds) // global_batch_size * global_batch_size]
    return ds


def padding_record(record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A record of padding shaped like `record`: every field 0 (segment 0 attends padding only, loss weight 0 counts
    nothing), and "record" (when it has one) -1: no record of the split."""
    out = {name: np.zeros_like(value) for name, value in record.items()}
    if "record" in out:
        out["record"] = np.int64(-1)
    return out


def eval_records(
    data_dir: str | os.PathLike,
    split: str,
    global_batch_size: int,
    num_batches: int | None,
    with_index: bool = False,
) -> grain.MapDataset:
    """The held-out records in stored order, a whole number of global batches: the first `num_batches` complete
    ones, every complete one (None), or every record (`ALL_RECORDS`), the last batch filled up with
    `padding_record`s so that a mean over loss weights is over exactly the split's tokens."""
    ds = split_records(data_dir, split, with_index)
    if num_batches == ALL_RECORDS:
        short = -len(ds) % global_batch_size
        if short:
            ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([padding_record(ds[0])]).repeat(short)])
        return ds
    available = len(ds) // global_batch_size
    if available == 0:
        raise ValueError(f"split {split!r} of {data_dir} has {len(ds)} records, fewer than global_batch_size "
                         f"{global_batch_size}: only num_batches={ALL_RECORDS} (every record, padded) scores it")
    if num_batches is None:
        num_batches = available
    elif not 0 < num_batches <= available:
        raise ValueError(
            f"num_batches {num_batches} not in [1, {available}]: split {split!r} holds {available} global "
            f"batches of {global_batch_size} ({ALL_RECORDS} = every record)"
        )
    return ds[: num_batches * global_batch_size]


def process_batches(
    ds: grain.MapDataset, local_batch_size: int, process_index: int, process_count: int
) -> grain.MapDataset:
    """This process's rows of every global batch: of the consecutive local batches, global batch s is
    local batches [s*P, (s+1)*P) and process p keeps local batch s*P + p."""
    return ds.batch(local_batch_size, drop_remainder=True)[process_index::process_count]


def make_lm_iterator(
    data_dir: str | os.PathLike,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    worker_count: int = 0,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """An iterator of this process's batches: dicts of int32 arrays [global_batch_size // process_count, L].

    `num_epochs=None` repeats forever, reshuffling each epoch; a finite count ends after the last complete
    global batch. `prefetch` batches are read ahead by as many threads; `worker_count > 0` adds that many
    grain worker processes (their batches are interleaved back in order, so the data does not change). The
    iterator's `get_state()` / `set_state()` give exact resume.
    """
    local = local_batch_size(global_batch_size, process_index, process_count)
    ds = global_records(data_dir, split, global_batch_size, seed, num_epochs, shuffle)
    return iterate(process_batches(ds, local, process_index, process_count), prefetch, worker_count)


def iterate(ds: grain.MapDataset, prefetch: int, worker_count: int) -> grain.DatasetIterator:
    """Iterates `ds` with `prefetch` read threads (as many elements ahead), plus `worker_count` worker processes."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def make_eval_batches(
    data_dir: str | os.PathLike,
    split: str,
    *,
    global_batch_size: int,
    num_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """The held-out batches of `split` (`eval_records`: the first `num_batches` global batches, every complete one
    when None, every record when `ALL_RECORDS`) as this process's rows: the same batches on every call, whatever
    the process count. Padding rows, in the last batch only, are the same on every process."""
    local = local_batch_size(global_batch_size, process_index, process_count)
    ds = process_batches(eval_records(data_dir, split, global_batch_size, num_batches), local, process_index,
                         process_count)
    return [ds[i] for i in range(len(ds))]
