"""gs:// paths on a local GCS server (tests/gcs_fixtures.py): the storage layers, a training run, a memory bank.

Each writes through the libraries' own gs:// layers (TensorStore's gcs kvstore, etils.epath on gcsfs, Orbax on
both), never through a local copy, and must give what the same job gives on local disk, bit for bit.
"""

import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
import tensorstore as ts
from conftest import (
    REFERENCE_FLAGS,
    assert_invocations,
    bank_files,
    guard_state,
    reference_config,
    train_cli,
    tree_files,
)
from etils import epath
from tensorboardX.record_writer import masked_crc32c

from m3jax.checkpoint import CheckpointError, load_config, load_loop_state, load_params, resolve_step_dir
from m3jax.data.corpus import embedded_corpus
from m3jax.data.prepare import prepare
from m3jax.data.records import DataLocationError, read_metadata
from m3jax.data.tokenizer import Tokenizer
from m3jax.memory import bank as bank_lib
from m3jax.memory import knowledge, writer
from m3jax.memory.bank import MemoryBank
from m3jax.model import params as params_lib
from m3jax.model.config import ModelConfig
from m3jax.train import loop

pytest_plugins = ("gcs_fixtures",)  # the `gcs` fixture: a gs:// base on a local GCS server


def test_tensorstore_and_epath_round_trip(gcs):
    """A zarr3 array through TensorStore's gcs kvstore and a text file through epath, written and read back;
    conditional writes; a process the test starts reaches the same server."""
    spec = {"driver": "zarr3", "kvstore": f"{gcs}/array/",
            "metadata": {"shape": [3, 5], "data_type": "int32", "chunk_grid": {
                "name": "regular", "configuration": {"chunk_shape": [2, 5]}}}}
    values = np.arange(15, dtype=np.int32).reshape(3, 5)
    ts.open(spec, create=True).result()[...].write(values).result()
    np.testing.assert_array_equal(ts.open({k: spec[k] for k in ("driver", "kvstore")}).result().read().result(),
                                  values)

    path = epath.Path(gcs) / "dir" / "note.txt"
    path.write_text("hello")
    assert path.read_text() == "hello" and path.exists() and not (epath.Path(gcs) / "missing").exists()
    assert [p.name for p in path.parent.iterdir()] == ["note.txt"]
    assert sorted(p.name for p in epath.Path(gcs).iterdir()) == ["array", "dir"]

    # Conditional writes, as GCS does them (TensorStore's create-once and read-modify-write rest on them)
    store = ts.KvStore.open(f"{gcs}/kv/").result()
    missing = store.read("x").result()
    assert missing.state == "missing"
    first = store.write("x", b"1", if_equal=missing.stamp.generation).result()
    assert first.generation and not store.write("x", b"2", if_equal=missing.stamp.generation).result().generation
    assert store.write("x", b"3", if_equal=first.generation).result().generation
    assert store.read("x").result().value == b"3"

    out = subprocess.run([sys.executable, "-c", f"from etils import epath; print(epath.Path('{path}').read_text())"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "hello", out.stderr[-2000:]


@pytest.mark.slow
def test_training_in_a_bucket_equals_local_and_resumes(lm_data, reference_run, gcs, tmp_path):
    """The reference run (tests/conftest.py: 9 steps, checkpoints every 3, last 2 kept) with a gs:// workdir, stopped
    after step 6 and resumed from its checkpoint there: every loss equals the local uninterrupted run's bit for bit;
    the bucket holds checkpoints 6 and 9, metrics.jsonl, TensorBoard events and the profile of step 2; its step 9
    restores onto the local run's (same parameters, same spike-guard state)."""
    workdir = f"{gcs}/run"
    config = reference_config(lm_data)
    config.train.stop_at = 6
    config.train.update(profile_start=2, profile_steps=1)  # traced locally, uploaded when the trace stops
    first = loop.train(config, workdir)
    assert first["resumed_from"] is None and first["end_step"] == 6
    second = loop.train(reference_config(lm_data), workdir)
    assert second["resumed_from"] == 6 and second["end_step"] == 9

    run = epath.Path(workdir)
    # metrics.jsonl, read from the bucket, checked with the helpers of local runs
    (tmp_path / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    assert_invocations(tmp_path, [(0, False, 6), (6, True, 9)], reference_run["losses"])
    assert_invocations(reference_run["workdir"], [(0, False, 9)], reference_run["losses"])  # and the local one's
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["6", "9"]
    assert any(p.name.endswith(".xplane.pb") and p.stat().length > 0 for p in tree_files(run / "profile"))
    events = list((run / "tensorboard").iterdir())
    assert len(events) == 2 and all(_tfrecords(e.read_bytes()) > 9 for e in events)  # one file per invocation

    local_step, bucket_step = reference_run["workdir"] / "checkpoints" / "9", f"{workdir}/checkpoints/9"
    assert load_loop_state(bucket_step)["guard"] == load_loop_state(local_step)["guard"]
    cfg = reference_config(lm_data)
    cfg.model.vocab_size = Tokenizer(Path(lm_data).parent / "spm.model").vocab_size
    abstract = params_lib.abstract_on_mesh(ModelConfig.from_config(cfg.model, cfg.memory), None,
                                           cfg.logical_axis_rules)
    ours, theirs = load_params(bucket_step, abstract), load_params(local_step, abstract)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, theirs)


def _tfrecords(data: bytes) -> int:
    """How many records a TFRecord file (a TensorBoard event file) holds; AssertionError if one is cut or damaged."""
    count, at = 0, 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
        body = data[at + 12:at + 12 + length]
        footer = data[at + 12 + length:at + 16 + length]
        assert len(body) == length and struct.unpack("<I", footer)[0] == masked_crc32c(body)
        count, at = count + 1, at + 16 + length
    return count


@pytest.mark.slow
def test_bank_in_a_bucket_equals_the_local_one(lm_data, gcs, tmp_path):
    """The same references written by the same parameters to a local bank and to a gs:// one: the same objects
    and files (sha256), and the same rows read back."""
    import lm_test_config

    tokenizer = Tokenizer(Path(lm_data).parent / "spm.model")
    kb = tmp_path / "kb.jsonl"
    kb.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in embedded_corpus()[:3]))
    config = lm_test_config.get_config()
    config.model.vocab_size = tokenizer.vocab_size
    cfg = ModelConfig.from_config(config.model, config.memory)
    refs = knowledge.load_references(str(kb), tokenizer, config.memory.ref_len)
    sink = knowledge.sink_tokens(tokenizer, config.memory.sink_text)
    params = params_lib.init_params(cfg, seed=0)

    def write(path):
        bank, writable = writer.open_for_writing(
            path, refs, architecture=bank_lib.architecture(cfg), tokenizer_sha256=tokenizer.sha256,
            checkpoint={"run_id": "fresh", "step": 0}, sink=sink, codec="bf16", refs_per_shard=8,
            record=writer.writer_record(refs, 1, cfg.dtype))
        assert writable
        writer.write_references(bank, params, cfg, refs, sink, batch_size=8)
        return MemoryBank.open(path, expect_architecture=bank_lib.architecture(cfg), expect_tokenizer=tokenizer.sha256,
                               expect_checkpoint={"run_id": "fresh", "step": 0}, expect_sink_tokens=sink)

    local, bucket = write(str(tmp_path / "bank")), write(f"{gcs}/bank")
    assert bucket.unwritten_ranges() == [] and len(bucket.verify()) == 0
    ids = np.arange(local.num_refs)
    (codes, positions), (bucket_codes, bucket_positions) = local.gather_codes(ids), bucket.gather_codes(ids)
    assert codes.keys() == bucket_codes.keys()
    for name in codes:
        np.testing.assert_array_equal(codes[name].view(np.uint8), bucket_codes[name].view(np.uint8))
    np.testing.assert_array_equal(positions, bucket_positions)
    np.testing.assert_array_equal(local.read_tokens(ids), bucket.read_tokens(ids))
    files = bank_files(epath.Path(tmp_path / "bank"))
    assert {"zarr.json", "writer.json", "memory/c/0/0/0/0/0/0"} <= files.keys()
    assert bank_files(epath.Path(f"{gcs}/bank")) == files


