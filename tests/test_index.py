"""The reference index: brute force is exact, tree_ah's recall at the default settings, `auto`, and the saved
directory (round trip, relocation, atomic replacement, embedder identity, damaged or missing files)."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from conftest import assert_index_file_damage_is_named

from m3jax.config import base_config
from m3jax.retrieval import index as index_module
from m3jax.retrieval.index import (
    INDEX_JSON,
    MIN_LEAVES_TO_SEARCH,
    SEARCH_FRACTION,
    Index,
    IndexMismatchError,
    IndexSettings,
    synthetic_embeddings,
)

DIM = 32
EMBEDDER = {"name": "test-embedder", "model_type": "bert", "pooling": "mean", "dim": DIM, "max_len": 128,
            "weights_sha256": "a" * 64, "tokenizer_sha256": "b" * 64}


def unit_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The naive reference: every dot product, sorted."""
    scores = queries @ vectors.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, axis=1)


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([np.isin(e, i).mean() for i, e in zip(ids, exact, strict=True)]))


@pytest.fixture(scope="module")
def small():
    """2,000 random unit vectors, 64 queries, a brute-force and a tree_ah index over them."""
    rng = np.random.default_rng(0)
    vectors, queries = unit_vectors(rng, 2000), unit_vectors(rng, 64)
    return {"vectors": vectors, "queries": queries,
            "brute_force": Index.build(vectors, IndexSettings(kind="brute_force"), embedder=EMBEDDER),
            "tree_ah": Index.build(vectors, IndexSettings(kind="tree_ah"), embedder=EMBEDDER)}


