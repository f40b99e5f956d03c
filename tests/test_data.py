"""The data layer: embedded corpus, tokenizer, packing against a naive reference, ArrayRecord storage, and the
grain pipeline's ordering guarantees (seeded, process-count independent, exactly resumable)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from m3jax.data import corpus, pipeline, prepare, records
from m3jax.data.packing import LM_FIELDS, pack_documents
from m3jax.data.tokenizer import MAX_LINE_BYTES, Tokenizer, split_long_line, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
BOS, EOS = 2, 3


@pytest.fixture(scope="session")
def docs():
    return corpus.embedded_corpus()


@pytest.fixture(scope="session")
def tokenizer_path(docs, tmp_path_factory):
    return train_tokenizer((d.text for d in docs[::10]), str(tmp_path_factory.mktemp("tok") / "spm"), 1000)


# ---------------------------------------------------------------------------------------------------- corpus


def test_embedded_corpus_is_real_and_deterministic(docs):
    ids = [d.doc_id for d in docs]
    assert ids == sorted(set(ids))
    assert len(docs) > 300 and sum(len(d.text) for d in docs) > 1_000_000
    by_id = {d.doc_id: d.text for d in docs}
    assert_text = by_id["pydoc:assert"]
    assert assert_text.startswith('The "assert" statement\n') and "AssertionError" in assert_text
    assert "\njson.dumps:\n" in by_id["stdlib:json"] and "JSON" in by_id["stdlib:json"]
    assert "stdlib:json.decoder" in by_id
    skipped = ("idlelib", "lib2to3", ".test.", ".tests.", "site-packages")
    assert not any(part in doc_id for doc_id in ids for part in skipped)
    # Parsed, never imported: these modules have side effects on import.
    assert "antigravity" not in sys.modules and "this" not in sys.modules and "idlelib" not in sys.modules
    again = corpus.embedded_corpus()
    assert again == docs and again is not docs  # cached, but callers get their own list


def test_embedded_corpus_is_the_same_in_another_process(docs, tmp_path):
    code = (
        "import json, sys; from m3jax.data.corpus import embedded_corpus; "
        "json.dump([[d.doc_id, d.text] for d in embedded_corpus()], open(sys.argv[1], 'w'))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}  # another string-hash salt
    subprocess.run([sys.executable, "-c", code, tmp_path / "corpus.json"], env=env, check=True)
    assert json.loads((tmp_path / "corpus.json").read_text()) == [[d.doc_id, d.text] for d in docs]


def test_load_corpus_files_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n\nsecond paragraph\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one", "id": "doc-a"}\n\n{"text": "two", "id": 7}\n')
    loaded = corpus.load_corpus(f"{tmp_path}/*.txt, {tmp_path}/b.jsonl")
    assert [d.text for d in loaded] == ["first file\n\nsecond paragraph\n", "one", "two"]
    assert loaded[1].doc_id == "doc-a"  # a string "id" names the document wherever the file lives
    assert loaded[2].doc_id == f"{tmp_path}/b.jsonl:3"  # no string id: path and line
    (tmp_path / "dup.jsonl").write_text('{"text": "x", "id": "a"}\n{"text": "y", "id": "a"}\n')
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: id 'a' is already the id of .*dup\.jsonl:1"):
        corpus.read_jsonl([tmp_path / "dup.jsonl"])

    with pytest.raises(FileNotFoundError, match="nothing-here"):
        corpus.load_corpus(f"{tmp_path}/nothing-here*.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        corpus.load_corpus(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nokey.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nokey\.jsonl:1: .*'text'.*\['body'\]"):
        corpus.read_jsonl([tmp_path / "nokey.jsonl"])


# ------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_identity(docs, tokenizer_path, tmp_path):
    tok = Tokenizer(tokenizer_path)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (1000, 0, 2, 3)
    texts = [d.text for d in docs[205:260]] + ["naïve café — 漢字 🙂\n\tindented  double  spaces \n\n"]
    encoded = tok.encode_batch(texts)
    assert encoded == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in encoded] == texts
    assert sum(map(len, encoded)) < sum(map(len, texts)) / 2  # it compresses: merges were learnt

    again = train_tokenizer((d.text for d in docs[::10]), str(tmp_path / "other" / "prefix"), 1000)
    assert Path(again).read_bytes() == Path(tokenizer_path).read_bytes()
    assert Tokenizer(again).sha256 == tok.sha256
    different = train_tokenizer((d.text for d in docs[1::10]), str(tmp_path / "different"), 1000)
    assert Tokenizer(different).sha256 != tok.sha256

    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model is not a SentencePiece model: its bytes do not parse as one"):
        Tokenizer(tmp_path / "junk.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model is empty, not a SentencePiece model"):
        Tokenizer(tmp_path / "empty.model")


def multibyte_text(num_chars, seed=0):
    """Text without spaces of words of 3-byte (CJK) and 4-byte (CJK extension B) characters."""
    rng = np.random.default_rng(seed)
    alphabet = list("漢字仮名交日本語表記体系文書") + [chr(0x20000 + i) for i in range(8)]
    words = ["".join(rng.choice(alphabet, size=rng.integers(2, 5))) for _ in range(40)]
    return "".join(words[i] for i in rng.integers(len(words), size=num_chars))[:num_chars]


def test_split_long_line_keeps_every_character():
    assert MAX_LINE_BYTES == 4192  # SentencePiece's default max_sentence_length
    english = "the quick brown fox jumps " * 800  # 20,800 characters
    pieces = split_long_line(english)
    assert "".join(pieces) == english and len(pieces) == 5
    assert all(len(p.encode()) <= MAX_LINE_BYTES for p in pieces)
    assert all(p.startswith(" ") and not p.endswith(" ") for p in pieces[1:-1])  # cut before a space
    text = multibyte_text(20_000)
    pieces = split_long_line(text)
    assert "".join(pieces) == text
    assert all(MAX_LINE_BYTES - 3 <= len(p.encode()) <= MAX_LINE_BYTES for p in pieces[:-1])  # no space: full
    # 4-byte characters: a piece of exactly the limit, and after a 1-byte character, the cut before the limit
    assert [len(p.encode()) for p in split_long_line("🙂" * 2000)] == [4192, 3808]
    assert [len(p.encode()) for p in split_long_line("a" + "🙂" * 2000)] == [4189, 3812]
    assert split_long_line("short") == ["short"]


def test_tokenizer_trains_on_lines_over_the_sentencepiece_limit(docs, tmp_path, caplog):
    """SentencePiece skips training lines over 4192 bytes without a word: a document that is one 20,000-character
    line (English, or 3- and 4-byte characters) was left out of the vocabulary; now it is trained on in pieces."""
    english = " ".join(" ".join(d.text.split()) for d in docs[100:140])[:20_000]
    multibyte = multibyte_text(20_000)
    texts = [d.text for d in docs[::20]] + [english, "a heading\n" + multibyte + "\n"]
    with caplog.at_level(logging.WARNING, logger="m3jax.data.tokenizer"):
        tok = Tokenizer(train_tokenizer(texts, str(tmp_path / "spm"), 1000))
    assert "2 of " in caplog.text and "lines were longer than SentencePiece's limit of 4192 bytes" in caplog.text
    for text in (english, multibyte):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(multibyte)
    assert min(ids) >= 4 + 256  # each of its characters is a piece (dropped, they would fall back to bytes) ...
    assert len(ids) < len(multibyte) / 2  # ... and its words were merged
    assert len(tok.encode(english)) < len(english) / 2

    rng = np.random.default_rng(1)  # a line of exactly the limit is SentencePiece's own: trained on whole
    limit = "".join(chr(0x20000 + i) for i in rng.integers(16, size=MAX_LINE_BYTES // 4))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m3jax.data.tokenizer"):
        tok = Tokenizer(train_tokenizer([limit], str(tmp_path / "limit"), 300))
    assert caplog.text == "" and min(tok.encode(limit)) >= 4 + 256


def test_tokenizer_training_errors_are_ours(tmp_path):
    prefix = str(tmp_path / "spm")
    for empty in ([], ["", "\n  \n\t\n"]):
        with pytest.raises(ValueError, match="no text to train the tokenizer on: the corpus is empty or all its "
                                             "lines are blank"):
            train_tokenizer(empty, prefix, 300)
    with pytest.raises(ValueError, match=r"vocab_size=5000 is larger than this corpus supports \(at most \d+\): "
                                         "lower --vocab_size"):
        train_tokenizer(["hello world"] * 3, prefix, 5000)
    with pytest.raises(ValueError, match=r"vocab_size=262 is too small for this corpus: .* need at least 271: "
                                         "raise --vocab_size"):
        train_tokenizer(["naïve café 漢字"], prefix, 262)
    with pytest.raises(ValueError, match="vocab_size=-5 is too small: it must be at least 261"):
        train_tokenizer(["hello world"], prefix, -5)

    def unreadable():
        yield "hello world"
        raise OSError("corpus file vanished")

    with pytest.raises(OSError, match="corpus file vanished"):  # the corpus's own error, not SentencePiece's wrapper
        train_tokenizer(unreadable(), prefix, 300)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------- packing


def reference_rows(docs_tokens, seq_len):
    """Token by token, from the definition: row i is stream[i*L : i*L+L+1] of [bos, *doc, eos] pieces."""
    stream, owner, offset = [], [], []
    for d, doc in enumerate(docs_tokens):
        piece = [BOS, *doc, EOS]
        stream += piece
        owner += [d] * len(piece)
        offset += list(range(len(piece)))
    rows, start = [], 0
    while len(stream) - start >= 2:
        row = {name: [-1 if name in ("documents", "doc_offsets") else 0] * seq_len for name in LM_FIELDS}
        segment, position = 0, 0
        for t in range(seq_len):
            i = start + t
            if i >= len(stream):
                break
            if t == 0 or owner[i] != owner[i - 1]:
                segment, position = segment + 1, 0
            row["inputs"][t], row["segment_ids"][t], row["positions"][t] = stream[i], segment, position
            row["documents"][t], row["doc_offsets"][t] = 10 * owner[i] + 3, offset[i]
            position += 1
            if i + 1 < len(stream):
                row["targets"][t] = stream[i + 1]
                row["loss_weights"][t] = int(owner[i + 1] == owner[i])
        rows.append(row)
        start += seq_len
    return rows, stream


@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_packing_matches_reference(seq_len):
    rng = np.random.default_rng(seq_len)
    docs_tokens = [rng.integers(4, 100, size=n).tolist() for n in rng.integers(0, 40, size=25)]
    docs_tokens[3] = []  # an empty document still becomes [bos, eos]
    rows = list(pack_documents(docs_tokens, seq_len, BOS, EOS, doc_numbers=[10 * d + 3 for d in range(25)]))
    expected, stream = reference_rows(docs_tokens, seq_len)
    assert len(rows) == len(expected)
    for row, ref in zip(rows, expected, strict=True):
        for name in LM_FIELDS:
            assert row[name].dtype == np.int32 and row[name].shape == (seq_len,)
            np.testing.assert_array_equal(row[name], ref[name], err_msg=name)

    # Every token is an input exactly once, in order (the final eos only if it has a row of its own).
    inputs = np.concatenate([r["inputs"][r["segment_ids"] > 0] for r in rows]).tolist()
    assert inputs == stream[: len(inputs)] and len(stream) - len(inputs) in (0, 1)
    # Loss is off exactly on the (eos -> next bos) targets and on padding.
    # (Document tokens are >= 4, so a bos target is always cross-document and a 0 target always padding.)
    weights = np.concatenate([r["loss_weights"] for r in rows])
    targets = np.concatenate([r["targets"] for r in rows])
    np.testing.assert_array_equal(weights == 0, (targets == BOS) | (targets == 0))
    assert weights.sum() == len(stream) - 1 - (len(docs_tokens) - 1)
    # Positions restart exactly at the row start and at every document start.
    for row in rows:
        seg = row["segment_ids"]
        real = seg > 0
        segment_starts = np.diff(seg, prepend=0) != 0
        np.testing.assert_array_equal((row["positions"] == 0)[real], segment_starts[real])


def test_packing_drops_a_lone_final_token():
    # Stream [bos, 5, 6, eos, bos, 7, eos] has 7 = 2*3 + 1 tokens: exactly two full rows, nothing left over.
    rows = list(pack_documents([[5, 6], [7]], 3, BOS, EOS))
    assert [r["inputs"].tolist() for r in rows] == [[BOS, 5, 6], [EOS, BOS, 7]]
    assert [r["loss_weights"].tolist() for r in rows] == [[1, 1, 1], [0, 1, 1]]
    padded = list(pack_documents([[5]], 4, BOS, EOS))[0]
    assert padded["inputs"].tolist() == [BOS, 5, EOS, 0] and padded["targets"].tolist() == [5, EOS, 0, 0]
    assert padded["loss_weights"].tolist() == [1, 1, 0, 0] and padded["segment_ids"].tolist() == [1, 1, 1, 0]


# --------------------------------------------------------------------------------------------------- records


def id_records(num_records, seq_len=4):
    """Records whose every field is filled with (a function of) the record's id, so order is readable."""
    for i in range(num_records):
        yield {name: np.full(seq_len, i * (k + 1), dtype=np.int32) for k, name in enumerate(LM_FIELDS)}


