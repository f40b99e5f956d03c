"""The memory bank: one sparse key/value memory per reference, in TensorStore zarr v3 arrays.

The bank lives under one root: a local path, or any TensorStore kvstore URL or spec (`file://`, `gs://`,
`memory://` for tests). The root is a zarr v3 group:

    zarr.json    the group; attributes["m3jax_bank"] = the metadata below (written last: a bank exists once it is)
    memory/      [refs, mem_layers, 2, kv_heads, k, head_dim]   the codec's codes (bfloat16; int8 for `int8`)
    scale/       [refs, mem_layers, 2, kv_heads, k] bfloat16   `int8` only: one scale per head_dim vector
    positions/   [refs, mem_layers, kv_heads, k] int32         in-reference positions of the kept tokens,
                                                               in [p, p + ref_len); -1 = padding key
    tokens/      [refs, ref_len] int32                         the reference's token ids; -1 = padding
    token_digest/ [refs] uint64                                the first 8 bytes (little-endian) of the sha256 of
                                                               the row's stored tokens (ref_len int32, -1 padded)
    written/     [refs] uint8                                  1 once the row's other arrays are durably written

Chunking. Every per-reference array is cut into *shards* of `refs_per_shard` references (one file or object
each; 64 by default: 28.8 MB for memory3_2b in bf16), and inside a shard every reference is its own chunk
(zarr's sharding codec), so a gather of random ids reads exactly its rows (byte ranges) and nothing else, while
a 1.1e8-reference bank needs 1.7M files per array rather than 1.1e8. Writers that run concurrently take
disjoint shard-aligned slices (`process_range`), so no two write the same file. (Overlapping writes stay
correct where the kvstore has conditional writes, as file and gcs do: TensorStore retries the read-modify-write
of a shard; two processes interleaving rows of the same shards lost none here, on file.) A write of less than a
whole shard rewrites that shard: write in shard-sized pieces.
Nothing is compressed: KV values hardly compress, and sizes stay exactly predictable (`bytes_per_reference`).

Integrity (format 2). Every stored chunk of data ends with its crc32c (zarr's `crc32c` codec: each reference's
chunk inside a shard, each shard's index, each chunk of `token_digest`), and every array but `written` is opened
with `fill_missing_data_reads` off, so a flipped byte, a truncated shard or a missing chunk of a written row is an
error on read (TensorStore checks the crc32c as it decodes; tools/bench/bank_gather.py measures the cost), never
data. Such an error is a `BankCorruptionError` naming the bank, the array, the reference ids and the file. Rows
in the RAM cache were verified when they were read. `verify(start, stop)` reads every written row of a range and
returns the damaged ones; the writer runs it when it resumes, and writes them again (`m3jax/memory/writer.py`).
The `written` flags are plain bytes (a reader of the raw files sees 0 or 1), and their damage cannot pass
unnoticed either: a flag other than 0 or 1, or a chunk that cannot be read, counts as unwritten (logged); a 1 that
became 0 is a row written again; a 0 that became 1 reads chunks that were never written, which is an error.
`token_digest` is what a row's text is, cheaply: the index of the bank (m3jax/retrieval/build.py) records the
digests it embedded, so a rewritten row is embedded again. A bank of format 1 is refused on open with a message to
write it again.

Resume. `written` is chunked per shard too. A write stores the row's arrays, waits for them to be durable, then
sets their flags, so a row whose flag is 1 is complete; `unwritten_ranges()` lists what a restarted writer
still has to do, and reading a row whose flag is 0 is an error naming it.

Metadata (JSON in the group attributes): the architecture (the model config fields that determine the stored
key/values, `architecture()`) and its hash, the tokenizer's sha256, the writing checkpoint {run_id, step}, the
codec, k, ref_len, the sink tokens, num_refs, the shard size, whether chunks carry checksums (always, but for
measuring their cost), the creation time and the m3jax version. Opening
with another architecture, tokenizer or sink is a `BankMismatchError`; another checkpoint is one too unless
allowed (stage 2 reads a bank written by the warm-up checkpoint), and then the age in steps is logged.

Reading. `gather(ids)` returns the decoded memories of any array of ids (repeats allowed; -1 = an empty slot:
zeros with positions -1), in the requested order. Recently used rows stay in a RAM LRU cache of `cache_rows`
rows (in the stored form); only the missing rows are read, in one batched read per array. The cache assumes a
written row does not change (a rewrite through the same object drops it from the cache). A row that is not
written, or whose stored bytes fail their checksum, is an error naming it.
"""

from __future__ import annotations

import collections
import datetime
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from absl import logging
from etils import epath

from m3jax.memory.codecs import Codec, get_codec, numpy_dtype
from m3jax.model.config import ModelConfig

