"""tools/write_memory.py and m3jax/memory/writer.py: references, rows, resume after SIGKILL, 2 processes, refusals.

The knowledge base is the first 20 documents of the embedded corpus (JSONL), tokenized by the session's test
tokenizer; the checkpoints hold freshly initialised parameters of tests/lm_test_config.py, saved by the
Checkpointer in the training layout (steps 1 and 2, different seeds): training them would change nothing that is
tested here. Every CLI run uses 2 CPU devices per process, so the 1-process and 2-process writers run the same
per-device program.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, bank_files, cli_env

from m3jax import parallel
from m3jax.checkpoint import Checkpointer
from m3jax.data.corpus import embedded_corpus
from m3jax.data.tokenizer import Tokenizer
from m3jax.memory import knowledge, writer
from m3jax.memory.bank import BankMismatchError, MemoryBank, architecture
from m3jax.memory.encode import encode_documents, encode_references
from m3jax.model.config import ModelConfig
from m3jax.model.params import init_params

pytest_plugins = ("gcs_fixtures",)  # the `gcs` fixture: a gs:// base on a local GCS server

NUM_DOCS = 20
ARGS = ("--batch_size=8", "--refs_per_shard=8", "--log_every_s=0")


@pytest.fixture(scope="module")
def kb(lm_data, tmp_path_factory):
    """Paths (tokenizer, knowledge JSONL, run workdir with checkpoints 1 and 2) and the model config."""
    import lm_test_config

    root = tmp_path_factory.mktemp("write_memory")
    tokenizer = Path(lm_data).parent / "spm.model"
    knowledge = root / "kb.jsonl"
    knowledge.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in embedded_corpus()[:NUM_DOCS]))
    config = lm_test_config.get_config()
    config.model.vocab_size = Tokenizer(tokenizer).vocab_size
    ckpt = Checkpointer(root / "run" / "checkpoints", max_to_keep=2, async_save=False)
    loop_state = {"run_id": "test", "data": {"tokenizer_sha256": Tokenizer(tokenizer).sha256}}  # as the loop saves
    for step in (1, 2):
        ckpt.save(step, {"params": init_params(ModelConfig.from_config(config.model, config.memory), seed=step)}, {},
                  config.to_dict(), loop_state)
    ckpt.close()
    return {"root": root, "tokenizer": str(tokenizer), "knowledge": str(knowledge), "config": config,
            "step1": str(root / "run" / "checkpoints" / "1"), "step2": str(root / "run" / "checkpoints" / "2")}


def cli(kb, bank, *extra, checkpoint="step1", tokenizer=None):
    """The write_memory command line (a list) with the test's settings."""
    return [sys.executable, "tools/write_memory.py", "--config=tests/lm_test_config.py",
            f"--checkpoint={kb[checkpoint]}", f"--tokenizer={tokenizer or kb['tokenizer']}",
            f"--knowledge={kb['knowledge']}", f"--bank={bank}", *ARGS, *extra]


def env(kb):
    """2 CPU devices per process (and the session's compilation cache, which conftest sets for every process)."""
    return cli_env(kb["root"])


def run(kb, cmd):
    return subprocess.run(cmd, cwd=REPO, env=env(kb), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference_bank(kb):
    """One uninterrupted 1-process write: the bank every other write must equal byte for byte."""
    bank = kb["root"] / "bank_one"
    out = run(kb, cli(kb, bank))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "complete" in out.stdout and "refs/s" in out.stdout, out.stdout
    return bank


def model(kb):
    config = kb["config"]
    cfg = ModelConfig.from_config(config.model, config.memory)
    return cfg, init_params(cfg, 1)


def two_devices():
    """This process's mesh as a CLI writer with 2 CPU devices makes it: the same per-device program."""
    return parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:2])


