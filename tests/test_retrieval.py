"""Retrieval for training data: chunks and slots (against naive loops), provenance, the bank's index, tools/retrieve.py,
and the per_chunk layout from retrieval to the model.

The expensive pieces are built once per session on the knowledge split (conftest.memory_kb, kb_retrieval): the index
(tools/build_index.py, MiniLM, brute force) and the train split's retrieval (tools/retrieve.py). The stored ids are
checked against a naive retrieval: the rules of docs/retrieval.md applied chunk by chunk with the embedder, the
index and the overlap filter called directly.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, RETRIEVE_BLOCK_RECORDS, run_tool

from m3jax.config import base_config
from m3jax.memory import layout as layout_lib
from m3jax.retrieval.overlap import overlap, overlaps
from m3jax.retrieval.retrieve import ChunkRetriever, Provenance, RetrievalSettings, RetrievedIds, retrieve_split

CHUNK = 8
PER_CHUNK_REFS = 3  # references per chunk of the per_chunk layout's retrieval
PAPER_READS = 5  # documented: a chunk reads "its own reference and those of the previous 4 chunks of its document"


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


def naive_groups(seg, num_groups, chunk=CHUNK):
    """Token by token: a new chunk at every segment start and every `chunk` tokens into a segment."""
    group, g, pos = np.full(len(seg), -1), -1, 0
    for t, s in enumerate(seg):
        if s == 0:
            continue
        pos = 0 if t == 0 or seg[t - 1] != s else pos + 1
        if pos % chunk == 0:
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
    """Per group, the set of references it reads, from the layout's definition (paper: `slots` chunks, own first)."""
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
    """slot_index with the default config's slots (memory.per_chunk) equals the layouts' definitions, the paper's
    window being the documented one (own + previous 4); the busiest groups read as many references as a group can
    hold."""
    slots = base_config().memory.per_chunk
    rng = np.random.default_rng(1)
    cases = [(np.arange(7 * r).reshape(7, r), np.ones(7, np.int64))]  # one document, every reference distinct
    for _ in range(40):
        num_groups = int(rng.integers(1, 12))
        cases.append((rng.integers(-1, 6, (num_groups, r)),  # few ids: many repeats
                      np.sort(rng.integers(0, 3, num_groups))))
    most = 0
    for refs, group_segment in cases:
        num_groups = len(refs)
        unique, index = layout_lib.slot_index(refs, group_segment, layout, slots=slots)
        assert unique.shape == (num_groups * r,) and index.shape == (num_groups, slots)
        real = unique[unique >= 0]
        assert np.all(np.diff(real) > 0) and np.all(unique[real.size:] == -1)
        for g, want in enumerate(naive_slots(refs, group_segment, layout, PAPER_READS)):
            got = unique[index[g][index[g] >= 0]]
            assert sorted(got.tolist()) == sorted(want)  # each once: a list equal to the set
            most = max(most, len(want))
        if layout == "paper":  # own reference first
            own = (refs[:, 0] >= 0) & (group_segment > 0)
            np.testing.assert_array_equal(unique[index[own, 0]], refs[own, 0])
    assert most == (PAPER_READS if layout == "paper" else r)


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