def test_brute_force_equals_exact_top_k(small):
    index, vectors, queries = small["brute_force"], small["vectors"], small["queries"]
    ids, scores = index.search(queries, 10)
    want_ids, want_scores = exact_top_k(vectors, queries, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == scores.shape == (64, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_tree_ah_recall_at_default_settings():
    defaults = IndexSettings.from_config(base_config().retrieval)
    vectors, queries = synthetic_embeddings(np.random.default_rng(0), 30_000, 1000)
    index = Index.build(vectors, dataclasses.replace(defaults, kind="tree_ah"), embedder={"name": "synthetic"})
    ids, scores = index.search(queries, 5)
    exact, _ = exact_top_k(vectors, queries, 5)
    got = recall(ids, exact)
    print(f"tree_ah recall@5 {got:.4f} at {index.settings}")
    assert got >= 0.96  # the requirement is 0.95; ~0.985 is typical (the tree is not seeded)
    found = ids >= 0
    np.testing.assert_allclose(scores[found], np.sum(queries[:, None] * vectors[ids], -1)[found], atol=1e-5)


def test_resolve_and_auto(small):
    s = IndexSettings(brute_force_max=1000)
    assert s.resolve(1000) == {"kind": "brute_force"}
    tree = s.resolve(40_000)
    assert tree["kind"] == "tree_ah" and tree["num_leaves"] == 200
    assert tree["leaves_to_search"] == round(200 * SEARCH_FRACTION)
    assert IndexSettings(kind="tree_ah").resolve(40_000) == tree
    assert IndexSettings(kind="tree_ah").resolve(100)["leaves_to_search"] == MIN_LEAVES_TO_SEARCH
    assert IndexSettings(kind="tree_ah", num_leaves=50, leaves_to_search=80).resolve(1000)["leaves_to_search"] == 50
    index = Index.build(small["vectors"], IndexSettings(brute_force_max=1999), embedder=EMBEDDER)
    assert index.settings["kind"] == "tree_ah" and index.num_vectors == 2000 and index.dim == DIM
    index = Index.build(small["vectors"], IndexSettings(brute_force_max=2000), embedder=EMBEDDER)
    assert index.settings["kind"] == "brute_force"
    r = base_config().retrieval
    assert IndexSettings.from_config(r) == IndexSettings(kind=r.index, brute_force_max=r.brute_force_max,
                                                         num_leaves=r.num_leaves, reorder=r.reorder,
                                                         leaves_to_search=r.leaves_to_search,
                                                         ah_dims_per_block=r.ah_dims_per_block)
    with pytest.raises(ValueError, match="kind"):
        IndexSettings(kind="hnsw")
    with pytest.raises(ValueError, match="at least 16"):
        IndexSettings(kind="tree_ah").resolve(10)


@pytest.mark.parametrize("kind", ["brute_force", "tree_ah"])
def test_save_load_round_trip_relocatable(small, kind, tmp_path):
    index, queries = small[kind], small["queries"]
    index.save(tmp_path / "bank" / "index")
    assert sorted(os.listdir(tmp_path / "bank")) == ["index"]  # no temporary directory left behind
    shutil.move(tmp_path / "bank", tmp_path / "moved")
    loaded = Index.load(tmp_path / "moved" / "index", expect_embedder=EMBEDDER)
    for name in ("num_vectors", "dim", "settings", "embedder", "vectors_sha256"):
        assert getattr(loaded, name) == getattr(index, name), name
    want, got = index.search(queries, 7), loaded.search(queries, 7)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_save_replaces_an_index_and_nothing_else(small, tmp_path):
    target = tmp_path / "index"
    small["tree_ah"].save(target)
    small["brute_force"].save(target)
    assert Index.load(target).settings["kind"] == "brute_force"
    assert sorted(os.listdir(tmp_path)) == ["index"]
    other = tmp_path / "bank"
    other.mkdir()
    (other / "zarr.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not an index"):
        small["brute_force"].save(other)
    assert os.listdir(other) == ["zarr.json"]
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(FileExistsError, match="not an index"):
        small["brute_force"].save(tmp_path / "file")


def test_failed_save_leaves_no_half_index(small, tmp_path, monkeypatch):
    target = tmp_path / "index"
    small["brute_force"].save(target)

    def crash(path):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "_fsync", crash)  # after ScaNN's files and index.json are written
    for path in (target, tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            small["tree_ah"].save(path)
    assert sorted(os.listdir(tmp_path)) == ["index"]  # the old index, no new one, no temporary directory
    assert Index.load(target).settings["kind"] == "brute_force"


def test_embedder_mismatch(small, tmp_path):
    small["brute_force"].save(tmp_path / "index")
    Index.load(tmp_path / "index", expect_embedder=dict(EMBEDDER))
    other = {**EMBEDDER, "weights_sha256": "c" * 64, "pooling": "cls"}
    with pytest.raises(IndexMismatchError, match="pooling: index 'mean', expected 'cls'.*weights_sha256"):
        Index.load(tmp_path / "index", expect_embedder=other)
    with pytest.raises(IndexMismatchError, match="max_len"):
        Index.load(tmp_path / "index", expect_embedder={k: v for k, v in EMBEDDER.items() if k != "max_len"})


def test_missing_and_damaged(small, tmp_path):
    path = tmp_path / "index"
    with pytest.raises(FileNotFoundError, match=str(path)):
        Index.load(path)
    small["tree_ah"].save(path)
    meta = (path / INDEX_JSON).read_text()

    (path / INDEX_JSON).unlink()
    with pytest.raises(FileNotFoundError, match=f"{path / INDEX_JSON} is missing"):
        Index.load(path)
    (path / INDEX_JSON).write_text(meta[: len(meta) // 2])
    with pytest.raises(ValueError, match=f"{path / INDEX_JSON} is not a valid index description"):
        Index.load(path)
    (path / INDEX_JSON).write_text(json.dumps({**json.loads(meta), "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        Index.load(path)

    (path / INDEX_JSON).write_text(meta)
    data = path / "hashed_dataset.npy"
    assert_index_file_damage_is_named(data, lambda: Index.load(path), f"{data} is damaged")


def test_padding_and_empty_queries():
    rng = np.random.default_rng(1)
    vectors = unit_vectors(rng, 3)
    index = Index.build(vectors, IndexSettings(), embedder=EMBEDDER, max_k=8)
    ids, scores = index.search(vectors, 5)
    np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])
    assert np.all(ids[:, 3:] == -1) and np.all(scores[:, 3:] == -np.inf)
    assert np.all(ids[:, :3] >= 0) and np.all(np.isfinite(scores[:, :3]))
    ids, scores = index.search(np.zeros((0, DIM), np.float32), 5)
    assert ids.shape == scores.shape == (0, 5) and ids.dtype == np.int64 and scores.dtype == np.float32


def test_bad_inputs():
    rng = np.random.default_rng(2)
    vectors = unit_vectors(rng, 20)
    vectors[7] *= 1.5
    with pytest.raises(ValueError, match="row 7 has norm 1.5"):
        Index.build(vectors, IndexSettings(), embedder=EMBEDDER)
    vectors[7] /= 1.5
    vectors[11, 3] = np.nan
    with pytest.raises(ValueError, match="row 11 has norm nan"):
        Index.build(vectors, IndexSettings(), embedder=EMBEDDER)
    vectors[11] = vectors[10]
    with pytest.raises(ValueError, match="dim=16"):
        Index.build(vectors, IndexSettings(), embedder={**EMBEDDER, "dim": 16})
    index = Index.build(vectors, IndexSettings(), embedder=EMBEDDER, max_k=8)
    with pytest.raises(ValueError, match="max_k=8"):
        index.search(vectors, 9)
    with pytest.raises(ValueError, match=rf"\[q, {DIM}\]"):
        index.search(vectors[:, :16], 3)
    queries = vectors[:4].copy()
    queries[2, 0] = np.inf
    with pytest.raises(ValueError, match="query row 2"):
        index.search(queries, 3)
