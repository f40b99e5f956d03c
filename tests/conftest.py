"""Test set-up: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the session's jits and for every process it starts (trainer, tool and
# multi-process runs inherit the environment): a program the suite compiles again in another test or process, as
# most trainer runs of one config do, is compiled once. It lives in the repository's .cache/ (git ignores it), so a
# developer's second `make test` starts warm; a clean clone (CI) starts empty. M3JAX_TEST_JAX_CACHE moves it; an
# empty value turns it off. Entries are keyed by the program, the compile options and the jax version; a program
# that compiles in under 0.5 s is not worth a file.
_jax_cache = os.environ.get("M3JAX_TEST_JAX_CACHE", os.path.join(REPO, ".cache", "jax-tests"))
if _jax_cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _jax_cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # bytes; least recently used go first

import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
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
    # Stable ids, so the held-out split does not depend on the tmp path: "doc:14" and "doc:15" are held out.
    knowledge.write_text("".join(json.dumps({"text": d.text, "id": f"doc:{i}"}) + "\n" for i, d in enumerate(docs)))
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
    """The environment of a CLI subprocess: `devices` CPU devices (and the session's compilation cache)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def run_tool(root, tool, *args, timeout=600):
    """tools/<tool>.py with `args`, from the repository root; returns the CompletedProcess."""
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


# Jobs of minutes that a few tests check, run as background processes beside the rest of the suite (a test process
# leaves much of the second core idle): each starts at collection when a selected test uses its fixture, and those
# tests are moved to the end of the session, where the fixture joins the job.
#
# The continued-stage fixture model (test_continued, test_evaluate_tool): the entity experiment of
# tools/bench/stage2_entities.py end to end at a size the suite affords. Fictional people with two attributes
# (references of ~27 tokens), the warm-up on the embedded corpus alone, then the continued stage in the default
# online mode with the encoding's gradient, every reference token kept (k = 32) in both layers, 600 steps.
# Held-out entities exist only in the knowledge base, so whatever the model answers right about them it read from
# memory. ~6 minutes of one process that is mostly idle waiting on small ops.
ENTITY_RUN = ("--num_entities=400", "--num_attributes=2", "--mix_ratio=0.8", "--vocab_size=512",
              "--warmup_steps=100", "--stage2_steps=600", "--batch_size=16", "--seq_len=128", "--mode=online",
              "--encode_grad", "--k=32", "--memory_layers=all", "--peak_lr=3e-3", "--nocontrols", "--eval_entities=40",
              "--overrides=model.num_layers=2,model.hidden_size=128,model.num_heads=4,model.num_kv_heads=2,"
              "model.mlp_dim=256")
# The fit check of configs/memory3_2b.py compiled for a v5p-128 slice (test_aot): 2-3.5 minutes of the TPU compiler
# (libtpu from .venv/tpu-extra), on one CPU device, as a user's dry run has it.
TPU_FIT_2B = ("-m", "m3jax.train", "--config=configs/memory3_2b.py", "--dry_run", "--topology=v5p:4x4x4")
# configs/continued.py with a 2-layer model compiled for v5p:2x2x1 in each memory mode (test_aot): under a minute each.
SMALL_CONTINUED = ("--config.model.num_layers=2", "--config.model.hidden_size=256", "--config.model.num_heads=4",
                   "--config.model.num_kv_heads=2", "--config.model.head_dim=64", "--config.model.mlp_dim=512",
                   "--config.model.vocab_size=4096", "--config.data.seq_len=512", "--config.data.global_batch_size=8")
TPU_FIT_CONTINUED = ("-m", "m3jax.train", "--config=configs/continued.py", "--dry_run", "--topology=v5p:2x2x1",
                     *SMALL_CONTINUED)
# `make demo` at DEMO_SIZE=tiny (test_demo): every stage of the pipeline for a few steps, ~4 minutes.
DEMO_TINY = ("make", "demo", "DEMO_SIZE=tiny")
PYTHON = sys.executable
BACKGROUND = {  # fixture name -> (CPU devices, the command, run from the repository root)
    "entity_run": (2, lambda root: (PYTHON, "tools/bench/stage2_entities.py", f"--workdir={root / 'bench'}",
                                    *ENTITY_RUN)),
    "memory3_2b_fit": (1, lambda root: (PYTHON, *TPU_FIT_2B)),
    "continued_fit_bank": (1, lambda root: (PYTHON, *TPU_FIT_CONTINUED, "--config.retrieval.mode=bank")),
    "continued_fit_online": (1, lambda root: (PYTHON, *TPU_FIT_CONTINUED, "--config.retrieval.mode=online")),
    "demo_tiny": (1, lambda root: (*DEMO_TINY, f"DEMO_DIR={root / 'demo'}")),
}
_background: dict[str, dict] = {}


def background_env(root, devices: int) -> dict[str, str]:
    """A background job's environment: `devices` CPU devices, no TPU_LIBRARY_PATH (libtpu only from tpu-extra)."""
    return {k: v for k, v in cli_env(root, devices).items() if k != "TPU_LIBRARY_PATH"}


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only the tests that will run count
def pytest_collection_modifyitems(session, config, items):
    """Starts each BACKGROUND job that a selected test uses, and moves those tests to the end."""
    import tempfile

    for name, (devices, args) in BACKGROUND.items():
        users = [item for item in items if name in getattr(item, "fixturenames", ())]
        if not users or name in _background:
            continue
        items[:] = [item for item in items if item not in users] + users
        if config.option.collectonly:
            continue
        root = Path(tempfile.mkdtemp(prefix=f"m3jax-{name}-"))
        out, err = open(root / "stdout", "w"), open(root / "stderr", "w")  # noqa: SIM115 (written until joined)
        proc = subprocess.Popen(list(args(root)), cwd=REPO, env=background_env(root, devices),
                                stdout=out, stderr=err)
        _background[name] = {"root": root, "proc": proc, "files": (out, err)}


def pytest_sessionfinish(session, exitstatus):
    import shutil

    for job in _background.values():
        if job["proc"].poll() is None:
            job["proc"].kill()
            job["proc"].wait()
        for f in job["files"]:
            f.close()
        shutil.rmtree(job["root"], ignore_errors=True)


def join_background(name: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Waits for BACKGROUND job `name`: its exit status, stdout and stderr (and `root`, its directory)."""
    assert name in _background, f"the {name} job starts at collection (pytest_collection_modifyitems)"
    job = _background[name]
    rc = job["proc"].wait(timeout=timeout)
    for f in job["files"]:
        f.flush()
    done = subprocess.CompletedProcess(job["proc"].args, rc, (job["root"] / "stdout").read_text(),
                                       (job["root"] / "stderr").read_text())
    done.root = job["root"]
    return done


@pytest.fixture(scope="session")
def entity_run():
    """ENTITY_RUN's workdir (entities/, tokenizer/, warmup/, bank/ with its index, stage2_memory/ and the bank its
    final checkpoint wrote, bank_stage2_memory/), its results.json and printed table."""
    done = join_background("entity_run")
    assert done.returncode == 0, (f"tools/bench/stage2_entities.py failed (exit {done.returncode}):\n"
                                  f"{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
    workdir = done.root / "bench"
    return {"workdir": workdir, "results": json.loads((workdir / "results.json").read_text()), "stdout": done.stdout}


@pytest.fixture(scope="session")
def demo_tiny() -> subprocess.CompletedProcess:
    """`make demo DEMO_SIZE=tiny` into `root / "demo"`, finished: its exit status, what it printed, and `root`."""
    return join_background("demo_tiny")


@pytest.fixture(scope="session")
def memory3_2b_fit() -> subprocess.CompletedProcess:
    """The TPU_FIT_2B dry run, finished: its exit status, its JSON report (stdout) and stderr."""
    return join_background("memory3_2b_fit")


@pytest.fixture(scope="session")
def continued_fit_bank() -> subprocess.CompletedProcess:
    """The TPU_FIT_CONTINUED dry run in bank mode, finished."""
    return join_background("continued_fit_bank")


@pytest.fixture(scope="session")
def continued_fit_online() -> subprocess.CompletedProcess:
    """The TPU_FIT_CONTINUED dry run in online mode, finished."""
    return join_background("continued_fit_online")


# Resume, preemption and fault tests (test_train, test_ops, test_multiprocess, test_launch): the settings shared by
# runs compared with one uninterrupted reference run, that run (built once), and what each invocation of a run did.

REFERENCE = {"train.num_steps": 9, "train.checkpoint_every": 3, "train.keep_checkpoints": 2, "train.log_every": 1,
             "train.eval_every": 0, "mesh.fsdp": 2}
REFERENCE_FLAGS = tuple(f"--config.{key}={value}" for key, value in REFERENCE.items())  # for trainer processes


def train_cli(workdir, data_dir: str, *overrides: str, fault: str = "") -> subprocess.Popen:
    """`python -m m3jax.train` of tests/lm_test_config.py on 8 CPU devices (the reference run's program), with
    `fault` as M3JAX_FAULT (m3jax/faults.py)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "M3JAX_FAULT": fault}
    cmd = [sys.executable, "-m", "m3jax.train", "--config=tests/lm_test_config.py", f"--workdir={workdir}",
           f"--config.data.path={data_dir}", "--verbosity=-1", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def reference_config(data_dir):
    """tests/lm_test_config.py on `data_dir` with the REFERENCE settings (8 devices: mesh data 4 x fsdp 2)."""
    import lm_test_config

    c = lm_test_config.get_config()
    c.data.path = data_dir
    for key, value in REFERENCE.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


@pytest.fixture(scope="session")
def reference_run(lm_data, tmp_path_factory):
    """The uninterrupted REFERENCE run, in-process on the 8 test devices: what killed, preempted, resumed and
    2-process runs of the same settings must reproduce. Its workdir (checkpoints 6 and 9 kept) and losses by step."""
    from m3jax.train import loop

    workdir = tmp_path_factory.mktemp("reference_run")
    summary = loop.train(reference_config(lm_data), str(workdir))
    assert summary["resumed_from"] is None and sorted(summary["losses"]) == list(range(1, 10)), summary
    return {"workdir": workdir, "losses": summary["losses"]}


def assert_index_file_damage_is_named(data, load, damaged: str) -> None:
    """One flipped byte of an index file `data` (ScaNN would load it and return wrong neighbours), then the file
    gone: `load()` raises naming each (`damaged`: the expected message of the first, a regex)."""
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=damaged):
        load()
    data.unlink()
    with pytest.raises(ValueError, match=f"index file {data} is missing"):
        load()


def committed_steps(workdir) -> list[int]:
    """The checkpoint steps a run directory holds, committed ones only (Orbax's temporary directories left out)."""
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def guard_state(workdir, step: int) -> dict:
    """The spike guard's statistics saved with checkpoint `step` of a run."""
    from m3jax.checkpoint import load_loop_state

    return load_loop_state(Path(workdir) / "checkpoints" / str(step))["guard"]


def invocations(workdir) -> list[dict]:
    """A run's metrics.jsonl cut at its `start` records: per invocation, in order, the step it started at, whether a
    checkpoint gave it, the train steps it logged (in the order written) and their losses."""
    runs = []
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "start":
            runs.append({"start": rec["step"], "resumed": bool(rec["resumed"]), "steps": [], "losses": {}})
        elif rec["split"] == "train":
            runs[-1]["steps"].append(rec["step"])
            runs[-1]["losses"][rec["step"]] = rec["loss"]
    return runs


def assert_invocations(workdir, expected, reference_losses=None, rtol=0.0) -> None:
    """The run in `workdir` was invoked as `expected` says — per invocation (start step, resumed, last step), each
    training every step after its start once — and each logged loss equals `reference_losses`' at its step: bit
    for bit (rtol 0), or within `rtol`."""
    runs = invocations(workdir)
    got = [(r["start"], r["resumed"], r["steps"]) for r in runs]
    want = [(start, resumed, list(range(start + 1, last + 1))) for start, resumed, last in expected]
    assert got == want, f"invocations (start, resumed, steps trained): {got}, expected {want}"
    if reference_losses is None:
        return
    for r in runs:
        losses, reference = [r["losses"][s] for s in r["steps"]], [reference_losses[s] for s in r["steps"]]
        if rtol:
            np.testing.assert_allclose(losses, reference, rtol=rtol, err_msg=f"invocation from step {r['start']}")
        else:
            assert losses == reference, f"invocation from step {r['start']}: losses {losses} != {reference}"


def tree_files(directory):
    """Every file under an epath directory, local or gs:// (epath's walk() drops the gs:// of what it yields)."""
    for path in directory.iterdir():
        yield from tree_files(path) if path.is_dir() else [path]


def bank_files(root) -> dict[str, str]:
    """sha256 of every file or object under a memory bank (a local directory or a gs:// prefix), the group's
    creation time taken out of zarr.json: two banks of the same references and parameters compare equal."""
    from etils import epath

    root, out = epath.Path(root), {}
    for path in tree_files(root):
        data = path.read_bytes()
        key = str(path)[len(str(root)) + 1:]
        if key == "zarr.json":
            group = json.loads(data)
            del group["attributes"]["m3jax_bank"]["created"]
            data = json.dumps(group, sort_keys=True).encode()
        out[key] = hashlib.sha256(data).hexdigest()
    return out