def test_provenance_needs_the_banks_references_of_the_datas_corpus(memory_kb, tmp_path):
    """provenance_for: the filter of the bank's references when they are the data's corpus; a corpus that changed
    since preparation, or data that records no corpus digest, is refused; --knowledge='' is None, and its warning
    says whether the bank holds the data's own text. (tools/retrieve.py's refusals: test_bad_inputs_are_named.)"""
    import json

    from m3jax.data.corpus import load_corpus
    from m3jax.data.prepare import corpus_sha256
    from m3jax.data.records import read_metadata
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.memory.writer import read_record
    from m3jax.retrieval.retrieve import provenance_for

    kb, refs = memory_kb["knowledge"], memory_kb["refs"]
    meta, record = read_metadata(memory_kb["data"]), read_record(memory_kb["bank"])
    assert meta["corpus_sha256"] == record["corpus_sha256"] == refs.corpus_sha256 == corpus_sha256(load_corpus(kb))
    lines = open(kb).read().splitlines()
    (tmp_path / "elsewhere.jsonl").write_text("\n".join(lines))  # the same texts under other doc_ids
    (tmp_path / "edited.jsonl").write_text("\n".join([json.dumps({"text": "Another text."}), *lines[1:]]))
    (tmp_path / "swapped.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]))
    assert corpus_sha256(load_corpus(str(tmp_path / "elsewhere.jsonl"))) == meta["corpus_sha256"]
    for other in ("edited", "swapped"):
        assert corpus_sha256(load_corpus(str(tmp_path / f"{other}.jsonl"))) != meta["corpus_sha256"]

    logged = []
    kw = dict(tokenizer=Tokenizer(memory_kb["tokenizer"]), ref_len=refs.ref_len, data_dir=memory_kb["data"],
              bank_path=memory_kb["bank"], log=logged.append)
    got = provenance_for(kb, data_meta=meta, bank_record=record, **kw)
    want = Provenance.of(refs)
    for field in ("doc", "start", "length"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert logged[-1].startswith(f"provenance filter: knowledge base {kb!r} (the corpus")
    with pytest.raises(ValueError, match=r"is the bank's but not the corpus .*its files changed since\): corpus "
                                         rf"sha256 {meta['corpus_sha256'][:12]}… vs 0000"):
        provenance_for(kb, data_meta={**meta, "corpus_sha256": "0" * 64}, bank_record=record, **kw)
    old_data = {k: v for k, v in meta.items() if k != "corpus_sha256"}
    with pytest.raises(ValueError, match="metadata.json has no corpus_sha256 .*prepare the data again"):
        provenance_for(kb, data_meta=old_data, bank_record=record, **kw)

    for bank_corpus, says in ((meta["corpus_sha256"], "was written from the data's own corpus"),
                              ("f" * 64, "is not the data's corpus"), (None, "is not recorded")):
        assert provenance_for("", data_meta=meta, bank_record={**record, "corpus_sha256": bank_corpus}, **kw) is None
        assert logged[-1].startswith("WARNING: --knowledge='': NO PROVENANCE FILTER") and says in logged[-1]
    assert provenance_for("", data_meta=old_data, bank_record=record, **kw) is None  # '' needs no corpus digest
    assert "is not recorded" in logged[-1]


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


@pytest.fixture(scope="module")
def retrieval_parts(memory_kb, kb_retrieval):
    """What tools/retrieve.py retrieved with, opened here: the tokenizer, the embedder (`embed` caches vectors by text,
    so the naive retrieval and the library's runs below embed each chunk once), the index, the bank, and the train
    split's records."""
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.retrieval.build import open_bank
    from m3jax.retrieval.embedder import Embedder
    from m3jax.retrieval.index import Index

    tokenizer = Tokenizer(memory_kb["tokenizer"])
    embedder = Embedder.from_config(memory_kb["config"].retrieval)
    vectors = {}

    def embed(texts):
        new = [t for t in dict.fromkeys(texts) if t not in vectors]
        vectors.update(zip(new, embedder.embed(new), strict=True))
        return np.asarray([vectors[t] for t in texts], np.float32).reshape(len(texts), embedder.dim)

    return {"tokenizer": tokenizer, "embedder": embedder, "embed": embed,
            "index": Index.load(kb_retrieval["index"], expect_embedder=embedder.identity),
            "bank": open_bank(memory_kb["bank"], tokenizer), "records": train_records(memory_kb)}


def readme_group_cap(seq_len, chunk_size):
    """The groups (chunks with a place for references) of a row, documented: "A row has at most ceil(L/64) × 1.25
    chunks"."""
    return math.ceil(math.ceil(seq_len / chunk_size) * 1.25)


def naive_retrieval(memory_kb, parts, refs_per_chunk):
    """The train split's ids [records, G, R] by the documented rules, one chunk at a time, and what the rules did.

    Chunk g of a record (naive_groups: a new chunk every chunk_size tokens of a document piece) has ids only when
    g < G, the documented cap; it searches only with at least min_chunk_tokens tokens, with its decoded text. Its
    `candidates` neighbours are walked best first, skipping the references cut from the record's own text
    (source_references) and those whose eq. 6 overlap with the record's tokens exceeds train_max_overlap; the first
    R survivors are its ids, −1 after.
    """
    config = memory_kb["config"]
    r, chunk_size = config.retrieval, config.memory.chunk_size
    recs, tokenizer = parts["records"], parts["tokenizer"]
    n, seq_len = recs["inputs"].shape
    cap = readme_group_cap(seq_len, chunk_size)
    ref_tokens, ref_lengths = memory_kb["refs"].rows(np.arange(len(memory_kb["refs"])))
    stats = {"short_chunks": 0, "rows_at_cap": 0, "best_filtered": 0}
    queries, where = [], []
    for i in range(n):
        group = naive_groups(recs["segment_ids"][i], seq_len, chunk_size)
        sizes = np.bincount(group[group >= 0])
        stats["rows_at_cap"] += sizes.size >= cap
        for g in range(min(sizes.size, cap)):
            if sizes[g] < r.min_chunk_tokens:
                stats["short_chunks"] += 1
            else:
                queries.append(tokenizer.decode(recs["inputs"][i][group == g]))
                where.append((i, g))
    candidates, _ = parts["index"].search(parts["embed"](queries), r.candidates)  # [chunks, candidates], best first
    out = np.full((n, cap, refs_per_chunk), -1, np.int32)
    for (i, g), ranked in zip(where, candidates, strict=True):
        own = source_references(memory_kb, recs["documents"][i], recs["doc_offsets"][i])
        foreign = [c for c in ranked if c >= 0 and c not in own]
        sequence = recs["inputs"][i][recs["segment_ids"][i] > 0]
        over = overlaps([ref_tokens[c, :ref_lengths[c]] for c in foreign], sequence)
        kept = [c for c, o in zip(foreign, over, strict=True) if o <= r.train_max_overlap][:refs_per_chunk]
        out[i, g, :len(kept)] = kept
        stats["best_filtered"] += kept[:1] != [ranked[0]]
    return out, stats


@pytest.fixture(scope="module")
def naive_ids(memory_kb, retrieval_parts):
    """naive_retrieval with 3 references per chunk: its first column is what the paper layout's 1 must be."""
    return naive_retrieval(memory_kb, retrieval_parts, PER_CHUNK_REFS)


def id_differences(ids_of, want):
    """Where the ids of each record (`ids_of(i)` [G, R]) differ from `want` [records, G, R]: shapes, then chunks."""
    out = []
    for i, expected in enumerate(want):
        got = np.asarray(ids_of(i))
        if got.shape != expected.shape:
            out.append(f"record {i}: ids of shape {got.shape}, expected {expected.shape}")
            continue
        out += [f"record {i} chunk {g}: {got[g].tolist()}, naive {expected[g].tolist()}"
                for g in np.flatnonzero((got != expected).any(-1))]
    return out


@pytest.mark.slow
def test_stored_ids_equal_a_naive_retrieval(memory_kb, kb_retrieval, retrieval_parts, naive_ids):
    """tools/retrieve.py's ids are the naive retrieval's: each chunk's best survivor, none for a chunk under
    min_chunk_tokens, a place for as many chunks as the documented cap. The rules are exercised (short chunks, rows at
    the cap, chunks whose best candidate is filtered out), and the comparison catches the library keeping the worst
    survivor, dropping the short-chunk rule, or a cap off by one."""
    want, stats = naive_ids
    want = want[..., :1]
    store = RetrievedIds.open(kb_retrieval["ids"])
    assert store.row_shape == want.shape[1:]  # [the documented cap, 1]
    assert not (diffs := id_differences(store.__getitem__, want)), diffs[:10]
    assert stats["short_chunks"] and stats["rows_at_cap"] and stats["best_filtered"], stats

    parts = retrieval_parts
    settings = RetrievalSettings.from_config(memory_kb["config"])

    def differences(settings=settings, search=parts["index"].search):
        retriever = ChunkRetriever(settings, parts["tokenizer"], parts["embed"], search, parts["bank"].read_tokens,
                                   Provenance.of(memory_kb["refs"]))
        return id_differences(retriever(parts["records"]).__getitem__, want)

    assert not differences()  # the library, as the tool runs it

    def worst_first(queries, k):
        return tuple(x[:, ::-1] for x in parts["index"].search(queries, k))

    plants = {"worst survivor": {"search": worst_first},
              "no short-chunk rule": {"settings": dataclasses.replace(settings, min_tokens=1)},
              "cap + 1": {"settings": dataclasses.replace(settings, num_groups=settings.num_groups + 1)},
              "cap - 1": {"settings": dataclasses.replace(settings, num_groups=settings.num_groups - 1)}}
    for name, plant in plants.items():
        assert differences(**plant), f"the naive comparison misses a retriever with {name}"


def per_chunk_config(memory_kb, ids_path):
    """memory_kb's config reading `ids_path` in the per_chunk layout, PER_CHUNK_REFS references per chunk, bank mode."""
    from m3jax.config import validate

    config = memory_kb["config"].copy_and_resolve_references()
    config.data.update(path=memory_kb["data"], global_batch_size=4)
    config.retrieval.update(layout="per_chunk", refs_per_chunk=PER_CHUNK_REFS, ids_path=ids_path, mode="bank")
    validate(config)
    return config


@pytest.fixture(scope="module")
def per_chunk_ids(memory_kb, retrieval_parts, tmp_path_factory):
    """The train split retrieved for the per_chunk layout by the library as tools/retrieve.py runs it (ChunkRetriever,
    retrieve_split into a RetrievedIds store), with the tool's embedder, index and bank."""
    from m3jax.memory.writer import read_record

    parts = retrieval_parts
    settings = RetrievalSettings.from_config(per_chunk_config(memory_kb, ""))
    directory = tmp_path_factory.mktemp("per_chunk") / "retrieval-train"
    store = RetrievedIds.create(directory, {
        "num_records": len(parts["records"]["inputs"]), "block_records": RETRIEVE_BLOCK_RECORDS,
        "seq_len": parts["records"]["inputs"].shape[1], "num_refs": parts["bank"].num_refs,
        "references_sha256": read_record(memory_kb["bank"])["references_sha256"],
        **{k: getattr(settings, k) for k in ("chunk_size", "num_groups", "refs_per_chunk")}})
    retriever = ChunkRetriever(settings, parts["tokenizer"], parts["embed"], parts["index"].search,
                               parts["bank"].read_tokens, Provenance.of(memory_kb["refs"]))
    retrieve_split(store, memory_kb["data"], "train", retriever, log=lambda _: None)
    return RetrievedIds.open(directory)


def test_per_chunk_layout_from_retrieval_to_the_model(memory_kb, retrieval_parts, naive_ids, per_chunk_ids):
    """retrieval.layout = per_chunk with 3 references per chunk, end to end: the retrieval equals the naive one (the
    best 3 survivors, best first); in the config's memory loader each chunk's slots read its own references, each
    once, and nothing else (documented: "In `per_chunk` layout it reads its own `refs_per_chunk`"); the model runs on
    the batch's memories (device_memory)."""
    import jax
    import jax.numpy as jnp

    from m3jax.memory_pipeline import device_memory, memory_iterator
    from m3jax.model import params as params_lib
    from m3jax.model.config import ModelConfig
    from m3jax.model.params import init_params

    want, _ = naive_ids
    assert not (diffs := id_differences(per_chunk_ids.__getitem__, want)), diffs[:10]
    assert (want >= 0).all(-1).sum() > 0.8 * (want[..., 0] >= 0).sum()  # most searched chunks keep 3

    config = per_chunk_config(memory_kb, str(per_chunk_ids.directory))
    bank, sink = retrieval_parts["bank"], memory_kb["sink"]
    batch = next(memory_iterator(config, "train", bank, len(sink)))
    slots, chunk_size = config.memory.per_chunk, config.memory.chunk_size
    assert slots > PER_CHUNK_REFS  # room for the paper layout's reads of earlier chunks: none may appear
    for row, record in enumerate(batch["record"]):
        ids = per_chunk_ids[record]  # [G, R]
        group = naive_groups(batch["segment_ids"][row], len(ids), chunk_size)
        np.testing.assert_array_equal(batch["memory_group"][row], group, err_msg=f"record {record}")
        index = batch["memory_index"][row]  # [G, S]
        assert index.shape == (len(ids), slots)
        for g, (own, slot) in enumerate(zip(ids, index, strict=True)):
            read = batch["memory_ids"][row][slot[slot >= 0]].tolist()
            assert sorted(read) == sorted(own[own >= 0].tolist()), (record, g, read, own)  # each once, no other

    cfg = ModelConfig.from_config(config.model, config.memory)
    memory = device_memory(batch, bank.metadata["codec"], sink, jnp.float32)
    logits = jax.jit(lambda params, memory: params_lib.model_from(cfg, params)(
        batch["inputs"], batch["positions"], batch["segment_ids"], batch["memory_group"], memory))(
        init_params(cfg, seed=0), memory)
    assert logits.shape[:2] == batch["inputs"].shape and np.isfinite(np.asarray(logits)).all()


def test_recall_of_the_source_reference(memory_kb, retrieval_parts):
    """A 64-token piece of a reference finds that reference in its top 5, far more often than random queries."""
    refs, embedder, index = memory_kb["refs"], retrieval_parts["embedder"], retrieval_parts["index"]
    tokens, lengths = refs.rows(np.arange(len(refs)))
    full = np.flatnonzero(lengths == refs.ref_len)
    rng = np.random.default_rng(0)
    ids = rng.choice(full, min(100, full.size), replace=False)
    starts = rng.integers(0, refs.ref_len - 64 + 1, ids.size)
    texts = [retrieval_parts["tokenizer"].decode(tokens[r, s:s + 64]) for r, s in zip(ids, starts, strict=True)]
    assert index.num_vectors == len(refs)
    found, _ = index.search(embedder.embed(texts), 5)
    recall = np.mean([r in row for r, row in zip(ids, found, strict=True)])
    noise = rng.normal(size=(ids.size, embedder.dim)).astype(np.float32)
    random_found, _ = index.search(noise / np.linalg.norm(noise, axis=1, keepdims=True), 5)
    baseline = np.mean([r in row for r, row in zip(ids, random_found, strict=True)])
    print(f"recall@5 {recall:.3f} vs random queries {baseline:.3f} ({len(refs)} references)")
    assert recall >= 0.8 and baseline < 0.1 and recall > 5 * max(baseline, 1 / len(refs))


def test_index_holds_the_embedded_reference_texts(memory_kb, kb_retrieval, retrieval_parts):
    """tools/build_index.py's vectors are the embedder's vectors of the references' texts (decoded here from the
    knowledge base's tokens, not the bank's), and the index finds each reference first by its own vector."""
    from m3jax.retrieval.build import VectorBlocks, vectors_dir

    refs = memory_kb["refs"]
    sample = np.arange(0, len(refs), 10)
    tokens, lengths = refs.rows(sample)
    want = retrieval_parts["embedder"].embed([retrieval_parts["tokenizer"].decode(t[:n])
                                              for t, n in zip(tokens, lengths, strict=True)])
    stored = VectorBlocks.open(vectors_dir(kb_retrieval["index"])).read_all()
    assert stored.shape == (len(refs), want.shape[1])
    np.testing.assert_allclose(stored[sample], want, atol=1e-5)
    found, scores = retrieval_parts["index"].search(want, 1)
    np.testing.assert_array_equal(found[:, 0], sample)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


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


@pytest.mark.slow
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


def test_retrieve_refuses_a_provenance_of_other_texts(memory_kb, lm_data, tmp_path):
    """tools/retrieve.py refuses a --knowledge that is not the bank's, and the bank's when it is not the corpus of
    --data (lm_data: the embedded corpus), naming both sides' digests; nothing is written."""
    from m3jax.data.records import read_metadata
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.memory.knowledge import load_references
    from m3jax.memory.writer import read_record

    docs = [json.loads(line) for line in open(memory_kb["knowledge"]).read().splitlines()]
    edited = tmp_path / "edited.jsonl"  # the first document's text replaced: as many documents, other references
    docs[0]["text"] = docs[1]["text"]
    edited.write_text("".join(json.dumps(d) + "\n" for d in docs))
    ours = load_references(str(edited), Tokenizer(memory_kb["tokenizer"]), memory_kb["refs"].ref_len).sha256()
    theirs = read_record(memory_kb["bank"])["references_sha256"]
    args = ("--config=tests/lm_test_config.py", f"--bank={memory_kb['bank']}", f"--out={tmp_path / 'ids'}")
    runs = {
        f"--knowledge={edited}": (memory_kb["data"], [
            f"knowledge base {str(edited)!r} is not the one the bank {memory_kb['bank']} was written from",
            f"its references have sha256 {ours[:12]}…, the bank's writer record {theirs[:12]}…", "--knowledge=''"]),
        f"--knowledge={memory_kb['knowledge']}": (lm_data, [
            f"is the bank's but not the corpus {lm_data} was prepared from ('embedded'): corpus sha256 "
            f"{memory_kb['refs'].corpus_sha256[:12]}… vs {read_metadata(lm_data)['corpus_sha256'][:12]}…",
            "--knowledge=''"])}
    for knowledge, (data, parts) in runs.items():
        out = run_tool(memory_kb["root"], "retrieve", *args, f"--data={data}", knowledge)
        assert out.returncode == 1, out.stderr[-3000:]
        for part in parts:
            assert part in out.stderr, (part, out.stderr[-3000:])
    assert not (tmp_path / "ids").exists()


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