def train_only_metadata(num_records, seq_len, num_shards):
    return {
        "format_version": records.FORMAT_VERSION,
        "fields": records.field_specs({name: (seq_len,) for name in LM_FIELDS}),
        "seq_len": seq_len, "vocab_size": 100, "bos_id": BOS, "eos_id": EOS, "pad_id": 0,
        "tokenizer_path": "none", "tokenizer_sha256": "0" * 64,
        "splits": {"train": {"num_records": num_records, "num_tokens": num_records * seq_len,
                             "shards": records.shard_names("train", num_shards)}},
    }  # fmt: skip


def write_id_dataset(data_dir, num_records=50, seq_len=4, num_shards=3):
    records.write_split(id_records(num_records, seq_len), data_dir, "train", num_shards)
    records.write_metadata(data_dir, train_only_metadata(num_records, seq_len, num_shards))
    return str(data_dir)


@pytest.fixture(scope="session")
def id_data(tmp_path_factory):
    return write_id_dataset(tmp_path_factory.mktemp("ids"))


def test_records_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = list(pack_documents([rng.integers(4, 1000, n).tolist() for n in range(0, 300, 7)], 16, BOS, EOS))
    assert records.write_split(iter(rows), tmp_path, "train", 3) == len(rows)
    meta = train_only_metadata(len(rows), 16, 3)
    records.write_metadata(tmp_path, meta)
    assert records.read_metadata(tmp_path) == meta

    source, decode = records.split_source(tmp_path, "train")
    stored = [decode(i, source[i]) for i in range(len(source))]
    round_robin = [rows[k] for shard in range(3) for k in range(shard, len(rows), 3)]
    assert len(stored) == len(round_robin)
    for got, want in zip(stored, round_robin, strict=True):
        assert list(got) == list(LM_FIELDS)
        for name in LM_FIELDS:
            assert got[name].dtype == np.int32
            np.testing.assert_array_equal(got[name], want[name])

    # Metadata declaring other shapes than the shards hold fails, naming a shard.
    meta["fields"] = records.field_specs({name: (17,) for name in LM_FIELDS})
    records.write_metadata(tmp_path, meta)
    with pytest.raises(ValueError, match=r"train-00000-of-00003\.arrayrecord"):
        records.split_source(tmp_path, "train")
    with pytest.raises(ValueError, match="expected int32"):
        records.write_split([{"inputs": np.zeros(3, np.int64)}], tmp_path, "bad", 1)