@pytest.mark.slow
def test_a_run_killed_mid_save_in_a_bucket_resumes_exactly(lm_data, reference_run, gcs, tmp_path):
    """The trainer CLI with a gs:// workdir, SIGKILLed while Orbax writes step 6's checkpoint to the bucket: step 3
    stays the last committed one (step 6 has no commit marker: whatever of it reached the bucket is not taken for
    a checkpoint); rerun, the trainer resumes from step 3, every loss equals the uninterrupted local run's bit for
    bit, and step 6 is written again whole. A step with every object but the marker: checkpoint 12 below."""
    run = epath.Path(f"{gcs}/run")
    killed = train_cli(run, lm_data, *REFERENCE_FLAGS, fault="kill_after_save_begins:6")
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    # Orbax writes asynchronously: at the kill, step 6's first objects may or may not have reached the bucket.
    assert _listing(run / "checkpoints") in (["3"], ["3", "6"])
    assert (run / "checkpoints/3/commit_success.txt").exists()
    assert not (run / "checkpoints/6/commit_success.txt").exists()

    resumed = train_cli(run, lm_data, *REFERENCE_FLAGS)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    # The killed run's metrics lines were still in memory (a bucket's metrics.jsonl is rewritten whole every 30 s
    # and at exit): the file holds the resumed invocation's, which equal the reference run's.
    (tmp_path / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    assert_invocations(tmp_path, [(3, True, 9)], reference_run["losses"])
    assert _listing(run / "checkpoints") == ["6", "9"]
    assert all((run / f"checkpoints/{step}/commit_success.txt").exists() for step in (6, 9))
    assert load_loop_state(run / "checkpoints/9")["guard"] == guard_state(reference_run["workdir"], 9)

    # A step whose objects are all there but the commit marker is neither the run's latest nor loadable by path.
    for path in tree_files(run / "checkpoints/9"):
        if str(path) != str(run / "checkpoints/9/commit_success.txt"):
            (run / "checkpoints/12" / str(path)[len(str(run / "checkpoints/9")) + 1:]).write_bytes(path.read_bytes())
    assert str(resolve_step_dir(run)) == str(run / "checkpoints/9")
    with pytest.raises(CheckpointError, match=r"checkpoints/12 is an unfinished checkpoint"):
        load_config(run / "checkpoints/12")


def _listing(directory: epath.Path) -> list[str]:
    """The names in a bucket directory as the server has them now (gcsfs caches listings per process, and the
    objects were written by other processes)."""
    fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()
    return sorted(p.name for p in directory.iterdir())


def test_data_from_a_bucket_prepares_as_from_disk_and_shards_stay_local(lm_data, gcs, tmp_path):
    """A corpus (JSONL objects, by glob) and a tokenizer model in a bucket prepare the same records as the local
    files; a data directory in a bucket (ArrayRecord shards are opened by file path) is refused before any work,
    by an error that names it and says to mount the bucket."""
    tokenizer = Path(lm_data).parent / "spm.model"
    docs = embedded_corpus()[:12]
    for part in range(2):
        text = "".join(json.dumps({"text": d.text, "id": f"doc:{i}"}) + "\n" for i, d in enumerate(docs)
                       if i % 2 == part)
        (tmp_path / f"kb-{part}.jsonl").write_text(text)
        (epath.Path(gcs) / "corpus" / f"kb-{part}.jsonl").write_text(text)
    (epath.Path(gcs) / "spm.model").write_bytes(tokenizer.read_bytes())

    local = prepare(str(tmp_path / "kb-*.jsonl"), str(tokenizer), tmp_path / "local", seq_len=128,
                    heldout_fraction=0.2, num_shards=1)
    bucket = prepare(f"{gcs}/corpus/kb-*.jsonl", f"{gcs}/spm.model", tmp_path / "bucket", seq_len=128,
                     heldout_fraction=0.2, num_shards=1)
    assert bucket["tokenizer_path"] == f"{gcs}/spm.model" and bucket["corpus"] == f"{gcs}/corpus/kb-*.jsonl"
    ignored = ("tokenizer_path", "corpus")
    assert {k: v for k, v in bucket.items() if k not in ignored} == {k: v for k, v in local.items() if k not in ignored}
    for split in ("train", "heldout"):
        (name,) = local["splits"][split]["shards"]
        assert (tmp_path / "bucket" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()

    for call in (lambda: prepare("embedded", str(tokenizer), f"{gcs}/data", seq_len=128, heldout_fraction=0.1,
                                 num_shards=1),
                 lambda: read_metadata(f"{gcs}/data")):
        with pytest.raises(DataLocationError, match=rf"data directory {gcs}/data: .*gcsfuse"):
            call()
    assert not (epath.Path(gcs) / "data").exists()
