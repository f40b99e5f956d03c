"""Test set-up: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from m3jax.config import base_config  # noqa: E402


def tiny_config(**model):
    """A small float32 config for fast tests."""
    c = base_config()
    c.model.update(vocab_size=300, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=96, dtype="float32")
    c.model.update(model)
    c.data.seq_len = 32
    c.data.global_batch_size = 8
    c.train.num_steps = 10
    c.optimizer.warmup_steps = 2
    return c


@pytest.fixture
def config():
    return tiny_config()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory):
    """A 1000-token sentencepiece model and 64-token packed data of the embedded corpus, built once."""
    from m3jax.data.corpus import embedded_corpus
    from m3jax.data.prepare import prepare
    from m3jax.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("lm_data")
    spm = train_tokenizer((d.text for d in embedded_corpus()), str(root / "spm"), vocab_size=1000)
    prepare("embedded", spm, str(root / "data"), seq_len=64, heldout_fraction=0.05, num_shards=2)
    return str(root / "data")


def lm_config(data_dir, *, num_steps, eval_every=0, stop_at=0, mesh=None, init_from=""):
    """tests/lm_test_config.py pointed at `data_dir`, with the run length and mesh of one test."""
    import lm_test_config

    c = lm_test_config.get_config()
    c.data.path = data_dir
    c.init_from = init_from
    c.train.update(num_steps=num_steps, stop_at=stop_at, eval_every=eval_every or num_steps)
    c.train.checkpoint_every = num_steps
    if mesh:
        c.mesh.update(mesh)
    return c


KB_DOCS = 16  # documents of the retrieval tests' knowledge base (CPU embedding costs ~0.1 s per text)


@pytest.fixture(scope="session")
def memory_kb(lm_data, tmp_path_factory):
    """A knowledge split with its bank, built once per session (the retrieval and memory-pipeline tests).

    Knowledge base: the first KB_DOCS documents of 1,500 to 6,000 characters of the embedded corpus, as JSONL.
    Data: that corpus prepared with the session tokenizer at seq_len 256, 10% of the documents held out (they are
    only in the knowledge base). Bank: every reference written by freshly initialised tests/lm_test_config.py
    parameters with memory on (float32, bf16 codec); training them would change nothing the tests check.
    """
    import json
    from pathlib import Path

    import lm_test_config

    from m3jax.data.corpus import embedded_corpus
    from m3jax.data.prepare import prepare
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.memory import bank as bank_lib
    from m3jax.memory import knowledge as knowledge_lib
    from m3jax.memory import writer
    from m3jax.model.config import ModelConfig
    from m3jax.model.params import init_params

    root = tmp_path_factory.mktemp("memory_kb")
    tokenizer_path = str(Path(lm_data).parent / "spm.model")
    tokenizer = Tokenizer(tokenizer_path)
    knowledge = root / "kb.jsonl"
    docs = [d for d in embedded_corpus() if 1500 < len(d.text) < 6000][:KB_DOCS]
    knowledge.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    data = root / "data"
    prepare(str(knowledge), tokenizer_path, data, seq_len=256, heldout_fraction=0.1, num_shards=2)

    config = lm_test_config.get_config()
    config.model.vocab_size = tokenizer.vocab_size
    config.data.seq_len = 256
    cfg = ModelConfig.from_config(config.model, config.memory)
    refs = knowledge_lib.load_references(str(knowledge), tokenizer, config.memory.ref_len)
    sink = knowledge_lib.sink_tokens(tokenizer, config.memory.sink_text)
    bank, _ = writer.open_for_writing(
        str(root / "bank"), refs, architecture=bank_lib.architecture(cfg),
        tokenizer_sha256=tokenizer.sha256, checkpoint={"run_id": "fresh", "step": 0}, sink=sink, codec="bf16",
        refs_per_shard=64, record=writer.writer_record(refs, 1, cfg.dtype))
    writer.write_references(bank, init_params(cfg, seed=0), cfg, refs, sink, batch_size=64)
    return {"root": root, "knowledge": str(knowledge), "data": str(data), "tokenizer": tokenizer_path,
            "bank": str(root / "bank"), "config": config, "refs": refs, "sink": sink}


def cli_env(root, devices=2):
    """CPU devices of a CLI subprocess, and a compilation cache shared by the session's runs of one program."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache")}


def run_tool(root, tool, *args, timeout=600):
    """tools/<tool>.py with `args`, from the repository root; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, f"tools/{tool}.py", *args], cwd=REPO, env=cli_env(root),
                          capture_output=True, text=True, timeout=timeout)


RETRIEVE_BLOCK_RECORDS = 8


@pytest.fixture(scope="session")
def kb_retrieval(memory_kb):
    """memory_kb's index (tools/build_index.py) and its train split's retrieved ids (tools/retrieve.py), once."""
    root = memory_kb["root"]
    built = run_tool(root, "build_index", "--config=tests/lm_test_config.py", f"--bank={memory_kb['bank']}",
                     f"--tokenizer={memory_kb['tokenizer']}", "--block_refs=64")
    assert built.returncode == 0, built.stderr[-3000:]
    ids = root / "retrieval-train"
    retrieved = run_tool(root, "retrieve", "--config=tests/lm_test_config.py", f"--data={memory_kb['data']}",
                         f"--bank={memory_kb['bank']}", f"--out={ids}", f"--block_records={RETRIEVE_BLOCK_RECORDS}")
    assert retrieved.returncode == 0, retrieved.stderr[-3000:]
    return {"index": os.path.join(memory_kb["bank"], "index"), "ids": str(ids), "build_stdout": built.stdout,
            "retrieve_stdout": retrieved.stdout}
