"""ArrayRecord storage of packed records, and the `metadata.json` that describes a prepared data directory.

Layout of a data directory:

    metadata.json                              format version, tokenizer, seq_len, fields, splits
    {split}-{i:05d}-of-{n:05d}.arrayrecord     record k of the split goes to shard k % n

Record format (version 1): every record of a split has the same fields, each an int32 array of a fixed shape.
A record is an 8-byte header, b"M3R1" then the CRC32 (little-endian uint32) of the field spec
"name:d0xd1,...", followed by the arrays' little-endian int32 bytes in field order. Decoding checks the size,
magic and CRC, so a file written with other fields or shapes fails loudly instead of being misread.

Integrity. The bytes of a record are checked by the container: ArrayRecord writes Riegeli chunks, and with one
record per group each record is its own chunk, whose header and data carry 64-bit HighwayHash checksums that every
read verifies (a flipped byte anywhere in a shard reads as an error or, in padding, not at all; tests/
test_integrity.py flips them). Riegeli's error does not say which file; `split_source` names the shard, and the
record, in a `DataShardError`. A damaged metadata.json is an error naming it.

Buckets. A data directory is local: Grain's ArrayRecordDataSource and the ArrayRecord writer open shards by file
path, through the operating system. On a pod whose data lives in a bucket, mount it on every host (Cloud Storage
FUSE: `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`) and pass the mounted path, as JAX trainers reading ArrayRecord
from Cloud Storage do. A `gs://` data path is a `DataLocationError` that says so.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from array_record.python import array_record_module

from m3jax.paths import is_url

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
_MAGIC = b"M3R1"
_HEADER = struct.Struct("<4sI")
# One record per ArrayRecord group: grain reads records at random, and a read decompresses a whole group.
_WRITER_OPTIONS = "group_size:1"
_REQUIRED_METADATA = (
    "format_version", "seq_len", "vocab_size", "bos_id", "eos_id", "pad_id",
    "tokenizer_path", "tokenizer_sha256", "fields", "splits",
)  # fmt: skip


class DataShardError(ValueError):
    """A shard of a data directory cannot be read (damaged or truncated); the message names the file."""


def _damaged(path: str, error: Exception, where: str = "") -> DataShardError:
    return DataShardError(f"data shard {path} is damaged{where}: {error}; prepare the data again "
                          "(tools/prepare_data.py)")


class RecordCodec:
    """Encodes and decodes records of int32 arrays with fixed field names and shapes (the format above).

    `fields` is the metadata.json form: a list of {"name", "shape", "dtype": "int32"}, in storage order.
    """

    def __init__(self, fields: Sequence[Mapping[str, Any]]):
        if not fields:
            raise ValueError("a record needs at least one field")
        bad = [f for f in fields if f.get("dtype") != "int32"]
        if bad:
            raise ValueError(f"only int32 fields are supported, got {bad}")
        self.fields = {f["name"]: tuple(int(d) for d in f["shape"]) for f in fields}
        spec = ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in self.fields.items())
        self._header = _HEADER.pack(_MAGIC, zlib.crc32(spec.encode()))
        self._sizes = [int(np.prod(shape)) for shape in self.fields.values()]
        self._num_bytes = _HEADER.size + 4 * sum(self._sizes)

    @classmethod
    def for_record(cls, record: Mapping[str, np.ndarray]) -> RecordCodec:
        """The codec whose fields are the names and shapes of `record`, in its key order."""
        return cls(field_specs({name: np.shape(value) for name, value in record.items()}))

    def encode(self, record: Mapping[str, np.ndarray]) -> bytes:
        """The record's bytes; raises ValueError if its fields, dtypes or shapes differ from the codec's."""
        if record.keys() != self.fields.keys():
            raise ValueError(f"record fields {sorted(record)} differ from {sorted(self.fields)}")
        parts = [self._header]
        for name, shape in self.fields.items():
            value = record[name]
            if not isinstance(value, np.ndarray):
                raise ValueError(f"field {name!r}: expected an int32 array, got {type(value).__name__}")
            if value.dtype != np.int32 or value.shape != shape:
                raise ValueError(f"field {name!r}: expected int32 {shape}, got {value.dtype} {value.shape}")
            parts.append(value.astype("<i4", copy=False).tobytes())
        return b"".join(parts)

    def decode(self, raw: bytes, source: str = "record") -> dict[str, np.ndarray]:
        """The record's arrays (writable, native int32); a mismatch raises ValueError naming `source`."""
        if len(raw) != self._num_bytes or raw[: _HEADER.size] != self._header:
            raise ValueError(
                f"{source}: not a record with fields {self.fields} "
                f"({len(raw)} bytes, expected {self._num_bytes} starting with {self._header!r})"
            )
        flat = np.frombuffer(raw, dtype="<i4", offset=_HEADER.size).astype(np.int32)
        out, offset = {}, 0
        for (name, shape), size in zip(self.fields.items(), self._sizes, strict=True):
            out[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return out


def field_specs(shapes: Mapping[str, Sequence[int]]) -> list[dict[str, Any]]:
    """The metadata.json description of int32 fields {name: shape}, in the mapping's order."""
    return [{"name": n, "shape": [int(d) for d in shape], "dtype": "int32"} for n, shape in shapes.items()]


def shard_names(split: str, num_shards: int) -> list[str]:
    """File names of a split's shards, relative to the data directory (as listed in metadata.json)."""
    return [f"{split}-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]


def write_split(
    records: Iterable[Mapping[str, np.ndarray]], out_dir: str | os.PathLike, split: str, num_shards: int
) -> int:
    """Writes `records` round-robin into `num_shards` ArrayRecord shards of `split`; returns the record count.

    The fields are those of the first record; every later record must match them. Shards are written under a
    temporary name and renamed when complete, so a crash never leaves a truncated shard behind.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    out_dir = local_data_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in shard_names(split, num_shards)]
    tmp_paths = [path.with_name(path.name + ".tmp") for path in paths]
    writers = [array_record_module.ArrayRecordWriter(str(p), _WRITER_OPTIONS) for p in tmp_paths]
    count, codec = 0, None
    try:
        for count, record in enumerate(records, start=1):
            codec = codec or RecordCodec.for_record(record)
            try:
                writers[(count - 1) % num_shards].write(codec.encode(record))
            except ValueError as e:
                raise ValueError(f"split {split!r}, record {count - 1}: {e}") from e
    finally:
        for writer in writers:
            writer.close()
    for tmp, path in zip(tmp_paths, paths, strict=True):
        os.replace(tmp, path)
    return count


class DataLocationError(ValueError):
    """A data directory given as a URL: ArrayRecord shards are read and written by local path only."""


def local_data_dir(data_dir: str | os.PathLike) -> Path:
    """`data_dir` as a local Path; a URL (`gs://...`) is a `DataLocationError` saying how to reach a bucket."""
    if is_url(data_dir):
        raise DataLocationError(
            f"data directory {os.fspath(data_dir)}: prepared data (ArrayRecord shards) is read and written by local "
            "path only; mount the bucket on every host (`gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`) and pass "
            "the mounted directory")
    return Path(data_dir)


def write_metadata(data_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Writes `{data_dir}/metadata.json` atomically."""
    path = local_data_dir(data_dir) / METADATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_metadata(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks `{data_dir}/metadata.json`; errors name the directory or file at fault."""
    data_dir = local_data_dir(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"data directory {data_dir} does not exist (prepare it with tools/prepare_data.py)"
        )
    path = data_dir / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} is missing: {data_dir} is not a prepared data directory") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (damaged?): {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a JSON object (damaged?)")
    missing = [key for key in _REQUIRED_METADATA if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {meta['format_version']}; this code reads {FORMAT_VERSION}"
        )
    return meta


class SplitDecoder:
    """Decodes record `index` of a split (grain `map_with_index` signature); errors name the shard.

    Indices past the split's length wrap around, as grain's repeat and per-epoch shuffle produce them.
    """

    def __init__(self, codec: RecordCodec, shard_paths: list[str], shard_lengths: list[int]):
        self.codec = codec
        self._shard_paths = shard_paths
        self._ends = np.cumsum(shard_lengths).tolist()

    def __call__(self, index: int, raw: bytes) -> dict[str, np.ndarray]:
        index %= self._ends[-1]
        shard = bisect.bisect_right(self._ends, index)
        return self.codec.decode(raw, source=f"{self._shard_paths[shard]} (split record {index})")


class ShardSource(grain.sources.ArrayRecordDataSource):
    """grain's ArrayRecordDataSource over a split's shards, whose read errors name the shard file and record."""

    def __init__(self, paths: list[str], lengths: list[int]):
        super().__init__(paths)
        self._shard_paths = list(paths)
        self._shard_ends = np.cumsum(lengths).tolist()

    def _error(self, key: int, error: Exception) -> DataShardError:
        key = int(key)
        shard = bisect.bisect_right(self._shard_ends, key)
        position = key - (self._shard_ends[shard - 1] if shard else 0)
        return _damaged(self._shard_paths[shard], error, f" (its record {position}, split record {key})")

    def __getitem__(self, record_key):
        try:
            return super().__getitem__(record_key)
        except (RuntimeError, OSError) as e:  # riegeli: "Corrupted Riegeli/records file: ... hash mismatch"
            raise self._error(record_key, e) from e

    def __getitems__(self, record_keys):
        try:
            return super().__getitems__(record_keys)
        except (RuntimeError, OSError):
            return [self[key] for key in record_keys]  # one by one: the first damaged record is named


def split_source(
    data_dir: str | os.PathLike, split: str
) -> tuple[grain.sources.ArrayRecordDataSource, SplitDecoder]:
    """A random-access source over a split's shards, in shard order, and the decoder of its raw records.

    Checks that every shard exists, can be opened, holds the number of records metadata.json promises, and starts
    with a record of the declared fields. A record that cannot be read later (damaged bytes fail Riegeli's
    checksums) is a `DataShardError` naming its shard.
    """
    meta = read_metadata(data_dir)
    splits = meta["splits"]
    if split not in splits:
        raise ValueError(f"split {split!r} not in {data_dir} (available splits: {sorted(splits)})")
    info = splits[split]
    paths = [str(Path(data_dir, name)) for name in info["shards"]]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path} of split {split!r} is missing")
    if info["num_records"] == 0:
        raise ValueError(f"split {split!r} of {data_dir} has no records")
    codec = RecordCodec(meta["fields"])
    lengths = []
    for path in paths:
        try:
            reader = array_record_module.ArrayRecordReader(path)
            lengths.append(reader.num_records())
            first = reader.read([0])[0] if lengths[-1] else None
            reader.close()
        except (RuntimeError, OSError) as e:
            raise _damaged(path, e) from e
        if first is not None:
            codec.decode(first, source=path)
    if sum(lengths) != info["num_records"]:
        raise ValueError(
            f"split {split!r} of {data_dir}: its shards hold {sum(lengths)} records, metadata.json says "
            f"{info['num_records']}"
        )
    return ShardSource(paths, lengths), SplitDecoder(codec, paths, lengths)