def test_references_cut_in_order_and_rows_equal_encode_references(kb, reference_bank):
    tok = Tokenizer(kb["tokenizer"])
    cfg, params = model(kb)
    bank = MemoryBank.open(reference_bank, expect_architecture=architecture(cfg), expect_tokenizer=tok.sha256,
                           expect_checkpoint={"run_id": "test", "step": 1},
                           expect_sink_tokens=[tok.bos_id, *tok.encode("Reference:")])
    # Independent re-tokenization: each document in order, cut into consecutive 128-token pieces, tail last.
    expected = []
    for line in Path(kb["knowledge"]).read_text().splitlines():
        ids = tok.encode(json.loads(line)["text"])
        expected += [ids[s:s + 128] for s in range(0, len(ids), 128)]
        assert len(expected[-1]) == (len(ids) % 128 or 128)
    n = bank.num_refs
    assert n == len(expected) > 3 * NUM_DOCS
    stored = bank.read_tokens(np.arange(n))
    got = [row[row >= 0].tolist() for row in stored]
    assert got == expected and (stored[:, :1] >= 0).all()
    assert sum(len(r) < 128 for r in got) == NUM_DOCS  # one short tail per document here

    # Each reference encoded by encode_references at its row of its batch of 8 (2 devices, as the writer does;
    # the last batch padded): the stored rows are these memories in bf16, bit for bit.
    rows = np.arange(-(-n // 8) * 8)
    lengths = np.array([len(expected[r]) if r < n else 0 for r in rows])
    tokens = np.array([expected[r] + [0] * (128 - len(expected[r])) if r < n else [0] * 128 for r in rows])
    kv, positions = zip(*(encode_references(params, cfg, tokens[s:s + 8], lengths[s:s + 8],
                                            bank.metadata["sink_tokens"], k=8, mesh=two_devices())
                          for s in range(0, len(rows), 8)), strict=True)
    codes, got_positions = bank.gather_codes(np.arange(n))
    np.testing.assert_array_equal(got_positions, np.concatenate(positions)[:n])
    np.testing.assert_array_equal(codes["memory"].view(np.uint16),
                                  np.concatenate(kv)[:n].astype(jnp.bfloat16).view(np.uint16))


def test_rows_of_a_batch_do_not_depend_on_the_others(kb):
    """What makes resumed and multi-process writes byte-identical: a row's bits depend on its own tokens only."""
    cfg, params = model(kb)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 1000, (8, 128))
    lengths = np.array([128, 100, 128, 7, 128, 64, 128, 1])
    mixed = np.where(np.arange(8)[:, None] % 2 == 0, tokens, rng.integers(3, 1000, (8, 128)))
    mixed_lengths = np.where(np.arange(8) % 2 == 0, lengths, [0, 0, 0, 128, 0, 5, 0, 0])  # odd rows: others, padding
    a = encode_references(params, cfg, tokens, lengths, [2, 40, 41], k=8, mesh=two_devices())
    b = encode_references(params, cfg, mixed, mixed_lengths, [2, 40, 41], k=8, mesh=two_devices())
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x)[::2], np.asarray(y)[::2])
        assert not np.array_equal(np.asarray(x)[3], np.asarray(y)[3])


