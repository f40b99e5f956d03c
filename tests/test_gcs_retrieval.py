"""Retrieval's artifacts on gs:// paths (tests/gcs_fixtures.py: a local GCS server): vector blocks, the ScaNN index
and retrieved ids in a bucket are what they are on local disk, byte for byte; a rerun there finishes only what is
missing; a damaged object is an error naming its gs:// URL."""

import hashlib
import io
import tempfile

import numpy as np
import pytest
from conftest import RETRIEVE_BLOCK_RECORDS, assert_index_file_damage_is_named, run_tool
from etils import epath
from test_index import EMBEDDER, unit_vectors

from m3jax.retrieval.blocks import Blocks, create_meta, read_meta
from m3jax.retrieval.build import VectorBlocks, vectors_dir
from m3jax.retrieval.index import INDEX_JSON, Index, IndexSettings
from m3jax.retrieval.retrieve import RetrievedIds

pytest_plugins = ("gcs_fixtures",)  # the `gcs` fixture: a gs:// base on a local GCS server


def _files(directory: epath.Path):
    """Every file under `directory` (epath's walk() drops the gs:// of the directories it yields)."""
    for path in directory.iterdir():
        yield from _files(path) if path.is_dir() else [path]


def _digests(directory, skip=()) -> dict[str, str]:
    """sha256 of every file or object under `directory` by its relative name, top-level entries `skip` left out."""
    root = epath.Path(directory)
    return {str(p)[len(str(root)) + 1:]: hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(root)
            if str(p)[len(str(root)) + 1:].split("/")[0] not in skip}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_blocks_in_a_bucket_equal_local_ones_resume_and_name_damage(gcs, tmp_path):
    """Blocks with records and their metadata written to a bucket and to a local directory: the same objects as
    files (no temporary ones), the same rows read back; the missing blocks are what a rerun writes; equal metadata
    is reused, other metadata and a damaged block are errors naming the gs:// object."""
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    stores = {}
    for where in (str(tmp_path / "blocks"), f"{gcs}/blocks"):
        create_meta(epath.Path(where) / "meta.json", {"rows": 10}, what="other rows", remedy="start again")
        blocks = Blocks(where, num_rows=10, block_rows=4, row_shape=(3,), dtype=np.float32, records=True)
        for i in (0, 2):  # a job stopped before block 1
            blocks.write_block(i, rows[slice(*blocks.block_range(i))], {"block": i})
        assert blocks.missing_blocks() == [1] and blocks.process_blocks(1, 2) == [1]
        stores[where] = blocks
    local, bucket = stores.values()
    assert str(bucket.block_path(1)) == f"{gcs}/blocks/block-000001.npy"
    assert _digests(bucket.directory) == _digests(local.directory)
    assert sorted(_digests(bucket.directory)) == ["block-000000.json", "block-000000.npy", "block-000002.json",
                                                  "block-000002.npy", "meta.json"]
    bucket.write_block(1, rows[4:8])
    assert bucket.missing_blocks() == []
    np.testing.assert_array_equal(np.concatenate([bucket.read_block(i, mmap=True) for i in range(3)]), rows)

    meta = bucket.directory / "meta.json"
    assert create_meta(meta, {"rows": 10}, what="other rows", remedy="start again") == {"rows": 10}
    with pytest.raises(ValueError, match=f"{meta} holds other rows \\(rows: stored 10, now 11\\)"):
        create_meta(meta, {"rows": 11}, what="other rows", remedy="start again")
    with pytest.raises(FileNotFoundError, match=f"{gcs}/blocks/missing.json is missing: write one"):
        read_meta(bucket.directory / "missing.json", missing_hint="write one")
    bucket.block_path(2).write_bytes(_npy(rows[8:] + 1))  # other bytes of the right shape
    with pytest.raises(ValueError, match=f"{gcs}/blocks/block-000002.npy is damaged: its sha256 differs"):
        bucket.read_block(2)
    bucket.block_path(2).unlink()
    assert bucket.missing_blocks() == [2]


