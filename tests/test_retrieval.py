"""Retrieval for training data: chunks and slots (against naive loops), provenance, the bank's index, tools/retrieve.py.

The expensive pieces are built once per module on the session's knowledge split (conftest.memory_kb): the index
(tools/build_index.py, MiniLM, brute force) and the train split's retrieval (tools/retrieve.py).
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, RETRIEVE_BLOCK_RECORDS, run_tool

from m3jax.memory import layout as layout_lib
from m3jax.retrieval.overlap import overlap
from m3jax.retrieval.retrieve import Provenance, RetrievedIds

CHUNK = 8


# ------------------------------------------------------------------------------------------------ chunks, slots
def random_segments(rng, length):
    """segment_ids [L] of a packed row: 1, 2, ... per document piece, then 0 padding."""
    seg, s, t = np.zeros(length, np.int32), 0, 0
    end = length - int(rng.integers(0, length // 3 + 1))
    while t < end:
        s += 1
        n = int(rng.choice([1, 2, rng.integers(1, 3 * CHUNK), rng.integers(CHUNK, 5 * CHUNK)]))
        seg[t:min(t + n, end)] = s
        t += n
    return seg


def naive_groups(seg, num_groups):
    """Token by token: a new chunk at every segment start and every CHUNK tokens into a segment."""
    group, g, pos = np.full(len(seg), -1), -1, 0
    for t, s in enumerate(seg):
        if s == 0:
            continue
        pos = 0 if t == 0 or seg[t - 1] != s else pos + 1
        if pos % CHUNK == 0:
            g += 1
        group[t] = g if g < num_groups else -1
    return group


def test_chunk_groups_and_spans_equal_naive():
    rng = np.random.default_rng(0)
    for trial in range(50):
        length = int(rng.integers(1, 120))
        seg = random_segments(rng, length)
        num_groups = layout_lib.max_groups(length, CHUNK) if trial % 3 else 3
        group, lost = layout_lib.chunk_groups(seg, CHUNK, num_groups)
        np.testing.assert_array_equal(group, naive_groups(seg, num_groups))
        assert lost == np.count_nonzero((seg > 0) & (group < 0))
        starts, stops = layout_lib.group_spans(group, num_groups)
        for g in range(num_groups):
            where = np.flatnonzero(group == g)
            assert (starts[g], stops[g]) == ((where[0], where[-1] + 1) if where.size else (0, 0))
            assert stops[g] - starts[g] <= CHUNK and len(set(seg[where])) <= 1  # never across a document
    batch = np.stack([random_segments(rng, 64) for _ in range(4)])  # a batch is cut row by row
    group, _ = layout_lib.chunk_groups(batch, CHUNK, 10)
    for row, g in zip(batch, group, strict=True):
        np.testing.assert_array_equal(g, naive_groups(row, 10))


def naive_slots(refs, group_segment, layout, slots):
    """Per group, the set of references it reads, from the layout's definition."""
    out = []
    for g in range(len(refs)):
        if group_segment[g] == 0:
            out.append(set())
        elif layout == "paper":
            out.append({refs[h, 0] for h in range(max(0, g - slots + 1), g + 1)
                        if group_segment[h] == group_segment[g] and refs[h, 0] >= 0})
        else:
            out.append({r for r in refs[g] if r >= 0})
    return out


@pytest.mark.parametrize("layout,r", [("paper", 1), ("per_chunk", 3)])
def test_slot_index_reads_each_reference_once(layout, r):
    rng = np.random.default_rng(1)
    for _ in range(40):
        num_groups = int(rng.integers(1, 12))
        refs = rng.integers(-1, 6, (num_groups, r))  # few ids: many repeats
        group_segment = np.sort(rng.integers(0, 3, num_groups))
        unique, index = layout_lib.slot_index(refs, group_segment, layout, slots=5)
        assert unique.shape == (num_groups * r,) and index.shape == (num_groups, 5)
        real = unique[unique >= 0]
        assert np.all(np.diff(real) > 0) and np.all(unique[real.size:] == -1)
        for g, want in enumerate(naive_slots(refs, group_segment, layout, 5)):
            got = unique[index[g][index[g] >= 0]]
            assert sorted(got.tolist()) == sorted(want)  # each once: a list equal to the set
        if layout == "paper":  # own reference first
            own = (refs[:, 0] >= 0) & (group_segment > 0)
            np.testing.assert_array_equal(unique[index[own, 0]], refs[own, 0])