def test_per_document_rows_equal_encode_documents(kb, tmp_path):
    """--per_document with windows of 8 pieces: each document, or each 1024-token window of a longer one, is
    encoded whole by encode_documents and cut into the references. Memory layers: all (layer 1 sees a piece's
    context; layer 0's key/values are those of the token alone)."""
    _, params = model(kb)
    memory = kb["config"].memory.copy_and_resolve_references()
    memory.layers = "all"
    cfg = ModelConfig.from_config(kb["config"].model, memory)
    tok = Tokenizer(kb["tokenizer"])
    refs = knowledge.load_references(kb["knowledge"], tok, 128)
    sink = knowledge.sink_tokens(tok, "Reference:")
    path = str(tmp_path / "doc_bank")
    arch = architecture(cfg)
    bank, writable = writer.open_for_writing(
        path, refs, architecture=arch, tokenizer_sha256=tok.sha256, checkpoint={"run_id": "test", "step": 1},
        sink=sink, codec="bf16", refs_per_shard=8, record=writer.writer_record(refs, 8, cfg.dtype))
    assert writable
    summary = writer.write_references(bank, params, cfg, refs, sink, k=8, batch_size=16, window_refs=8,
                                      mesh=two_devices())
    assert summary["refs"] == bank.num_refs == len(refs) and not bank.unwritten_ranges()

    windows = []  # independently: every document's 1024-token windows, in order
    for line in Path(kb["knowledge"]).read_text().splitlines():
        ids = tok.encode(json.loads(line)["text"])
        windows += [ids[s:s + 1024] for s in range(0, len(ids), 1024)]
    windows += [[]] * (len(windows) % 2)

    def encode_pairs(windows):  # two windows per forward (window w at row w % 2), as the writer batches them
        out = []
        for w in range(0, len(windows), 2):
            tokens = np.array([x + [0] * (1024 - len(x)) for x in windows[w:w + 2]])
            kv, pos = map(np.asarray, encode_documents(params, cfg, tokens, [len(x) for x in windows[w:w + 2]],
                                                       sink, k=8, mesh=two_devices()))
            out += [(kv[i, :-(-len(x) // 128)], pos[i, :-(-len(x) // 128)]) for i, x in enumerate(windows[w:w + 2])]
        return np.concatenate([kv for kv, _ in out]), np.concatenate([pos for _, pos in out])

    expect_kv, expect_pos = encode_pairs(windows)
    codes, got_pos = bank.gather_codes(np.arange(len(refs)))
    np.testing.assert_array_equal(got_pos, expect_pos)
    np.testing.assert_array_equal(codes["memory"].view(np.uint16), expect_kv.astype(jnp.bfloat16).view(np.uint16))

    first, count = writer.units(refs, 8)
    later = np.flatnonzero(np.arange(len(refs)) - np.repeat(first, count) > 0)[:8]  # pieces with context before
    alone_kv, _ = encode_pairs([refs.rows([r])[0][0, :refs.lengths[r]].tolist() for r in later])
    moved = np.abs(alone_kv - expect_kv[later])[:, 1].max(axis=(1, 2, 3, 4))  # memory layer 1
    assert (moved > 1e-2).all(), moved  # the document before a piece changes its memory

    with pytest.raises(BankMismatchError, match=r"window_refs: bank 8, this writer 1"):  # no mixed encodings
        writer.open_for_writing(path, refs, architecture=arch, tokenizer_sha256=tok.sha256, sink=sink,
                                checkpoint={"run_id": "test", "step": 1}, codec="bf16", refs_per_shard=8,
                                record=writer.writer_record(refs, 1, cfg.dtype))


def unwritten_ranges(kb, path) -> list[tuple[int, int]]:
    """The runs of references not yet written to the bank at `path` (opened as the test's writer made it)."""
    cfg, _ = model(kb)
    bank = MemoryBank.open(path, expect_architecture=architecture(cfg),
                           expect_tokenizer=Tokenizer(kb["tokenizer"]).sha256)
    return bank.unwritten_ranges()


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(kb, reference_bank):
    """A writer SIGKILLed right after its second bank write (fault point) holds exactly references [0, 16) (two
    shards of 8); rerun, it writes exactly the rest, and the bank equals the uninterrupted writer's byte for byte."""
    bank = kb["root"] / "bank_killed"
    killed = subprocess.run(cli(kb, bank), cwd=REPO, env={**env(kb), "M3JAX_FAULT": "kill_after_bank_write:2"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    n = MemoryBank.read_metadata(str(bank))["num_refs"]
    assert n > 3 * 8 and unwritten_ranges(kb, bank) == [(16, n)]

    out = run(kb, cli(kb, bank))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"wrote {n - 16:,} refs of [0, {n})" in out.stdout, out.stdout
    assert bank_files(bank) == bank_files(reference_bank)


@pytest.mark.slow
def test_resume_after_sigkill_in_a_bucket(kb, reference_bank, gcs):
    """The same kill and rerun with the bank in a gs:// bucket (TensorStore's gcs kvstore on a local GCS server):
    the killed writer leaves exactly [0, 16) marked written, the rerun writes the rest, and the bank's objects
    equal the local uninterrupted bank's files byte for byte."""
    bank = f"{gcs}/bank"
    killed = subprocess.run(cli(kb, bank), cwd=REPO, env={**env(kb), "M3JAX_FAULT": "kill_after_bank_write:2"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    n = MemoryBank.read_metadata(bank)["num_refs"]
    assert unwritten_ranges(kb, bank) == [(16, n)]

    out = run(kb, cli(kb, bank))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"wrote {n - 16:,} refs of [0, {n})" in out.stdout, out.stdout
    assert bank_files(bank) == bank_files(reference_bank)


def test_two_processes_equal_one(kb, reference_bank):
    from test_multiprocess import free_port

    bank = kb["root"] / "bank_two"
    port = free_port()
    procs = [subprocess.Popen(
        cli(kb, bank, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
        cwd=REPO, env=env(kb), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    n = MemoryBank.read_metadata(str(bank))["num_refs"]
    slices = [int(o.split("wrote ")[1].split(" refs")[0].replace(",", "")) for o, _ in outs]
    assert sum(slices) == n and min(slices) > 0, outs  # each process wrote its own part
    assert "complete" in outs[0][0]
    assert bank_files(bank) == bank_files(reference_bank)


def test_refusals(kb, reference_bank, tmp_path):
    before = bank_files(reference_bank)
    out = run(kb, cli(kb, reference_bank, checkpoint="step2"))  # another checkpoint step of the same run
    assert out.returncode == 1
    assert "written by checkpoint {'run_id': 'test', 'step': 1}, this writer has {'run_id': 'test', 'step': 2}" \
        in out.stderr and "--allow_other_checkpoint" in out.stderr, out.stderr[-2000:]
    # a tokenizer of the same vocabulary size that did not write the checkpoint's data
    from m3jax.data.tokenizer import train_tokenizer

    vocab = Tokenizer(kb["tokenizer"]).vocab_size
    other_tok = train_tokenizer((d.text for d in embedded_corpus()[::-1][:120]), str(tmp_path / "other"), vocab)
    assert Tokenizer(other_tok).vocab_size == vocab and Tokenizer(other_tok).sha256 != Tokenizer(kb["tokenizer"]).sha256
    out = run(kb, cli(kb, tmp_path / "bank_other_tok", tokenizer=other_tok))
    assert out.returncode == 1 and f"{other_tok} is not the tokenizer that wrote the training data of checkpoint" \
        in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "bank_other_tok").exists()

    tok = Tokenizer(kb["tokenizer"])
    cfg, _ = model(kb)
    refs = knowledge.load_references(kb["knowledge"], tok, 128)
    kw = dict(architecture=architecture(cfg), tokenizer_sha256=tok.sha256, sink=knowledge.sink_tokens(tok,
              "Reference:"), codec="bf16", refs_per_shard=8, record=writer.writer_record(refs, 1, cfg.dtype))
    record = writer.read_record(reference_bank)  # where the references came from, for tools/retrieve.py
    assert record["knowledge"] == kb["knowledge"] and record["corpus_sha256"] == refs.corpus_sha256
    step2 = {"run_id": "test", "step": 2}  # kw's record names no knowledge base: a source is not compared
    bank, writable = writer.open_for_writing(str(reference_bank), refs, checkpoint=step2, allow_other_checkpoint=True,
                                             **kw)
    assert not writable and bank.metadata["checkpoint"]["step"] == 1  # complete: accepted as it is

    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("\n".join(Path(kb["knowledge"]).read_text().splitlines()[:NUM_DOCS // 2]))
    other = knowledge.load_references(str(fewer), tok, 128)
    with pytest.raises(BankMismatchError, match=rf"holds {len(refs)} references but the knowledge base gives "
                                                rf"{len(other)} \(of at most 128 tokens\)"):
        writer.open_for_writing(str(reference_bank), other, checkpoint={"run_id": "test", "step": 1}, **kw)
    same_count = knowledge.References(**{**refs.__dict__, "tokens": np.roll(refs.tokens, 1)})
    with pytest.raises(BankMismatchError, match="another knowledge base.*references_sha256"):
        writer.open_for_writing(str(reference_bank), same_count, checkpoint={"run_id": "test", "step": 1},
                                **{**kw, "record": writer.writer_record(same_count, 1, cfg.dtype)})
    assert bank_files(reference_bank) == before


def test_cut_references_and_units():
    refs = knowledge.cut_references([("a", range(300)), ("empty", []), ("b", range(1000, 1128)), ("c", [7])], 128)
    assert refs.lengths.tolist() == [128, 128, 44, 128, 1] and refs.doc_index.tolist() == [0, 0, 0, 2, 3]
    tokens, lengths = refs.rows([2, 4])
    assert tokens[0, :44].tolist() == list(range(256, 300)) and (tokens[0, 44:] == -1).all()
    assert tokens[1, 0] == 7 and lengths.tolist() == [44, 1]
    assert [x.tolist() for x in writer.units(refs, 2)] == [[0, 2, 3, 4], [2, 1, 1, 1]]
    assert [x.tolist() for x in writer.units(refs, 1)] == [[0, 1, 2, 3, 4], [1, 1, 1, 1, 1]]