FORMAT = 2  # 2: crc32c on every chunk, token_digest, missing chunks of written rows are errors
METADATA_KEY = "m3jax_bank"
DEFAULT_REFS_PER_SHARD = 64
# Metadata fields that say what a bank holds; two banks agreeing on them are the same bank (resume checks them).
IDENTITY_FIELDS = ("format", "num_refs", "codec", "k", "ref_len", "refs_per_shard", "architecture",
                   "architecture_hash", "tokenizer_sha256", "checkpoint", "sink_tokens", "checksums")
# TensorStore status codes of a read that found damaged or missing stored bytes (not a transient failure).
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE", "INVALID_ARGUMENT")


class BankMismatchError(ValueError):
    """The bank was written by another model, tokenizer or checkpoint than the reader expects."""


class BankCorruptionError(ValueError):
    """Stored bytes of the bank are damaged or missing: the message names the bank, the array, the references and
    the file."""


# ------------------------------------------------------------------------------------------------ identity
def architecture(model_cfg: ModelConfig) -> dict[str, Any]:
    """What determines a memory's key/values: `ModelConfig.architecture()` (JSON-ready)."""
    return model_cfg.architecture()


def _hash_architecture(arch: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(arch), sort_keys=True).encode()).hexdigest()


def architecture_hash(model_cfg: ModelConfig) -> str:
    """sha256 of `architecture(...)` as canonical JSON: stable across processes and Python versions."""
    return _hash_architecture(architecture(model_cfg))


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 of a SentencePiece model file's bytes (equals `m3jax.data.tokenizer.Tokenizer(path).sha256`)."""
    return hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()


def row_shape(arch: Mapping[str, Any]) -> tuple[int, ...]:
    """One memory: [mem_layers, 2, kv_heads, k, head_dim]."""
    return (len(arch["memory_layers"]), 2, len(arch["memory_kv_heads"]), arch["k"], arch["head_dim"])


