"""The ScaNN index over a bank's reference embeddings: which references a chunk of text reads.

Each reference is embedded into an L2-normalised float32 vector, so cosine similarity is a dot product and the
index is a maximum-inner-product search. Two kinds (`retrieval.index` in the config):
- `brute_force`: exact, every query scores every reference (ScaNN keeps the float32 vectors);
- `tree_ah`: a spherical k-means tree of `num_leaves` partitions, of which `leaves_to_search` are scanned per query with
  4-bit anisotropic asymmetric hashing (`ah_dims_per_block` dimensions per code), then the best `reorder`
  candidates are rescored exactly. Approximate: recall against brute force is measured
  (tests/test_index.py, tools/bench/search_latency.py), never assumed. Tree training is not seeded, so two builds
  of the same vectors can return different neighbours.
`auto` is brute force up to `brute_force_max` references and tree_ah above.

Saved in a directory (local or a `gs://` URL; by default `BANK/index`, `INDEX_DIR`):

    index.json   format version, resolved settings, n, dim, the embedder's identity, the sha256 of the vectors
                 the index was built from, the bank it embedded (`bank`: m3jax.retrieval.build.bank_binding, or
                 null for vectors of no bank), and the size and sha256 of every ScaNN file (checked on load, so a
                 damaged file is an error rather than silently wrong neighbours)
    scann_*, *.npy, *.pb   ScaNN's own assets, saved with relative paths (the directory can be moved)

A local save writes into a hidden temporary directory beside the target and renames it into place, so a crash never
leaves a directory that loads as a half index. In a bucket the index is the one retrieval artifact staged through
local disk, because ScaNN serializes to and loads from a local directory only: a save serializes into a local
temporary directory and uploads each file, index.json last (it lists every file's sha256: objects without it are an
incomplete index, with it a whole one; `Index.save` says what a reader sees while one is replaced), and a load
downloads the files into a local temporary directory, checks each against index.json (an error names the object),
loads them and removes the directory. Opening the index with another embedder than the one that built
it is an `IndexMismatchError`: its neighbours would be meaningless; so is opening it for a bank whose texts
differ from those it embedded (`expect_bank`), or with a damaged index.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath
from scann.scann_ops.py import scann_ops_pybind

from m3jax.paths import is_url

INDEX_DIR = "index"  # the index's directory under a bank root
INDEX_JSON = "index.json"
FORMAT = 1
_FORMAT_NAME = "m3jax.retrieval.index"
# Embeddings are normalised in float32; a norm further than this from 1 is a bug upstream, not rounding.
NORM_TOLERANCE = 1e-3
# tree_ah trains its k-means tree on a sample of at most this many vectors, and its AH codebooks (16 centres per
# block of 2 dimensions: far fewer parameters) on a smaller one; a larger AH sample did not change recall.
TREE_SAMPLE_MAX = 250_000
AH_SAMPLE_MAX = 50_000
# A 4-bit AH code has 16 centres per block, trained on the vectors: fewer vectors than that cannot train one.
_AH_CENTRES = 16
# leaves_to_search = 0 searches this fraction of the leaves (at least MIN_LEAVES_TO_SEARCH). Recall@5 against brute
# force on `synthetic_embeddings` (tools/bench/search_latency.py), a tenth / a fifth of sqrt(n) leaves searched:
# 0.97 / 0.99 at n = 1e5 and at 1e6 (two runs each); a fifth takes ~1.5x the search time of a tenth, and batched
# searches at 1e6 stay 8-17x faster than brute force. A fifth, for margin: synthetic data only approximate real ones.
SEARCH_FRACTION = 0.2
MIN_LEAVES_TO_SEARCH = 8
_PARALLEL_BATCH = 256  # scann_ops_pybind.ScannSearcher.search_batched_parallel's default batch_size
# Anisotropic quantisation weighs the error parallel to a vector more (it is what moves inner products): ScaNN's
# recommended threshold for unit-norm maximum-inner-product search.
_AH_ANISOTROPIC_THRESHOLD = 0.2
_COPY_CHUNK = 16 << 20  # bytes per read when an index file is uploaded or downloaded


INDEX_KINDS = ("auto", "brute_force", "tree_ah")


class IndexMismatchError(ValueError):
    """The index was built from another embedder's vectors, or another bank's texts, than the reader's."""


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """How to index n vectors; `resolve(n)` turns the zeros ("pick for n") and `auto` into concrete values."""

    kind: str = "auto"
    brute_force_max: int = 100_000
    num_leaves: int = 0  # 0 = round(sqrt(n))
    leaves_to_search: int = 0  # 0 = SEARCH_FRACTION of num_leaves, at least MIN_LEAVES_TO_SEARCH
    ah_dims_per_block: int = 2
    reorder: int = 100

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"IndexSettings.kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        for name in ("brute_force_max", "num_leaves", "leaves_to_search"):
            if getattr(self, name) < 0:
                raise ValueError(f"IndexSettings.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("ah_dims_per_block", "reorder"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexSettings.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, retrieval) -> IndexSettings:
        """From the config's `retrieval` section."""
        return cls(kind=retrieval.index, brute_force_max=retrieval.brute_force_max, num_leaves=retrieval.num_leaves,
                   leaves_to_search=retrieval.leaves_to_search, ah_dims_per_block=retrieval.ah_dims_per_block,
                   reorder=retrieval.reorder)

    def resolve(self, n: int) -> dict[str, Any]:
        """Concrete settings for n vectors: {"kind": "brute_force"} or {"kind": "tree_ah", num_leaves,
        leaves_to_search, ah_dims_per_block, reorder, tree_sample, ah_sample} (the samples: training set sizes)."""
        if n < 1:
            raise ValueError(f"an index needs at least one vector, got n={n}")
        kind = self.kind
        if kind == "auto":
            kind = "brute_force" if n <= self.brute_force_max else "tree_ah"
        if kind == "brute_force":
            return {"kind": kind}
        if n < _AH_CENTRES:
            raise ValueError(f"tree_ah needs at least {_AH_CENTRES} vectors to train its 4-bit codebooks, got {n}: "
                             "use brute_force")
        num_leaves = self.num_leaves or max(1, round(math.sqrt(n)))
        if num_leaves > n:
            raise ValueError(f"num_leaves={num_leaves} is more than the {n} vectors")
        leaves_to_search = self.leaves_to_search or max(MIN_LEAVES_TO_SEARCH, round(SEARCH_FRACTION * num_leaves))
        leaves_to_search = min(leaves_to_search, num_leaves)
        return {"kind": kind, "num_leaves": num_leaves, "leaves_to_search": leaves_to_search,
                "ah_dims_per_block": self.ah_dims_per_block, "reorder": self.reorder,
                "tree_sample": min(n, TREE_SAMPLE_MAX), "ah_sample": min(n, AH_SAMPLE_MAX)}


def _json_ready(value: Mapping) -> dict[str, Any]:
    """`value` as it reads back from JSON (tuples become lists), so saved and expected identities compare equal."""
    return json.loads(json.dumps(dict(value), sort_keys=True))


def _file_digest(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_vectors(vectors: np.ndarray) -> np.ndarray:
    """The vectors as a C-contiguous float32 [n, d] array; an error names the first row that is not unit-norm."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise ValueError(f"vectors must be a float array [n, d], got {vectors.dtype} {vectors.shape}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= NORM_TOLERANCE))  # NaN/inf norms are bad too
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"vectors must be L2-normalised (|norm - 1| <= {NORM_TOLERANCE}): row {row} has norm "
                         f"{norms[row]} ({bad.size} of {len(vectors)} rows are off)")
    return vectors


def synthetic_embeddings(rng: np.random.Generator, n: int, num_queries: int,
                         dim: int = 384) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors shaped like real reference embeddings, to measure recall and latency on: vectors
    [n, dim] and queries [num_queries, dim], float32.

    A hierarchy of topics (every level splits a cluster into ~8, down to documents of ~5 references) in a randomly
    rotated space whose variance decays as a power law, plus a shared mean direction (sentence embeddings are
    anisotropic). A flat mixture (unrelated topics) would be the worst case for a tree, whose leaves then mix
    unrelated topics; real topics nest. Calibrated on all-MiniLM-L6-v2 embeddings of CPython's docs cut into
    128-token references (5,043 of them; synthetic in brackets): norm of the mean vector 0.38 (0.37), median pair
    cosine 0.14 (0.14), mean cosine to the 1st / 5th / 50th nearest neighbour 0.74 / 0.62 / 0.45 (0.71 / 0.57 /
    0.37), variance in the top 50 principal directions 62% (56%); tree_ah recall@5 with 67 leaves, a tenth or a
    fifth searched: 0.93 / 0.97 (0.92 / 0.96), so the synthetic data are slightly harder than the real.
    Half the queries are noisy copies of indexed vectors (a chunk that overlaps a reference), half are fresh draws
    from the same documents (held-out text on the same subjects).
    """
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    scale = (1.0 + np.arange(dim, dtype=np.float32)) ** -0.375
    scale /= np.linalg.norm(scale)

    def noise(rows: int) -> np.ndarray:  # unit expected norm, power-law spectrum, random directions
        return (rng.standard_normal((rows, dim), dtype=np.float32) * scale) @ basis.T

    def normalised(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    total = n + num_queries - num_queries // 2
    sizes = [5]  # references per cluster, finest (documents) first
    while sizes[-1] * 8 < total:
        sizes.append(sizes[-1] * 8)
    centres = np.zeros((1, dim), np.float32)
    for size in reversed(sizes):  # the coarser levels share one unit of variance; documents have one
        weight = 1.0 if size == sizes[0] else math.sqrt(1 / (len(sizes) - 1))
        count = max(1, total // size)
        centres = centres[rng.integers(len(centres), size=count)] + weight * noise(count)
    x = (centres[rng.integers(len(centres), size=total)] + noise(total)) / math.sqrt(3)
    mean_weight = 0.1
    mean = normalised(rng.standard_normal((1, dim), dtype=np.float32))
    x = normalised(mean_weight * mean + math.sqrt(1 - mean_weight**2) * x)
    vectors, fresh = x[:n], x[n:]
    copies = normalised(vectors[rng.integers(n, size=num_queries // 2)] + 0.5 * noise(num_queries // 2))
    return vectors, np.concatenate([copies, fresh]).astype(np.float32)


class Index:
    """A ScaNN searcher over n unit vectors, with what built it.

    Attributes: num_vectors, dim, settings (resolved, with max_k), embedder (the identity dict), vectors_sha256,
    bank (what the vectors embedded: `m3jax.retrieval.build.bank_binding`, or None).
    """

    def __init__(self, searcher: scann_ops_pybind.ScannSearcher, *, num_vectors: int, dim: int,
                 settings: Mapping[str, Any], embedder: Mapping, vectors_sha256: str, bank: Mapping | None = None):
        self._searcher = searcher
        self.num_vectors, self.dim = num_vectors, dim
        self.settings, self.embedder = dict(settings), _json_ready(embedder)
        self.vectors_sha256 = vectors_sha256
        self.bank = None if bank is None else _json_ready(bank)

    @classmethod
    def build(cls, vectors: np.ndarray, settings: IndexSettings, *, embedder: Mapping, max_k: int = 64,
              bank: Mapping | None = None) -> Index:
        """Index vectors [n, d] (float32, unit norm; row i gets id i) for searches of up to `max_k` neighbours.
        `bank`: what the vectors embedded (`bank_binding`), recorded for `load(expect_bank=...)`."""
        vectors = _check_vectors(vectors)
        n, dim = vectors.shape
        if embedder.get("dim", dim) != dim:
            raise ValueError(f"the vectors have dim {dim} but the embedder's identity says dim={embedder['dim']}")
        if max_k < 1:
            raise ValueError(f"max_k must be positive, got {max_k}")
        resolved = settings.resolve(n) | {"max_k": max_k}
        builder = scann_ops_pybind.builder(vectors, max_k, "dot_product")
        if resolved["kind"] == "brute_force":
            builder = builder.score_brute_force()
        else:  # spherical k-means (unit centres, dot-product assignment) suits unit vectors: at a tenth of the
            # leaves searched, recall@5 rose from 0.92 to 0.93 on real embeddings and from 0.78 to 0.87 on a flat
            # mixture of 1e5, at the same cost
            builder = (builder
                       .tree(num_leaves=resolved["num_leaves"], num_leaves_to_search=resolved["leaves_to_search"],
                             training_sample_size=resolved["tree_sample"], spherical=True)
                       .score_ah(resolved["ah_dims_per_block"], training_sample_size=resolved["ah_sample"],
                                 anisotropic_quantization_threshold=_AH_ANISOTROPIC_THRESHOLD)
                       .reorder(max(resolved["reorder"], max_k)))
        return cls(builder.build(), num_vectors=n, dim=dim, settings=resolved, embedder=embedder,
                   vectors_sha256=hashlib.sha256(vectors.data).hexdigest(), bank=bank)

    def search(self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None,
               reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best references of each query [q, d]: ids [q, k] int64 and scores (dot products) [q, k] float32,
        best first. Where fewer than k are found (k > n, or tree_ah's searched leaves hold fewer), the row is
        padded with id -1 and score -inf. `leaves_to_search` and `reorder` override the index's settings for
        this search (tree_ah only: trading recall for speed without a rebuild)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [q, {self.dim}], got {queries.shape}")
        if not 1 <= k <= self.settings["max_k"]:
            raise ValueError(f"k must be in [1, max_k={self.settings['max_k']}] (the index was built for "
                             f"max_k={self.settings['max_k']}), got {k}")
        bad = np.flatnonzero(~np.isfinite(queries).all(axis=1))
        if bad.size:
            raise ValueError(f"query row {int(bad[0])} is not finite ({bad.size} of {len(queries)} rows are not)")
        ids = np.full((len(queries), k), -1, np.int64)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        if not len(queries):
            return ids, scores
        found = min(k, self.num_vectors)
        at_query_time = {}
        if self.settings["kind"] == "tree_ah":
            leaves = min(leaves_to_search or self.settings["leaves_to_search"], self.settings["num_leaves"])
            at_query_time = {"leaves_to_search": leaves,
                             "pre_reorder_num_neighbors": max(reorder or self.settings["reorder"], found)}
        # ScaNN's parallel search hands batches of this many queries to its threads: for one batch, its overhead
        # only (3x slower on one query).
        search = (self._searcher.search_batched_parallel if len(queries) > _PARALLEL_BATCH
                  else self._searcher.search_batched)
        got_ids, got_scores = search(queries, final_num_neighbors=found, **at_query_time)
        valid = ~np.isnan(got_scores)  # ScaNN fills the slots it found nothing for with NaN
        ids[:, :found] = np.where(valid, got_ids, -1)
        scores[:, :found] = np.where(valid, got_scores, -np.inf)
        return ids, scores

    def save(self, directory: str | os.PathLike) -> None:
        """Write the index to `directory`, a local directory (atomically) or a `gs://` URL (`_upload`); an existing
        index there is replaced (any other non-empty directory is an error)."""
        if is_url(directory):
            self._upload(epath.Path(directory))
            return
        directory = os.path.abspath(os.fspath(directory))
        replaceable = os.path.isdir(directory) and (not os.listdir(directory)
                                                    or os.path.isfile(os.path.join(directory, INDEX_JSON)))
        if os.path.exists(directory) and not replaceable:
            raise FileExistsError(f"{directory} exists and is not an index (no {INDEX_JSON}): not replacing it")
        parent, name = os.path.split(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            for f in self._serialize(tmp):
                _fsync(os.path.join(tmp, f))
            _fsync(tmp)
            if os.path.exists(directory):  # swap: the old index is moved aside whole, then removed
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.rename(directory, os.path.join(old, name))
                os.rename(tmp, directory)
                shutil.rmtree(old)
            else:
                os.rename(tmp, directory)
            _fsync(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _serialize(self, directory: str) -> list[str]:
        """ScaNN's files and index.json, written into the empty local `directory`; their names, index.json last."""
        self._searcher.serialize(directory, relative_path=True)
        files = {f: _file_digest(os.path.join(directory, f)) for f in sorted(os.listdir(directory))}
        meta = {"format": _FORMAT_NAME, "version": FORMAT, "num_vectors": self.num_vectors, "dim": self.dim,
                "settings": self.settings, "embedder": self.embedder, "vectors_sha256": self.vectors_sha256,
                "bank": self.bank, "files": files}
        with open(os.path.join(directory, INDEX_JSON), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        return [*files, INDEX_JSON]

    def _upload(self, directory: epath.Path) -> None:
        """`save` to a bucket, which has no renames: the files are serialized into a local temporary directory and
        uploaded over the old index's (each object is visible only whole), index.json last; then the old index's
        objects the new one lacks are deleted. A reader meanwhile finds the old index.json and some of its files
        replaced, which `load` refuses (each file is checked against index.json: an error naming the object), never
        a mix that loads; after the new index.json, the new index. A save stopped before its index.json leaves
        objects that do not load (without an index.json, or not those it lists); saving again there replaces them
        (objects without an index.json only when they are files the new index has: an index of the same kind)."""
        with tempfile.TemporaryDirectory(prefix="m3jax-index-") as tmp:
            names = self._serialize(tmp)
            existing = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
            stopped = existing and existing <= set(names)  # a save of this kind stopped before its index.json
            if directory.exists() and INDEX_JSON not in existing and not stopped:
                raise FileExistsError(f"{directory} exists and is not an index (no {INDEX_JSON}): not replacing it")
            for name in names:
                with open(os.path.join(tmp, name), "rb") as src, (directory / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, _COPY_CHUNK)
        for name in sorted(existing - set(names)):
            (directory / name).unlink()

    @classmethod
    def load(cls, directory: str | os.PathLike, *, expect_embedder: Mapping | None = None,
             expect_bank: Mapping | None = None) -> Index:
        """Open a saved index. With `expect_embedder`, an index built by another embedder is an
        `IndexMismatchError` naming the fields that differ; with `expect_bank` (`bank_binding` of the bank it is
        used with), so is an index that embedded other texts (or recorded no bank)."""
        url = is_url(directory)
        directory = epath.Path(directory)
        meta_path = directory / INDEX_JSON
        if not directory.is_dir():
            raise FileNotFoundError(f"no index at {directory}: the directory does not exist")
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: {directory} is not a saved index")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != _FORMAT_NAME or meta.get("version") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, "
                                 f"expected {_FORMAT_NAME!r} version {FORMAT}")
            num_vectors, dim, settings = int(meta["num_vectors"]), int(meta["dim"]), dict(meta["settings"])
            embedder, vectors_sha256, files = dict(meta["embedder"]), str(meta["vectors_sha256"]), dict(meta["files"])
            bank = None if meta.get("bank") is None else dict(meta["bank"])
            if any(os.path.basename(name) != name or name in ("", ".", "..") for name in files):
                raise ValueError(f"files must be plain file names, got {sorted(files)}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{meta_path} is not a valid index description: {e}") from e
        if expect_embedder is not None:
            expected = _json_ready(expect_embedder)
            diff = [f"{key}: index {embedder.get(key)!r}, expected {expected.get(key)!r}"
                    for key in sorted(embedder.keys() | expected.keys()) if embedder.get(key) != expected.get(key)]
            if diff:
                raise IndexMismatchError(f"the index at {directory} was built by another embedder: " + "; ".join(diff))
        if expect_bank is not None:
            expected = _json_ready(expect_bank)
            if bank is None:
                raise IndexMismatchError(f"the index at {directory} records no bank: rebuild it with "
                                         "tools/build_index.py")
            diff = [f"{key}: index {bank.get(key)!r}, bank {expected.get(key)!r}"
                    for key in sorted(bank.keys() | expected.keys()) if bank.get(key) != expected.get(key)]
            if diff:
                raise IndexMismatchError(f"the index at {directory} embedded other texts than the bank holds: "
                                         + "; ".join(diff) + "; rebuild it with tools/build_index.py (it embeds "
                                         "again only the blocks whose references changed)")
        # ScaNN loads from a local directory: an index in a bucket is downloaded into a temporary one
        with tempfile.TemporaryDirectory(prefix="m3jax-index-") if url else contextlib.nullcontext(
                os.fspath(directory)) as local:
            for name, digest in files.items():
                path = directory / name
                if not path.is_file():
                    raise ValueError(f"index file {path} is missing")
                if url:
                    with path.open("rb") as src, open(os.path.join(local, name), "wb") as dst:
                        shutil.copyfileobj(src, dst, _COPY_CHUNK)
                if _file_digest(os.path.join(local, name)) != digest:
                    raise ValueError(f"index file {path} is damaged: its size or sha256 differs from {meta_path}")
            try:
                searcher = scann_ops_pybind.load_searcher(local)
            except RuntimeError as e:
                raise ValueError(f"ScaNN could not load the index at {directory}: {e}") from e
        return cls(searcher, num_vectors=num_vectors, dim=dim, settings=settings, embedder=embedder,
                   vectors_sha256=vectors_sha256, bank=bank)