# -------------------------------------------------------------------------------------------------- pipeline


def ids_of(batch):
    return batch["inputs"][:, 0].tolist()


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_pipeline_seeded_order(id_data):
    def first_ids(seed, shuffle=True):
        it = pipeline.make_lm_iterator(id_data, "train", global_batch_size=10, seed=seed, shuffle=shuffle)
        return [i for b in take(it, 15) for i in ids_of(b)]

    a, b, c = first_ids(0), first_ids(0), first_ids(1)
    assert a == b and a != c
    epochs = [a[k : k + 50] for k in range(0, 150, 50)]
    assert all(sorted(e) == list(range(50)) for e in epochs)  # each epoch is a permutation of the split
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # reshuffled every epoch
    assert epochs[0] != sorted(epochs[0])
    unshuffled = first_ids(0, shuffle=False)[:50]
    assert unshuffled == [i for shard in range(3) for i in range(shard, 50, 3)]  # stored (round-robin) order


def test_pipeline_order_independent_of_process_count(id_data):
    def global_batches(process_count, num_epochs=None, steps=9):
        iters = [
            pipeline.make_lm_iterator(id_data, "train", global_batch_size=8, seed=3, num_epochs=num_epochs,
                                      process_index=p, process_count=process_count)
            for p in range(process_count)
        ]  # fmt: skip
        local = [list(it) if num_epochs else take(it, steps) for it in iters]
        assert len({len(batches) for batches in local}) == 1
        for batches in local:
            assert all(b["inputs"].shape == (8 // process_count, 4) for b in batches)
        return [sum((ids_of(batches[s]) for batches in local), []) for s in range(len(local[0]))]

    reference = global_batches(1)
    assert global_batches(2) == reference and global_batches(4) == reference
    finite = global_batches(1, num_epochs=2)
    assert len(finite) == 100 // 8  # the last, incomplete global batch is dropped
    assert global_batches(2, num_epochs=2) == finite and global_batches(4, num_epochs=2) == finite
    assert finite[:9] == reference  # a finite run is a prefix of the endless one


def test_pipeline_exact_resume(id_data):
    def make():
        return pipeline.make_lm_iterator(id_data, "train", global_batch_size=4, seed=7, process_index=1,
                                         process_count=2)  # fmt: skip

    uninterrupted = [ids_of(b) for b in take(make(), 30)]
    it = make()
    take(it, 11)
    state = it.get_state()
    take(it, 5)  # run past the checkpoint, then restore into a fresh iterator
    resumed = make()
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives JSON (it is checkpointed as such)
    assert [ids_of(b) for b in take(resumed, 19)] == uninterrupted[11:]  # crosses several epoch boundaries


def test_pipeline_worker_processes_keep_the_order(id_data):
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    kwargs = dict(global_batch_size=4, seed=5, process_index=0, process_count=2)
    inline = [ids_of(b) for b in take(pipeline.make_lm_iterator(id_data, "train", **kwargs), 12)]
    it = pipeline.make_lm_iterator(id_data, "train", worker_count=2, **kwargs)
    try:
        assert [ids_of(b) for b in take(it, 12)] == inline
    finally:
        it.close()


def test_eval_batches_are_fixed(id_data):
    full = pipeline.make_eval_batches(id_data, "train", global_batch_size=8, num_batches=3)
    assert [ids_of(b) for b in full] == [ids_of(b) for b in pipeline.make_eval_batches(
        id_data, "train", global_batch_size=8, num_batches=3)]  # fmt: skip
    stored = [i for shard in range(3) for i in range(shard, 50, 3)]
    assert [ids_of(b) for b in full] == [stored[k : k + 8] for k in (0, 8, 16)]
    halves = [
        pipeline.make_eval_batches(id_data, "train", global_batch_size=8, num_batches=3, process_index=p,
                                   process_count=2)
        for p in range(2)
    ]  # fmt: skip
    assert [ids_of(a) + ids_of(b) for a, b in zip(*halves, strict=True)] == [ids_of(b) for b in full]
    assert len(pipeline.make_eval_batches(id_data, "train", global_batch_size=8)) == 50 // 8
    with pytest.raises(ValueError, match="num_batches 7"):
        pipeline.make_eval_batches(id_data, "train", global_batch_size=8, num_batches=7)


def test_pipeline_errors(id_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        pipeline.make_lm_iterator(tmp_path / "no-such-dir", "train", global_batch_size=4, seed=0)
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        pipeline.make_lm_iterator(tmp_path, "train", global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"'validation'.*available splits: \['train'\]"):
        pipeline.make_lm_iterator(id_data, "validation", global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="global_batch_size 10 is not divisible by process_count 4"):
        pipeline.make_lm_iterator(id_data, "train", global_batch_size=10, seed=0, process_count=4)
    with pytest.raises(ValueError, match="fewer than global_batch_size 64"):
        pipeline.make_lm_iterator(id_data, "train", global_batch_size=64, seed=0)


# ------------------------------------------------------------------------------------------------- prepare


def test_prepare_end_to_end(docs, tokenizer_path, tmp_path):
    sample = docs[::15]
    corpus_file = tmp_path / "sample.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in sample))
    out = tmp_path / "data"
    meta = prepare.prepare(str(corpus_file), tokenizer_path, out, seq_len=64, heldout_fraction=0.25,
                           num_shards=2)  # fmt: skip

    assert records.read_metadata(out) == meta
    assert meta["tokenizer_sha256"] == Tokenizer(tokenizer_path).sha256 and meta["vocab_size"] == 1000
    tok = Tokenizer(tokenizer_path)
    heldout = [prepare.heldout_split(f"{corpus_file}:{k + 1}", 0.25) for k in range(len(sample))]
    assert 0 < sum(heldout) < len(sample)
    for name, in_split in (("heldout", True), ("train", False)):
        split_docs = [d for d, h in zip(sample, heldout, strict=True) if h == in_split]
        info = meta["splits"][name]
        stream = sum(len(tok.encode(d.text)) + 2 for d in split_docs)
        assert info["num_documents"] == len(split_docs)
        assert info["num_loss_tokens"] == stream - len(split_docs)
        assert stream - info["num_tokens"] in (0, 1)
        assert info["num_records"] == -(-(stream - 1) // 64)
        source, decode = records.split_source(out, name)
        assert len(source) == info["num_records"]
        loss = sum(int(decode(i, source[i])["loss_weights"].sum()) for i in range(len(source)))
        assert loss == info["num_loss_tokens"]

    fractions = [prepare.heldout_split(f"doc{i}", 0.2, seed=1) for i in range(20_000)]
    assert abs(np.mean(fractions) - 0.2) < 0.01


def documents_in_records(data_dir, split) -> dict[int, np.ndarray]:
    """The documents a split's records hold, rebuilt from the records alone: {document number: its stream tokens},
    each real input placed at its `doc_offsets` (a document is [bos, *tokens, eos]; the split's very last eos is
    a target only). Asserts that every offset of a document is there exactly once."""
    source, decode = records.split_source(data_dir, split)
    rows = [decode(i, source[i]) for i in range(len(source))]
    real = np.concatenate([row["segment_ids"] > 0 for row in rows])
    number, offset, token = (np.concatenate([row[name] for row in rows])[real]
                             for name in ("documents", "doc_offsets", "inputs"))
    found = {}
    for doc in np.unique(number):
        order = np.argsort(offset[number == doc], kind="stable")
        np.testing.assert_array_equal(offset[number == doc][order], np.arange(order.size),
                                      err_msg=f"{split}: offsets of document {doc}")
        found[int(doc)] = token[number == doc][order]
    return found


def test_heldout_documents_are_never_in_training_records(docs, tokenizer_path, tmp_path):
    """The knowledge split, checked on the written shards without the split function: the documents rebuilt from
    each split's records are the corpus documents tokenised here, whole and token for token; no document is in
    both splits, every document is in one, and the held-out split is what `heldout_split` chose."""
    sample = docs[::7]
    corpus_file = tmp_path / "sample.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in sample))
    prepare.prepare(str(corpus_file), tokenizer_path, tmp_path / "data", seq_len=64, heldout_fraction=0.2,
                    num_shards=2)
    tok = Tokenizer(tokenizer_path)
    streams = [np.array([tok.bos_id, *ids, tok.eos_id]) for ids in tok.encode_batch([d.text for d in sample])]

    found = {name: documents_in_records(tmp_path / "data", name) for name in prepare.SPLITS}
    both = sorted(found["train"].keys() & found["heldout"].keys())
    assert not both, f"documents {both} are in both splits"
    assert found["train"].keys() | found["heldout"].keys() == set(range(len(sample)))
    for name, split_docs in found.items():
        for number, tokens in split_docs.items():
            want = streams[number]
            assert len(tokens) in (len(want), len(want) - 1), f"{name}: document {number} is not whole"
            np.testing.assert_array_equal(tokens, want[:len(tokens)], err_msg=f"{name}: document {number}")
    chosen = {k for k in range(len(sample)) if prepare.heldout_split(f"{corpus_file}:{k + 1}", 0.2)}
    assert found["heldout"].keys() == chosen and 0 < len(chosen) < len(sample)


def test_command_line_tools(tmp_path):
    """tools/train_tokenizer.py and tools/prepare_data.py write what the library calls with the same arguments
    write: a byte-identical tokenizer, the same metadata and the same records in both splits."""
    texts = [f"Document {i}. " + " ".join(f"Line {j}: the quick brown fox jumps over the lazy dog {i * j}."
                                           for j in range(i % 7 + 3)) for i in range(60)]
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run = dict(cwd=tmp_path, capture_output=True, text=True, check=True)  # not the repo root: sys.path guard
    tok = subprocess.run([sys.executable, REPO / "tools/train_tokenizer.py", f"--corpus={corpus_file}",
                          f"--out={tmp_path}/cli/spm", "--vocab_size=320"], **run)  # fmt: skip
    lib_model = train_tokenizer(iter(texts), str(tmp_path / "lib" / "spm"), 320)
    assert (tmp_path / "cli" / "spm.model").read_bytes() == Path(lib_model).read_bytes()
    assert f"vocab_size=320 sha256={Tokenizer(lib_model).sha256}" in tok.stdout

    args = dict(seq_len=32, heldout_fraction=0.25, num_shards=2, seed=3)
    prep = subprocess.run([sys.executable, REPO / "tools/prepare_data.py", f"--corpus={corpus_file}",
                           f"--tokenizer={lib_model}", f"--out={tmp_path}/cli/data",
                           *(f"--{k}={v}" for k, v in args.items())], **run)  # fmt: skip
    meta = prepare.prepare(str(corpus_file), lib_model, tmp_path / "lib" / "data", **args)
    assert records.read_metadata(tmp_path / "cli" / "data") == meta
    for name, split in meta["splits"].items():
        assert f"{name}: {split['num_documents']} documents -> {split['num_records']} records" in prep.stdout
        cli_source, decode = records.split_source(tmp_path / "cli" / "data", name)
        lib_source, _ = records.split_source(tmp_path / "lib" / "data", name)
        assert len(cli_source) == len(lib_source) == split["num_records"] > 0
        assert [cli_source[i] for i in range(len(cli_source))] == [lib_source[i] for i in range(len(lib_source))]
