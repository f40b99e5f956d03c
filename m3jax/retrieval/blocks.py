"""Rows of one array stored in blocks: what resumable, process-sharded retrieval jobs write.

A directory (a local path or a `gs://` URL, through etils.epath) holds a JSON metadata file (what the rows are; a
rerun with other inputs is refused) and `block-{i:06d}.npy`, rows [i·B, min((i+1)·B, n)) of a [n, *row_shape]
array. A block exists only when complete (`write_whole`): a restarted job writes the missing blocks, and process p
of P takes blocks p, p + P, … without coordination.

With `records=True`, each block also has a record, `block-{i:06d}.json`: the sha256 of the block file's bytes and
what the writer says the block was made from (`write_block(i, rows, record)`). The record is written (atomically)
before the block, so every block has one: a block whose bytes differ from its record's sha256 (damaged, or left by
a writer killed between the two writes) is an error naming its file or object on read, and the writer's `record`
(e.g. a digest of its inputs) tells a rerun which blocks are stale.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from etils import epath

from m3jax.paths import absolute, is_url


def write_whole(path: epath.Path, data: bytes) -> None:
    """Writes `data` at `path` so that a reader finds all of it or nothing. A local file is written under a
    temporary name and renamed. An object in a bucket is uploaded under its own name: an upload is visible only
    once whole, and a rename there is a copy and a delete, not atomic."""
    if is_url(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.stem}.tmp{os.getpid()}{path.suffix}"
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Blocks:
    """n rows of shape `row_shape` and `dtype`, in blocks of `block_rows` under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, num_rows: int, block_rows: int, row_shape: tuple[int, ...],
                 dtype, records: bool = False):
        if num_rows < 1 or block_rows < 1:
            raise ValueError(f"num_rows={num_rows} and block_rows={block_rows} must be positive")
        self.directory = absolute(directory)
        self.num_rows, self.block_rows = int(num_rows), int(block_rows)
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.records = records

    @property
    def num_blocks(self) -> int:
        return -(-self.num_rows // self.block_rows)

    def block_path(self, i: int) -> epath.Path:
        return self.directory / f"block-{i:06d}.npy"

    def record_path(self, i: int) -> epath.Path:
        return self.directory / f"block-{i:06d}.json"

    def block_record(self, i: int) -> dict[str, Any] | None:
        """Block i's record (`records=True`); None when it has none or it cannot be read."""
        try:
            record = json.loads(self.record_path(i).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def block_range(self, i: int) -> tuple[int, int]:
        return i * self.block_rows, min((i + 1) * self.block_rows, self.num_rows)

    def missing_blocks(self, blocks: Iterable[int] | None = None) -> list[int]:
        """The blocks (of `blocks`, default all) not written yet."""
        return [i for i in (range(self.num_blocks) if blocks is None else blocks) if not self.block_path(i).exists()]

    def process_blocks(self, process_index: int, process_count: int) -> list[int]:
        """The missing blocks of process p of P: p, p + P, …"""
        return self.missing_blocks(range(process_index, self.num_blocks, process_count))

    def _shape(self, i: int) -> tuple[int, ...]:
        a, b = self.block_range(i)
        return (b - a, *self.row_shape)

    def write_block(self, i: int, rows: np.ndarray, record: Mapping[str, Any] | None = None) -> None:
        """Writes block i (and first, with `records=True`, its record: `record` and the block's sha256)."""
        if rows.shape != self._shape(i):
            raise ValueError(f"block {i} of {self.directory}: rows of shape {rows.shape}, expected {self._shape(i)}")
        buffer = io.BytesIO()
        np.save(buffer, rows.astype(self.dtype))
        data = buffer.getvalue()
        if self.records:
            meta = {**(record or {}), "sha256": hashlib.sha256(data).hexdigest()}
            write_whole(self.record_path(i), json.dumps(meta, sort_keys=True).encode())
        write_whole(self.block_path(i), data)

    def read_block(self, i: int, *, mmap: bool = False) -> np.ndarray:
        """Block i; a missing, unreadable or misshapen block is an error naming its file (or object), and so is
        one whose bytes differ from its record (`records=True`: damaged). `mmap` maps a local block without a
        record (an object in a bucket is read whole)."""
        path = self.block_path(i)
        mapped = mmap and not self.records and not is_url(path)
        try:
            data = None if mapped else path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        if self.records:
            record = self.block_record(i)
            if record is None or record.get("sha256") != hashlib.sha256(data).hexdigest():
                raise ValueError(f"{path} is damaged: its sha256 differs from its record {self.record_path(i).name}"
                                 if record else f"{path} has no readable record {self.record_path(i).name}")
        try:
            block = np.load(os.fspath(path), mmap_mode="r") if mapped else np.load(io.BytesIO(data))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        if block.shape != self._shape(i) or block.dtype != self.dtype:
            raise ValueError(f"{path} holds {block.dtype} {block.shape}, expected {self.dtype} {self._shape(i)}")
        return block


def read_meta(path: epath.Path, *, missing_hint: str) -> dict[str, Any]:
    """The JSON metadata at `path` (a file or an object); errors name it (`missing_hint` says how to make one)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {missing_hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (damaged?): {e}") from e


def create_meta(path: epath.Path, meta: Mapping[str, Any], *, what: str, remedy: str) -> dict[str, Any]:
    """Writes `meta` at `path` (whole: `write_whole`), or returns the one there when it is equal: a resumed job. One
    that differs is a ValueError naming each differing field: the directory holds `what` else; `remedy` says what to
    do."""
    meta = json.loads(json.dumps(dict(meta)))  # as it reads back (tuples become lists)
    if path.exists():
        theirs = read_meta(path, missing_hint="")
        diffs = [f"{k}: stored {theirs.get(k)!r}, now {meta[k]!r}" for k in meta if theirs.get(k) != meta[k]]
        if diffs:
            raise ValueError(f"{path} holds {what} ({'; '.join(diffs)}); {remedy}")
        return theirs
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(meta, indent=1, sort_keys=True).encode())
    return meta