# ------------------------------------------------------------------------------------------------ provenance
def test_provenance_spans_are_the_reference_tokens(memory_kb):
    refs = memory_kb["refs"]
    prov = Provenance.of(refs)
    from m3jax.data.corpus import load_corpus
    from m3jax.data.tokenizer import Tokenizer

    tok = Tokenizer(memory_kb["tokenizer"])
    docs = load_corpus(memory_kb["knowledge"])
    doc_tokens = tok.encode_batch([d.text for d in docs])
    tokens, lengths = refs.rows(np.arange(len(refs)))
    for r in range(len(refs)):
        text = doc_tokens[prov.doc[r]][prov.start[r]:prov.start[r] + prov.length[r]]
        assert text == tokens[r, :lengths[r]].tolist()


# ------------------------------------------------------------------------------------------------ end to end
def train_records(memory_kb):
    from m3jax.data.records import split_source

    source, decode = split_source(memory_kb["data"], "train")
    recs = [decode(i, source[i]) for i in range(len(source))]
    return {f: np.stack([r[f] for r in recs]) for f in recs[0]}


def source_references(memory_kb, documents, doc_offsets):
    """The ids of the references holding the record's tokens, from the cutting rule: document d's references are
    consecutive ids, the first after those of documents < d, each ref_len of its tokens (independent of the code)."""
    refs = memory_kb["refs"]
    ref_len = refs.ref_len
    tok_counts = np.bincount(refs.doc_index, weights=refs.lengths, minlength=len(refs.doc_ids)).astype(int)
    first = np.concatenate([[0], np.cumsum(-(-tok_counts // ref_len))])
    real = (documents >= 0) & (doc_offsets >= 1) & (doc_offsets <= tok_counts[np.maximum(documents, 0)])
    return set((first[documents[real]] + (doc_offsets[real] - 1) // ref_len).tolist())


def test_training_chunks_never_retrieve_their_own_text(memory_kb, kb_retrieval):
    store = RetrievedIds.open(kb_retrieval["ids"])
    recs = train_records(memory_kb)
    assert store.num_records == len(recs["inputs"]) and store.num_blocks > 2
    tokens, lengths = memory_kb["refs"].rows(np.arange(len(memory_kb["refs"])))
    groups, _ = layout_lib.chunk_groups(recs["segment_ids"], 64, store.row_shape[0])
    chunks_with_refs = total_chunks = 0
    for i in range(store.num_records):
        ids = store[i]  # [G, 1]
        own = source_references(memory_kb, recs["documents"][i], recs["doc_offsets"][i])
        chosen = ids[ids >= 0]
        assert not own & set(chosen.tolist()), f"record {i} retrieved its own text"
        for r in np.unique(chosen):
            assert overlap(tokens[r, :lengths[r]], recs["inputs"][i][recs["segment_ids"][i] > 0]) <= 0.9
        used = np.unique(groups[i][groups[i] >= 0])
        assert np.all(ids[np.setdiff1d(np.arange(len(ids)), used)] == -1)  # no group, no reference
        total_chunks += used.size
        chunks_with_refs += int(np.count_nonzero(ids[used, 0] >= 0))
    assert chunks_with_refs > 0.8 * total_chunks, (chunks_with_refs, total_chunks)
    assert "complete" in kb_retrieval["retrieve_stdout"] and "by provenance" in kb_retrieval["retrieve_stdout"]


def test_recall_of_the_source_reference(memory_kb, kb_retrieval):
    """A 64-token piece of a reference finds that reference in its top 5, far more often than random queries."""
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.retrieval.embedder import Embedder
    from m3jax.retrieval.index import Index

    refs = memory_kb["refs"]
    tok = Tokenizer(memory_kb["tokenizer"])
    tokens, lengths = refs.rows(np.arange(len(refs)))
    full = np.flatnonzero(lengths == refs.ref_len)
    rng = np.random.default_rng(0)
    ids = rng.choice(full, min(100, full.size), replace=False)
    starts = rng.integers(0, refs.ref_len - 64 + 1, ids.size)
    texts = [tok.decode(tokens[r, s:s + 64]) for r, s in zip(ids, starts, strict=True)]
    embedder = Embedder.load(memory_kb["config"].retrieval.embedder)
    index = Index.load(kb_retrieval["index"], expect_embedder=embedder.identity)
    assert index.num_vectors == len(refs)
    found, _ = index.search(embedder.embed(texts), 5)
    recall = np.mean([r in row for r, row in zip(ids, found, strict=True)])
    noise = rng.normal(size=(ids.size, embedder.dim)).astype(np.float32)
    random_found, _ = index.search(noise / np.linalg.norm(noise, axis=1, keepdims=True), 5)
    baseline = np.mean([r in row for r, row in zip(ids, random_found, strict=True)])
    print(f"recall@5 {recall:.3f} vs random queries {baseline:.3f} ({len(refs)} references)")
    assert recall >= 0.8 and baseline < 0.1 and recall > 5 * max(baseline, 1 / len(refs))


def test_retrieve_resumes_shards_and_refuses_other_settings(memory_kb, kb_retrieval, tmp_path):
    ids = tmp_path / "ids"
    shutil.copytree(kb_retrieval["ids"], ids)
    blocks = sorted(ids.glob("block-*.npy"))
    want = {b.name: b.read_bytes() for b in blocks}
    for b in blocks[1:5:3]:  # an interrupted run: blocks 1 and 4 never written
        b.unlink()
    args = ["--config=tests/lm_test_config.py", f"--data={memory_kb['data']}", f"--bank={memory_kb['bank']}",
            f"--out={ids}", f"--block_records={RETRIEVE_BLOCK_RECORDS}"]
    again = run_tool(memory_kb["root"], "retrieve", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(2 blocks)" in again.stdout
    assert {b.name: b.read_bytes() for b in sorted(ids.glob("block-*.npy"))} == want
    other = run_tool(memory_kb["root"], "retrieve", *args, "--config.retrieval.candidates=7")
    assert other.returncode != 0 and "holds another retrieval" in other.stderr and "candidates" in other.stderr


def test_two_processes_write_alternate_blocks_equal_to_one(memory_kb, kb_retrieval, tmp_path):
    """tools/retrieve.py as 2 jax.distributed processes finishing blocks 0-3: 0 and 2 by one, 1 and 3 by the other."""
    from conftest import cli_env
    from test_multiprocess import free_port

    ids = tmp_path / "two"
    shutil.copytree(kb_retrieval["ids"], ids)
    for i in range(4):
        os.unlink(ids / f"block-{i:06d}.npy")
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "tools/retrieve.py", "--config=tests/lm_test_config.py", f"--data={memory_kb['data']}",
         f"--bank={memory_kb['bank']}", f"--out={ids}", f"--block_records={RETRIEVE_BLOCK_RECORDS}",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
         f"--config.distributed.process_id={i}"],
        cwd=REPO, env=cli_env(memory_kb["root"], devices=1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    for i, (out, _) in enumerate(outs):
        assert f"process {i} of 2" in out and "(2 blocks)" in out, out
    assert "complete" in outs[0][0]
    one, two = RetrievedIds.open(kb_retrieval["ids"]), RetrievedIds.open(ids)
    for i in range(one.num_records):
        np.testing.assert_array_equal(two[i], one[i])


def test_bad_inputs_are_named(memory_kb, kb_retrieval, tmp_path):
    with pytest.raises(FileNotFoundError, match="retrieval.json"):
        RetrievedIds.open(tmp_path)
    ids = tmp_path / "ids"
    shutil.copytree(kb_retrieval["ids"], ids)
    os.unlink(sorted(ids.glob("block-*.npy"))[2])
    with pytest.raises(FileNotFoundError, match="block-000002.npy"):
        RetrievedIds.open(ids)
    with pytest.raises(ValueError, match="num_records"):
        RetrievedIds.open(kb_retrieval["ids"], expect={"num_records": 3})
    other_kb = run_tool(memory_kb["root"], "retrieve", "--config=tests/lm_test_config.py",
                        f"--data={memory_kb['data']}", f"--bank={memory_kb['bank']}", f"--out={tmp_path / 'o'}",
                        "--knowledge=embedded")
    assert other_kb.returncode != 0 and "was not written from knowledge base 'embedded'" in other_kb.stderr


def test_build_index_embeds_only_missing_blocks(memory_kb, kb_retrieval, tmp_path):
    from m3jax.retrieval.build import vectors_dir
    from m3jax.retrieval.index import Index

    index = tmp_path / "index"
    shutil.copytree(vectors_dir(kb_retrieval["index"]), vectors_dir(str(index)))
    os.unlink(os.path.join(vectors_dir(str(index)), "block-000001.npy"))  # an interrupted build
    args = ["--config=tests/lm_test_config.py", f"--bank={memory_kb['bank']}", f"--tokenizer={memory_kb['tokenizer']}",
            f"--index={index}", "--block_refs=64"]
    again = run_tool(memory_kb["root"], "build_index", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"embedded {min(64, len(memory_kb['refs']) - 64)} references" in again.stdout
    queries = np.random.default_rng(0).normal(size=(16, 384)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids, scores = Index.load(index).search(queries, 10)
    want_ids, want_scores = Index.load(kb_retrieval["index"]).search(queries, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    other = run_tool(memory_kb["root"], "build_index", *args[:-1], "--block_refs=32")
    assert other.returncode != 0 and "vectors of another bank or embedder" in other.stderr