def test_index_in_a_bucket_equals_the_local_one_and_is_checked(gcs, tmp_path, monkeypatch):
    """An index saved to a bucket: the local save's files as objects, index.json among them; it loads (through a
    local temporary directory, removed) to the same neighbours; a save replaces an index there (the old one's other
    objects deleted) and nothing else; a missing or damaged object is an error naming its gs:// URL."""
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    rng = np.random.default_rng(0)
    vectors, queries = unit_vectors(rng, 500), unit_vectors(rng, 16)
    brute = Index.build(vectors, IndexSettings(kind="brute_force"), embedder=EMBEDDER)
    tree = Index.build(vectors, IndexSettings(kind="tree_ah", num_leaves=8), embedder=EMBEDDER)
    url = f"{gcs}/bank/index"
    for kind, index in (("brute_force", brute), ("tree_ah", tree)):
        index.save(tmp_path / kind)
        index.save(url)  # the second save replaces the first
        files = _digests(tmp_path / kind)
        assert _digests(url) == files and INDEX_JSON in files
        loaded = Index.load(url, expect_embedder=EMBEDDER)
        assert loaded.settings == index.settings and list(staging.iterdir()) == []
        for got, want in zip(loaded.search(queries, 5), index.search(queries, 5), strict=True):
            np.testing.assert_array_equal(got, want)

    bank = epath.Path(f"{gcs}/bank")
    (bank / "zarr.json").write_text("{}")
    with pytest.raises(FileExistsError, match=f"{bank} exists and is not an index"):
        brute.save(bank)
    assert sorted(p.name for p in bank.iterdir()) == ["index", "zarr.json"]

    index_json = epath.Path(url) / INDEX_JSON
    meta = index_json.read_text()
    index_json.unlink()  # as a save stopped before its index.json leaves it
    with pytest.raises(FileNotFoundError, match=f"{index_json} is missing: {url} is not a saved index"):
        Index.load(url)
    tree.save(url)
    assert index_json.read_text() == meta

    data = epath.Path(url) / "hashed_dataset.npy"
    assert_index_file_damage_is_named(
        data, lambda: Index.load(url), f"index file {data} is damaged: its size or sha256 differs from {index_json}")
    assert list(staging.iterdir()) == []
    with pytest.raises(FileNotFoundError, match=f"no index at {gcs}/elsewhere"):
        Index.load(f"{gcs}/elsewhere")


@pytest.mark.slow
def test_index_and_ids_in_a_bucket_equal_the_local_ones_and_resume(memory_kb, kb_retrieval, gcs):
    """tools/build_index.py and tools/retrieve.py with the bank, its index (the default, BANK/index) and the ids in
    a bucket: the same vector blocks, index files and ids as the local run (kb_retrieval), byte for byte. Blocks of
    ids deleted there (a run stopped midway) are all a rerun retrieves, to the same ids, which read back (as the
    memory pipeline reads them) as the local ones; a damaged vector block there is named."""
    bank, index, ids = f"{gcs}/bank", f"{gcs}/bank/index", f"{gcs}/ids"
    local_index = kb_retrieval["index"]
    skip = {"index", vectors_dir("index")}  # kb_retrieval's, in the local bank's directory
    for path in _files(epath.Path(memory_kb["bank"])):
        relative = str(path)[len(memory_kb["bank"]) + 1:]
        if relative.split("/")[0] not in skip:
            (epath.Path(bank) / relative).write_bytes(path.read_bytes())
    built = run_tool(memory_kb["root"], "build_index", "--config=tests/lm_test_config.py", f"--bank={bank}",
                     f"--tokenizer={memory_kb['tokenizer']}", "--block_refs=64")
    assert built.returncode == 0, built.stderr[-3000:]
    assert _digests(vectors_dir(index)) == _digests(vectors_dir(local_index))
    assert _digests(index) == _digests(local_index)

    args = ["--config=tests/lm_test_config.py", f"--data={memory_kb['data']}", f"--bank={bank}", f"--out={ids}",
            f"--block_records={RETRIEVE_BLOCK_RECORDS}"]
    retrieved = run_tool(memory_kb["root"], "retrieve", *args)
    assert retrieved.returncode == 0, retrieved.stderr[-3000:]
    want = _digests(kb_retrieval["ids"], skip={"retrieval.json"})
    assert _digests(ids, skip={"retrieval.json"}) == want and len(want) > 4
    store = RetrievedIds.open(ids)
    for block in (1, 4):  # a run stopped before these
        store.block_path(block).unlink()
    again = run_tool(memory_kb["root"], "retrieve", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(2 blocks)" in again.stdout and "complete" in again.stdout
    assert _digests(ids, skip={"retrieval.json"}) == want

    store, local = RetrievedIds.open(ids, expect={"seq_len": 256}), RetrievedIds.open(kb_retrieval["ids"])
    for record in range(0, local.num_records, 5):
        np.testing.assert_array_equal(store[record], local[record])

    vectors = VectorBlocks.open(vectors_dir(index))
    vectors.block_path(0).write_bytes(vectors.block_path(1).read_bytes())
    with pytest.raises(ValueError, match=f"{vectors_dir(index)}/block-000000.npy is damaged"):
        vectors.read_all()
