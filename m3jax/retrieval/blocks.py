"""Rows of one array stored in blocks: what resumable, process-sharded retrieval jobs write.

A directory holds a JSON metadata file (what the rows are; a rerun with other inputs is refused) and
`block-{i:06d}.npy`, rows [i·B, min((i+1)·B, n)) of a [n, *row_shape] array. A block is written whole to a
temporary name and renamed, so it exists only when complete: a restarted job writes the missing blocks, and process
p of P takes blocks p, p + P, … without coordination.

With `records=True`, each block also has a record, `block-{i:06d}.json`: the sha256 of the block file's bytes and
what the writer says the block was made from (`write_block(i, rows, record)`). The record is written (atomically)
before the block, so every block has one: a block whose bytes differ from its record's sha256 (damaged, or left by
a writer killed between the two renames) is an error naming its file on read, and the writer's `record` (e.g. a
digest of its inputs) tells a rerun which blocks are stale.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


class Blocks:
    """n rows of shape `row_shape` and `dtype`, in blocks of `block_rows` under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, num_rows: int, block_rows: int, row_shape: tuple[int, ...],
                 dtype, records: bool = False):
        if num_rows < 1 or block_rows < 1:
            raise ValueError(f"num_rows={num_rows} and block_rows={block_rows} must be positive")
        self.directory = Path(directory)
        self.num_rows, self.block_rows = int(num_rows), int(block_rows)
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.records = records

    @property
    def num_blocks(self) -> int:
        return -(-self.num_rows // self.block_rows)

    def block_path(self, i: int) -> Path:
        return self.directory / f"block-{i:06d}.npy"

    def record_path(self, i: int) -> Path:
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
            tmp = self.directory / f".block-{i:06d}.tmp{os.getpid()}.json"
            tmp.write_text(json.dumps(meta, sort_keys=True))
            os.replace(tmp, self.record_path(i))
        tmp = self.directory / f".block-{i:06d}.tmp{os.getpid()}.npy"
        tmp.write_bytes(data)
        os.replace(tmp, self.block_path(i))

    def read_block(self, i: int, *, mmap: bool = False) -> np.ndarray:
        """Block i; a missing, unreadable or misshapen block is an error naming its file, and so is one whose
        bytes differ from its record (`records=True`: damaged)."""
        path = self.block_path(i)
        if self.records:
            record = self.block_record(i)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read {path}: {e}") from e
            if record is None or record.get("sha256") != hashlib.sha256(data).hexdigest():
                raise ValueError(f"{path} is damaged: its sha256 differs from its record {self.record_path(i).name}"
                                 if record else f"{path} has no readable record {self.record_path(i).name}")
        try:
            block = np.load(io.BytesIO(data)) if self.records else np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        if block.shape != self._shape(i) or block.dtype != self.dtype:
            raise ValueError(f"{path} holds {block.dtype} {block.shape}, expected {self.dtype} {self._shape(i)}")
        return block


def read_meta(path: Path, *, missing_hint: str) -> dict[str, Any]:
    """The JSON metadata at `path`; errors name the file (`missing_hint` says how to make one)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {missing_hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (damaged?): {e}") from e


def create_meta(path: Path, meta: Mapping[str, Any], *, what: str, remedy: str) -> dict[str, Any]:
    """Writes `meta` at `path` (atomically), or returns the one there when it is equal: a resumed job. One that
    differs is a ValueError naming each differing field: the directory holds `what` else; `remedy` says what to do."""
    meta = json.loads(json.dumps(dict(meta)))  # as it reads back (tuples become lists)
    if path.exists():
        theirs = read_meta(path, missing_hint="")
        diffs = [f"{k}: stored {theirs.get(k)!r}, now {meta[k]!r}" for k in meta if theirs.get(k) != meta[k]]
        if diffs:
            raise ValueError(f"{path} holds {what} ({'; '.join(diffs)}); {remedy}")
        return theirs
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return meta