def _row_arrays(codec: Codec, arch: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every per-reference array of a bank: name -> (per-row shape, zarr data type)."""
    shape = row_shape(arch)
    return {**codec.arrays(shape), "positions": ((shape[0], shape[2], shape[3]), "int32"),
            "tokens": ((arch["ref_len"],), "int32"), "token_digest": ((), "uint64"), "written": ((), "uint8")}


def bytes_per_reference(codec: str | Codec, arch: Mapping[str, Any], *, checksums: bool = True) -> dict[str, int]:
    """Stored bytes of one reference: per array, "shard_index" (16 bytes per row of each sharded array) and
    "checksums" (the 4-byte crc32c of each row's chunk in each sharded array). Per shard, not counted here: a
    4-byte crc32c of each shard index and of each `token_digest` chunk."""
    codec = get_codec(codec) if isinstance(codec, str) else codec
    arrays = _row_arrays(codec, arch)
    out = {name: math.prod(shape) * numpy_dtype(dt).itemsize for name, (shape, dt) in arrays.items()}
    sharded = sum(1 for shape, _ in arrays.values() if shape)
    out["shard_index"] = 16 * sharded
    out["checksums"] = 4 * sharded if checksums else 0
    return out


def token_digests(tokens: np.ndarray) -> np.ndarray:
    """`token_digest` of rows of stored tokens [n, ref_len] int32 (-1 padded): [n] uint64, the first 8 bytes
    (little-endian) of each row's sha256 over its little-endian int32 bytes."""
    rows = np.ascontiguousarray(tokens, "<i4")
    return np.array([int.from_bytes(hashlib.sha256(r.tobytes()).digest()[:8], "little") for r in rows], np.uint64)


# ------------------------------------------------------------------------------------------------ storage
_CONTEXT: ts.Context | None = None


def _default_context() -> ts.Context:
    """One context per process: `memory://` banks are visible to every open of the process, and TensorStore's
    own chunk cache stays off (cache_pool 0; the bank's LRU caches rows). A request to a bucket that fails with a
    5xx, 408 or 429 or a dropped connection is retried with TensorStore's default backoff (`gcs_request_retries`:
    32 retries from 1 s doubling to 32 s, about 15 minutes); then the write or read fails naming the object, and a
    row is flagged written only once its data is stored (tests/test_gcs_faults.py)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context()
    return _CONTEXT


def _root(path: str | os.PathLike | Mapping | ts.KvStore.Spec) -> ts.KvStore.Spec:
    if isinstance(path, ts.KvStore.Spec):
        spec = ts.KvStore.Spec(path.to_json())
    elif isinstance(path, Mapping):
        spec = ts.KvStore.Spec(dict(path))
    elif "://" in os.fspath(path):
        spec = ts.KvStore.Spec(os.fspath(path))
    else:
        spec = ts.KvStore.Spec({"driver": "file", "path": os.path.abspath(os.fspath(path))})
    if spec.path and not spec.path.endswith("/"):
        spec.path += "/"
    return spec


def _describe(root: ts.KvStore.Spec) -> str:
    try:
        return root.url
    except (ValueError, AttributeError):
        return json.dumps(root.to_json())


_BYTES = [{"name": "bytes", "configuration": {"endian": "little"}}]
_CRC = [{"name": "crc32c"}]
_FILL = {"positions": -1, "tokens": -1}


def _open_spec(root: ts.KvStore.Spec, name: str) -> dict:
    """Opening array `name`: a missing chunk reads as its fill value only in `written` (a row not written yet);
    anywhere else it is an error (a gather reads written rows only)."""
    return {"driver": "zarr3", "kvstore": (root / f"{name}/").to_json(), "fill_missing_data_reads": name == "written"}


def _array_spec(root: ts.KvStore.Spec, name: str, num_refs: int, shape: tuple[int, ...], dtype: str,
                refs_per_shard: int, checksums: bool) -> dict:
    crc = _CRC if checksums else []
    if shape:  # a shard of refs_per_shard rows, one chunk per row
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, *shape], "codecs": _BYTES + crc, "index_codecs": _BYTES + _CRC,
            "index_location": "end"}}]
    else:  # `written` stays plain bytes (see the module docstring)
        codecs = _BYTES + (crc if name != "written" else [])
    metadata = {"shape": [num_refs, *shape], "data_type": dtype, "codecs": codecs, "fill_value": _FILL.get(name, 0),
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [refs_per_shard, *shape]}}}
    return {**_open_spec(root, name), "metadata": metadata}


def _status(error: Exception) -> str:
    """The TensorStore status code of an error ("DATA_LOSS", ...); "" when it has none."""
    found = re.match(r"([A-Z_]+): ", str(error))
    return found.group(1) if found else ""


def _clean(error: Exception) -> str:
    """A TensorStore error's message without the spec it appends."""
    return str(error).split(" [tensorstore_spec=")[0]


def _ids_text(ids: Sequence[int], limit: int = 8) -> str:
    ids = [int(i) for i in ids]
    shown = ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")
    return f"reference{'s' if len(ids) > 1 else ''} {shown}"


def _identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {f: meta.get(f) for f in IDENTITY_FIELDS}


# ------------------------------------------------------------------------------------------------ side files
def _side_file_key(name: str) -> str:
    if not name or "/" in name or name == "zarr.json" or not name.endswith(".json"):
        raise ValueError(f"a bank side file is a top-level *.json name other than zarr.json, got {name!r}")
    return name


def read_side_file(path, name: str) -> str | None:
    """The text of side file `name` (a top-level `*.json` beside the bank's arrays, e.g. the writer's record)
    of the bank at `path`; None when there is none."""
    store = ts.KvStore.open(_root(path), context=_default_context()).result()
    found = store.read(_side_file_key(name)).result()
    return found.value.decode() if found.state == "value" else None


def create_side_file(path, name: str, text: str) -> bool:
    """Stores side file `name` unless it exists, atomically (a conditional write: of processes racing to create
    it, exactly one wins). Returns whether this call stored it."""
    store = ts.KvStore.open(_root(path), context=_default_context()).result()
    key = _side_file_key(name)
    found = store.read(key).result()
    if found.state == "value":
        return False
    return bool(store.write(key, text, if_equal=found.stamp.generation).result().generation)


# ------------------------------------------------------------------------------------------------ the cache
class _RowCache:
    """An LRU of rows in preallocated slabs (one per array): `capacity` rows, bounded memory, no per-row objects."""

    def __init__(self, capacity: int, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
        self.capacity = capacity
        self.slabs = {name: np.empty((capacity, *shape), dtype) for name, (shape, dtype) in arrays.items()}
        self.slots: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.free = list(range(capacity))
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def take(self, ids: np.ndarray, out: Mapping[str, np.ndarray], dest: np.ndarray) -> np.ndarray:
        """Copies the cached rows of distinct `ids` to out[name][dest[j]]; returns the mask of misses."""
        with self.lock:
            slots = np.array([self.slots.get(int(i), -1) for i in ids], np.int64)
            hit = slots >= 0
            for i in ids[hit]:
                self.slots.move_to_end(int(i))
            for name, slab in self.slabs.items():
                target = out[name]
                for d, slot in zip(dest[hit], slots[hit], strict=True):  # row by row: one copy, no temporary
                    target[d] = slab[slot]
            self.hits += int(hit.sum())
            self.misses += int((~hit).sum())
        return ~hit

    def put(self, ids: np.ndarray, rows: Mapping[str, np.ndarray]) -> None:
        """Caches rows[name][j] for distinct `ids` not cached yet (the last `capacity` of them)."""
        if not self.capacity:
            return
        ids, rows = ids[-self.capacity:], {name: r[-self.capacity:] for name, r in rows.items()}
        with self.lock:
            slots = []
            for i in ids:
                if int(i) in self.slots:  # another thread cached it meanwhile
                    slots.append(self.slots[int(i)])
                    self.slots.move_to_end(int(i))
                    continue
                if not self.free:
                    _, slot = self.slots.popitem(last=False)
                    self.free.append(slot)
                slot = self.free.pop()
                self.slots[int(i)] = slot
                slots.append(slot)
            for name, slab in self.slabs.items():
                slab[slots] = rows[name]

    def drop(self, start: int, stop: int) -> None:
        with self.lock:
            for i in [i for i in self.slots if start <= i < stop]:
                self.free.append(self.slots.pop(i))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _decode(codes: dict, codec: Codec, dtype) -> jax.Array:
    return codec.decode(codes, dtype)


# ------------------------------------------------------------------------------------------------ the bank
class MemoryBank:
    """A memory bank on TensorStore; make one with `MemoryBank.create` or `MemoryBank.open`."""

    def __init__(self, root: ts.KvStore.Spec, metadata: dict[str, Any], arrays: dict[str, ts.TensorStore],
                 cache_rows: int):
        self.path = _describe(root)
        self.metadata = metadata
        self.codec = get_codec(metadata["codec"])
        self._arrays = arrays
        self._gathered = [*self.codec.arrays(self.row_shape), "positions"]  # the arrays a gather reads
        self._cache = _RowCache(cache_rows, {n: (arrays[n].shape[1:], arrays[n].dtype.numpy_dtype)
                                             for n in self._gathered})

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(cls, path, *, num_refs: int, architecture: Mapping[str, Any], tokenizer_sha256: str,
               checkpoint: Mapping[str, Any], sink_tokens: Sequence[int], codec: str = "bf16",
               refs_per_shard: int = DEFAULT_REFS_PER_SHARD, exist_ok: bool = False, cache_rows: int = 0,
               checksums: bool = True, context: ts.Context | None = None) -> MemoryBank:
        """A new bank of `num_refs` unwritten rows, shaped by `architecture` (from `architecture()`).

        checkpoint: {"run_id": str, "step": int}, the parameters that write it. With `exist_ok`, an existing
        bank with the same identity (every field but the creation time and version) is opened instead: a
        restarted writer resumes, and every process of a multi-process writer may call this at once. An existing
        bank that differs is a BankMismatchError. `checksums=False` stores chunks without their crc32c, so
        damaged bytes go undetected: only for measuring what the checksums cost (tools/bench/bank_gather.py).
        """
        codec_ = get_codec(codec)
        if num_refs <= 0 or refs_per_shard <= 0:
            raise ValueError(f"num_refs={num_refs} and refs_per_shard={refs_per_shard} must be positive")
        if set(checkpoint) != {"run_id", "step"}:
            raise ValueError(f"checkpoint must be {{'run_id': str, 'step': int}}, got {dict(checkpoint)}")
        meta = {
            "format": FORMAT, "num_refs": int(num_refs), "codec": codec_.name, "k": int(architecture["k"]),
            "ref_len": int(architecture["ref_len"]), "refs_per_shard": int(refs_per_shard),
            "architecture": dict(architecture), "architecture_hash": _hash_architecture(architecture),
            "tokenizer_sha256": str(tokenizer_sha256),
            "checkpoint": {"run_id": str(checkpoint["run_id"]), "step": int(checkpoint["step"])},
            "sink_tokens": [int(t) for t in sink_tokens], "checksums": bool(checksums),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "m3jax_version": _version(),
        }
        context = context or _default_context()
        root = _root(path)
        store = ts.KvStore.open(root, context=context).result()
        found = store.read("zarr.json").result()
        if found.state == "value":
            if not exist_ok:
                raise FileExistsError(f"a memory bank exists at {_describe(root)} (exist_ok=True resumes it)")
            return cls._reopen_same(root, meta, context, cache_rows)
        specs = {name: _array_spec(root, name, num_refs, shape, dtype, refs_per_shard, checksums)
                 for name, (shape, dtype) in _row_arrays(codec_, architecture).items()}
        futures = {name: ts.open(spec, create=True, open=True, context=context) for name, spec in specs.items()}
        arrays = {name: f.result() for name, f in futures.items()}
        group = {"zarr_format": 3, "node_type": "group", "attributes": {METADATA_KEY: meta}}
        written = store.write("zarr.json", json.dumps(group, indent=1), if_equal=found.stamp.generation).result()
        if not written.generation:  # another process created it first
            return cls._reopen_same(root, meta, context, cache_rows)
        return cls(root, meta, arrays, cache_rows)

    @classmethod
    def _reopen_same(cls, root, meta, context, cache_rows) -> MemoryBank:
        bank = cls._open(root, context, cache_rows)
        theirs, ours = _identity(bank.metadata), _identity(meta)
        diffs = [f"{k}: bank {theirs[k]!r}, requested {ours[k]!r}" for k in IDENTITY_FIELDS if theirs[k] != ours[k]]
        if diffs:
            raise BankMismatchError(f"memory bank {bank.path} exists and differs from the one requested: "
                                    + "; ".join(diffs))
        return bank

    @classmethod
    def read_metadata(cls, path, *, context: ts.Context | None = None) -> dict[str, Any]:
        """The bank's metadata, checking only that it is readable and of this code's format (for tools that
        inspect banks). A damaged zarr.json is an error naming it; a bank of another format, one saying so."""
        root = _root(path)
        found = ts.KvStore.open(root, context=context or _default_context()).result().read("zarr.json").result()
        if found.state != "value":
            raise FileNotFoundError(f"no memory bank at {_describe(root)} (no zarr.json)")
        try:
            group = json.loads(found.value.decode())
            meta = group.get("attributes", {}).get(METADATA_KEY) if isinstance(group, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BankCorruptionError(f"memory bank {_describe(root)}: its metadata file zarr.json is damaged ({e})"
                                      ) from e
        if not isinstance(meta, dict):
            raise ValueError(f"{_describe(root)} is not an m3jax memory bank (zarr.json has no {METADATA_KEY!r})")
        if meta.get("format") != FORMAT:
            raise ValueError(f"memory bank {_describe(root)} is of format {meta.get('format')!r}; this code reads "
                             f"format {FORMAT} (every stored chunk with its checksum, and token digests): write it "
                             "again with tools/write_memory.py into a new --bank")
        return meta

    @classmethod
    def _open(cls, root, context, cache_rows) -> MemoryBank:
        meta = cls.read_metadata(root, context=context)
        names = _row_arrays(get_codec(meta["codec"]), meta["architecture"])
        futures = {name: ts.open(_open_spec(root, name), open=True, context=context) for name in names}
        arrays = {}
        for name, future in futures.items():
            try:
                arrays[name] = future.result()
            except ValueError as e:  # a missing or damaged array metadata file (NAME/zarr.json)
                raise BankCorruptionError(f"memory bank {_describe(root)}: array {name!r} cannot be opened "
                                          f"({_clean(e)})") from e
        if not meta.get("checksums"):
            logging.warning("memory bank %s stores no checksums: damaged rows are not detected", _describe(root))
        return cls(root, meta, arrays, cache_rows)

    @classmethod
    def open(cls, path, *, expect_architecture: Mapping[str, Any], expect_tokenizer: str,
             expect_checkpoint: Mapping[str, Any] | None = None, allow_other_checkpoint: bool = False,
             expect_sink_tokens: Sequence[int] | None = None, cache_rows: int = 1024,
             context: ts.Context | None = None) -> MemoryBank:
        """Opens a bank for reading, refusing one that another model wrote.

        expect_architecture: `architecture(model_cfg)` of the reader; expect_tokenizer: its sha256.
        A different architecture, tokenizer or (when given) sink is a BankMismatchError naming the bank, the
        field and both values. A different checkpoint (when given) is too, unless `allow_other_checkpoint`:
        then the bank's age in steps is logged; `expect_checkpoint=None` checks no checkpoint (a tool that has
        none). cache_rows: rows of the RAM LRU cache (0 = none).
        """
        bank = cls._open(_root(path), context or _default_context(), cache_rows)
        meta = bank.metadata

        def mismatch(field, theirs, ours, why=""):
            raise BankMismatchError(f"memory bank {bank.path}: {field}: bank {theirs!r}, expected {ours!r}{why}")

        if meta["architecture_hash"] != _hash_architecture(expect_architecture):
            theirs = meta["architecture"]
            for key in sorted(set(theirs) | set(expect_architecture)):
                if theirs.get(key) != expect_architecture.get(key):
                    mismatch(f"architecture.{key}", theirs.get(key), expect_architecture.get(key),
                             " (the bank was written by another model architecture)")
            mismatch("architecture_hash", meta["architecture_hash"], _hash_architecture(expect_architecture))
        if meta["tokenizer_sha256"] != expect_tokenizer:
            mismatch("tokenizer_sha256", meta["tokenizer_sha256"], expect_tokenizer,
                     " (the bank was written with another tokenizer)")
        if expect_sink_tokens is not None and meta["sink_tokens"] != [int(t) for t in expect_sink_tokens]:
            mismatch("sink_tokens", meta["sink_tokens"], [int(t) for t in expect_sink_tokens])
        if expect_checkpoint is not None:
            theirs, ours = meta["checkpoint"], {"run_id": str(expect_checkpoint["run_id"]),
                                                "step": int(expect_checkpoint["step"])}
            if theirs != ours:
                if not allow_other_checkpoint:
                    mismatch("checkpoint", theirs, ours, " (allow_other_checkpoint=True reads it anyway)")
                age = (f"{ours['step'] - theirs['step']} steps older than the reader's parameters"
                       if theirs["run_id"] == ours["run_id"] else f"from another run ({theirs['run_id']!r})")
                logging.warning("memory bank %s was written by checkpoint %s step %d: %s", bank.path,
                                theirs["run_id"], theirs["step"], age)
        return bank

    # ---------------------------------------------------------------- shape
    @property
    def num_refs(self) -> int:
        return self.metadata["num_refs"]

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One memory: [mem_layers, 2, kv_heads, k, head_dim]."""
        return row_shape(self.metadata["architecture"])

    @property
    def refs_per_shard(self) -> int:
        return self.metadata["refs_per_shard"]

    # ---------------------------------------------------------------- writing
    def process_range(self, process_index: int, process_count: int) -> tuple[int, int]:
        """The [start, stop) of refs that writer `process_index` of `process_count` owns: whole shards."""
        shards = -(-self.num_refs // self.refs_per_shard)
        lo, hi = (process_index * shards // process_count, (process_index + 1) * shards // process_count)
        return min(lo * self.refs_per_shard, self.num_refs), min(hi * self.refs_per_shard, self.num_refs)

    def write(self, start: int, kv, positions, tokens) -> None:
        """Stores refs [start, start + n) and marks them written once durable.

        kv: [n, mem_layers, 2, kv_heads, k, head_dim] float (numpy or jax; encoded by the codec);
        positions: [n, mem_layers, kv_heads, k] int; tokens: [n, ≤ ref_len] int, −1-padded to ref_len here.
        """
        n = kv.shape[0]
        stop = start + n
        if not 0 <= start <= stop <= self.num_refs:
            raise IndexError(f"memory bank {self.path}: write of refs [{start}, {stop}) outside [0, {self.num_refs})")
        expect = {"kv": (n, *self.row_shape), "positions": (n, *self._arrays["positions"].shape[1:])}
        got = {"kv": tuple(kv.shape), "positions": tuple(np.shape(positions))}
        for name in expect:
            if got[name] != expect[name]:
                raise ValueError(f"memory bank {self.path}: {name} has shape {got[name]}, expected {expect[name]}")
        tokens = np.asarray(tokens)
        ref_len = self.metadata["ref_len"]
        if tokens.ndim != 2 or tokens.shape[0] != n or tokens.shape[1] > ref_len:
            raise ValueError(f"memory bank {self.path}: tokens has shape {tokens.shape}, expected ({n}, ≤{ref_len})")
        if not bool(jnp.isfinite(kv).all() if isinstance(kv, jax.Array) else np.isfinite(kv).all()):
            raise ValueError(f"memory bank {self.path}: refs [{start}, {stop}) have non-finite key/values")
        rows = {name: np.asarray(x) for name, x in self.codec.encode(kv).items()}
        rows["positions"] = np.asarray(positions, np.int32)
        rows["tokens"] = np.pad(tokens.astype(np.int32), ((0, 0), (0, ref_len - tokens.shape[1])),
                                constant_values=-1)
        rows["token_digest"] = token_digests(rows["tokens"])
        self._cache.drop(start, stop)
        futures = [self._arrays[name][start:stop].write(x) for name, x in rows.items()]
        for f in futures:
            f.result()
        self._arrays["written"][start:stop].write(np.ones(n, np.uint8)).result()

    def unwritten_ranges(self, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
        """The maximal [a, b) runs of unwritten refs within [start, stop) (default: the whole bank). A damaged flag
        (not 0 or 1) or `written` chunk (unreadable) counts as unwritten, with a warning naming the rows."""
        stop = self.num_refs if stop is None else stop
        flags = self._written(start, stop)
        edges = np.flatnonzero(np.diff(np.concatenate([[True], flags, [True]]).astype(np.int8)))
        return [(start + int(a), start + int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]

    def _written(self, start: int, stop: int) -> np.ndarray:
        """The flags of rows [start, stop) as bools; damaged ones (`unwritten_ranges`) read as unwritten."""
        written = self._arrays["written"]
        try:
            return self._flags(written[start:stop].read().result(), start)
        except ValueError as e:
            if _status(e) not in _DAMAGE_CODES:
                raise
        flags = np.zeros(stop - start, bool)
        shard = self.refs_per_shard
        for a in range(start - start % shard, stop, shard):
            lo, hi = max(a, start), min(a + shard, stop)
            try:
                flags[lo - start:hi - start] = self._flags(written[lo:hi].read().result(), lo)
            except ValueError as e:
                if _status(e) not in _DAMAGE_CODES:
                    raise
                logging.warning("memory bank %s: the written flags of references [%d, %d) are damaged (%s): they "
                                "count as unwritten", self.path, lo, hi, _clean(e))
        return flags

    def _flags(self, values: np.ndarray, start: int, ids: np.ndarray | None = None) -> np.ndarray:
        """Stored flags as bools: 1 = written; any value but 0 and 1 is damage, logged, and reads as unwritten."""
        bad = np.flatnonzero(values > 1)
        if bad.size:
            rows = (start + bad) if ids is None else ids[bad]
            logging.warning("memory bank %s: the written flags of %s are damaged (neither 0 nor 1): they count as "
                            "unwritten", self.path, _ids_text(rows))
        return values == 1

    def verify(self, start: int = 0, stop: int | None = None, *, shards_per_read: int = 4) -> np.ndarray:
        """The written rows of [start, stop) whose stored bytes are damaged or missing: sorted int64 ids.

        Reads every array of every written row (TensorStore checks each chunk's crc32c), `shards_per_read` shards
        at a time; the cost of reading those rows once. A resumed writer runs it on its slice and writes the rows
        it returns again. Rows under a damaged `written` chunk count as unwritten (`unwritten_ranges`), not here.
        """
        stop = self.num_refs if stop is None else stop
        if not 0 <= start <= stop <= self.num_refs:
            raise IndexError(f"memory bank {self.path}: verify of refs [{start}, {stop}) outside [0, {self.num_refs})")
        flags = self._written(start, stop)
        names = [name for name in self._arrays if name != "written"]
        step = self.refs_per_shard * max(1, shards_per_read)
        damaged: list[int] = []
        for a in range(start - start % step, stop, step):
            rows = np.flatnonzero(flags[max(a, start) - start:min(a + step, stop) - start]) + max(a, start)
            if not rows.size:
                continue
            futures = {name: self._arrays[name][rows].read() for name in names}
            for name, future in futures.items():
                try:
                    future.result()
                except ValueError as e:
                    if _status(e) not in _DAMAGE_CODES:
                        raise
                    damaged += self._failing_rows(name, rows)[0]
        return np.unique(np.asarray(damaged, np.int64))

    # ---------------------------------------------------------------- reading
    def _failing_rows(self, name: str, ids: np.ndarray) -> tuple[list[int], Exception | None]:
        """Which of rows `ids` of array `name` fail to read, and the first error: row by row in a sharded array,
        one row per chunk (of a shard's rows) in `written` and `token_digest`."""
        ids = np.unique(ids)
        per_chunk = not self._arrays[name].shape[1:]
        chunk = ids // self.refs_per_shard
        probe = ids[np.concatenate([[True], chunk[1:] != chunk[:-1]])] if per_chunk else ids
        futures = [(int(i), self._arrays[name][int(i)].read()) for i in probe]
        bad, first = [], None
        for i, future in futures:
            try:
                future.result()
            except ValueError as e:
                bad.append(i)
                first = first or e
        if per_chunk:
            bad = ids[np.isin(chunk, np.asarray(bad, np.int64) // self.refs_per_shard)].tolist()
        return bad, first

    def _results(self, futures: Mapping[str, Any], ids: np.ndarray) -> dict[str, np.ndarray]:
        """The results of reads of rows `ids` (a future per array). A read that fails on damaged or missing bytes
        is a BankCorruptionError naming the bank, the array, the rows at fault (read again one by one) and the
        file; another failure is an error naming the bank, the array and the rows."""
        out = {}
        for name, future in futures.items():
            try:
                out[name] = future.result()
            except ValueError as e:
                if _status(e) not in _DAMAGE_CODES:
                    raise ValueError(f"memory bank {self.path}: reading array {name!r} of {_ids_text(np.unique(ids))} "
                                     f"failed: {_clean(e)}") from e
                bad, first = self._failing_rows(name, ids)
                bad, first = (bad, first) if bad else (np.unique(ids).tolist(), e)
                raise BankCorruptionError(
                    f"memory bank {self.path}: array {name!r}, {_ids_text(bad)}: the stored bytes are damaged or "
                    f"missing ({_clean(first)}); tools/write_memory.py rerun with the bank's arguments writes "
                    "damaged rows again") from e
        return out

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"memory bank ids must be integers, got {ids.dtype}")
        bad = ids[(ids < -1) | (ids >= self.num_refs)]
        if bad.size:
            raise IndexError(f"memory bank {self.path}: reference id {int(bad[0])} outside [0, {self.num_refs}) "
                             "(-1 = an empty slot)")
        return ids

    def gather_codes(self, ids) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The stored form of the memories `ids` (any shape; -1 = empty): ({name: [*ids.shape, ...]}, positions).

        An empty slot has zero codes (decoding to zeros) and positions -1. A row that is not written is an error.
        """
        ids = self._check_ids(ids)
        flat = ids.reshape(-1)
        valid = np.flatnonzero(flat >= 0)
        uniq, first, inverse = np.unique(flat[valid], return_index=True, return_inverse=True)
        first = valid[first]  # the slot where each distinct id first appears: every row is copied there once
        out = {name: np.empty((flat.size, *self._arrays[name].shape[1:]), self._arrays[name].dtype.numpy_dtype)
               for name in self._gathered}
        miss = self._cache.take(uniq, out, first)
        missing = uniq[miss]
        if missing.size:
            flags = self._arrays["written"][missing].read()
            futures = {name: self._arrays[name][missing].read() for name in self._gathered}
            written = self._flags(self._results({"written": flags}, missing)["written"], 0, missing)
            if not written.all():
                raise ValueError(f"memory bank {self.path}: reference {int(missing[np.argmin(written)])} is not "
                                 f"written ({int((written == 0).sum())} of the {missing.size} rows read are not)")
            fetched = self._results(futures, missing)
            for name, x in fetched.items():
                out[name][first[miss]] = x
            self._cache.put(missing, fetched)
        source = first[inverse]
        repeat = source != valid
        empty = np.ones(flat.size, bool)
        empty[valid] = False
        for name, x in out.items():
            x[valid[repeat]] = x[source[repeat]]
            x[empty] = _FILL.get(name, 0)
        out = {name: x.reshape(*ids.shape, *x.shape[1:]) for name, x in out.items()}
        positions = out.pop("positions")
        return out, positions

    def gather(self, ids, dtype=jnp.bfloat16) -> tuple[jax.Array, np.ndarray]:
        """The memories `ids` (any shape; -1 = empty), decoded on the default device.

        Returns kv [*ids.shape, mem_layers, 2, kv_heads, k, head_dim] in `dtype` and positions
        [*ids.shape, mem_layers, kv_heads, k] int32 (-1 = padding key or empty slot).
        """
        codes, positions = self.gather_codes(ids)
        return _decode(codes, self.codec, jnp.dtype(dtype)), positions

    def read_tokens(self, ids) -> np.ndarray:
        """The token ids of references `ids` (any shape): [*ids.shape, ref_len] int32, -1 padded.

        -1 ids and unwritten rows read as all -1; damaged rows are a BankCorruptionError.
        """
        ids = self._check_ids(ids)
        flat = ids.reshape(-1)
        out = np.full((flat.size, self.metadata["ref_len"]), -1, np.int32)
        want = np.flatnonzero(flat >= 0)
        if want.size:
            written = self._results({"written": self._arrays["written"][flat[want]].read()}, flat[want])["written"]
            rows = want[self._flags(written, 0, flat[want])]
            if rows.size:
                out[rows] = self._results({"tokens": self._arrays["tokens"][flat[rows]].read()}, flat[rows])["tokens"]
        return out.reshape(*ids.shape, -1)

    def read_token_digests(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """`token_digest` of rows [start, stop): [n] uint64 (see `token_digests`). Every row must be written."""
        stop = self.num_refs if stop is None else stop
        unwritten = sum(b - a for a, b in self.unwritten_ranges(start, stop))
        if unwritten:
            raise ValueError(f"memory bank {self.path}: {unwritten:,} of the references [{start:,}, {stop:,}) are "
                             "unwritten")
        digests = self._arrays["token_digest"]
        return self._results({"token_digest": digests[start:stop].read()}, np.arange(start, stop))["token_digest"]

    def cache_info(self) -> dict[str, int]:
        """LRU counters: a hit or miss is counted per distinct id of a gather."""
        c = self._cache
        return {"hits": c.hits, "misses": c.misses, "rows": len(c.slots), "capacity": c.capacity}


def _version() -> str:
    try:
        return importlib.metadata.version("m3jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
