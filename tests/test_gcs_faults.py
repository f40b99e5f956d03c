"""Transient server errors on gs:// (the `gcs_faults` fixture: the local GCS server answers 5xx or drops connections
for a while): a job retries with backoff and ends with what it gives without faults, or stops with an error naming
the object, and what it leaves in the bucket is never taken for a whole artifact.

How each layer retries (measured against the emulator):
- TensorStore's gcs kvstore (memory banks, Orbax's arrays): 5xx, 408, 429 and dropped connections, with the backoff
  of its context's `gcs_request_retries` (by default 32 retries from 1 s doubling to 32 s: about 15 minutes); its
  last error names the object ("Error writing gs://...").
- gcsfs (etils.epath: Orbax's directories, JSON items and commit markers, metrics.jsonl, TensorBoard events): the
  same errors, 6 attempts 1, 2, 4, 8 and 16 s apart (plus up to 1 s, fixed in its code); its last error is the
  server's answer ("injected fault, 503", "Server disconnected") without the object.
- google-cloud-storage (Orbax's bucket lookup before it deletes an old checkpoint): for 120 s; its error names the URL.
The tests keep the number of attempts and shorten the waits (`quick_retries`).
"""

import asyncio
import re
import time
import types

import numpy as np
import pytest
import tensorstore as ts
from conftest import assert_invocations, bank_files, guard_state, reference_config
from etils import epath
from test_bank import make_bank, open_bank, random_rows

from m3jax.checkpoint import Checkpointer, CheckpointError, load_config, load_loop_state, resolve_step_dir
from m3jax.memory import bank as bank_lib
from m3jax.memory.bank import BankCorruptionError
from m3jax.train import loop

pytest_plugins = ("gcs_fixtures",)  # `gcs`: a gs:// base on a local GCS server; `gcs_faults`: its fault rules

OUTAGE = 10**6  # failures in a row: more than any layer retries


@pytest.fixture
def quick_retries(gcs_faults, monkeypatch):
    """`gcs_faults`, with the retries of memory banks (TensorStore: 4 retries, 10 ms doubling to 100 ms) and of
    gcsfs (its attempts, their waits 100 times shorter) quick enough that an outage ends a test in a second."""
    import gcsfs.retry  # after the server's environment is set (tests/gcs_fixtures.py)

    retries = {"max_retries": 4, "initial_delay": "10ms", "max_delay": "100ms"}
    monkeypatch.setattr(bank_lib, "_CONTEXT", ts.Context({"gcs_request_retries": retries}))
    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=lambda s: asyncio.sleep(s / 100)))
    return gcs_faults


def _write_bank(path, kv, positions, tokens):
    bank = make_bank(path, num_refs=len(kv))
    for start in range(0, len(kv), bank.refs_per_shard):  # shard by shard
        stop = start + bank.refs_per_shard
        bank.write(start, kv[start:stop], positions[start:stop], tokens[start:stop])


def test_bank_written_through_transient_faults_equals_a_clean_one(quick_retries, gcs):
    """A bank written while the server fails uploads (3 x 503 in a row, 3 dropped connections, a 429) and reads
    (500s, drops) is the bank written without faults, object for object; it reads back the same through more."""
    faults = quick_retries
    kv, positions, tokens = random_rows(np.random.default_rng(0), 12)
    _write_bank(f"{gcs}/clean", kv, positions, tokens)
    rules = [dict(count=3, methods=("POST",), match="faulty/memory/"),
             dict(count=3, methods=("POST",), match="faulty/written/", drop=True),
             dict(count=1, status=429, methods=("POST",), match="faulty/tokens/"),
             dict(count=2, status=500, methods=("GET",), match="faulty/"),
             dict(count=2, methods=("GET",), match="faulty/positions/", drop=True)]
    for rule in rules:
        faults.add(**rule)
    _write_bank(f"{gcs}/faulty", kv, positions, tokens)
    assert faults.failed() == sum(rule["count"] for rule in rules)
    assert bank_files(f"{gcs}/faulty") == bank_files(f"{gcs}/clean")

    faults.add(count=2, methods=("GET",), match="faulty/", drop=True)
    faults.add(count=2, status=503, methods=("GET",), match="faulty/")  # 4 in a row: as many as the retries
    bank, clean = open_bank(f"{gcs}/faulty", cache_rows=0), open_bank(f"{gcs}/clean")
    ids = np.arange(12)
    assert bank.unwritten_ranges() == [] and len(bank.verify()) == 0
    (codes, got_positions), (clean_codes, clean_positions) = bank.gather_codes(ids), clean.gather_codes(ids)
    assert faults.failed() == sum(rule["count"] for rule in rules) + 4
    for name in codes:
        np.testing.assert_array_equal(codes[name].view(np.uint8), clean_codes[name].view(np.uint8))
    np.testing.assert_array_equal(got_positions, clean_positions)
    np.testing.assert_array_equal(bank.read_tokens(ids), clean.read_tokens(ids))


def test_bank_outage_names_the_object_and_leaves_rows_unwritten(quick_retries, gcs):
    """Uploads that keep failing past the retries stop a bank write with an error naming the object; rows whose
    data or written flags did not reach the bucket stay unwritten (a reader refuses them, a writer redoes them), and
    writing them once the server is back gives the bank written without faults. A read outage is an error naming
    the object, not damage."""
    faults = quick_retries
    kv, positions, tokens = random_rows(np.random.default_rng(0), 12)
    bank, where = make_bank(f"{gcs}/bank"), re.escape(f"{gcs}/bank/")
    bank.write(0, kv[:4], positions[:4], tokens[:4])
    faults.add(count=OUTAGE, methods=("POST",), match="bank/memory/")
    with pytest.raises(ValueError, match=rf"Error writing {where}memory/c/1/.*All 4 retry attempts failed"):
        bank.write(4, kv[4:8], positions[4:8], tokens[4:8])
    faults.clear()
    faults.add(count=OUTAGE, methods=("POST",), match="bank/written/", drop=True)
    with pytest.raises(ValueError, match=rf"Error writing {where}written/c/2"):
        bank.write(8, kv[8:], positions[8:], tokens[8:])  # its data is stored, its flags are not
    faults.clear()

    reopened = open_bank(f"{gcs}/bank", cache_rows=0)
    assert reopened.unwritten_ranges() == [(4, 12)] and len(reopened.verify()) == 0
    with pytest.raises(ValueError, match=r"reference 8 is not written"):
        reopened.gather_codes([0, 8])
    faults.add(count=OUTAGE, methods=("GET",), match="bank/tokens/", drop=True)
    with pytest.raises(ValueError, match=rf"reading array 'tokens' of references 0, 1 failed: .* in {where}tokens/"
                                         r"c/0/0: All 4 retry attempts failed") as error:
        reopened.read_tokens([0, 1])
    assert not isinstance(error.value, BankCorruptionError)
    faults.clear()

    for a, b in reopened.unwritten_ranges():
        reopened.write(a, kv[a:b], positions[a:b], tokens[a:b])
    _write_bank(f"{gcs}/clean", kv, positions, tokens)
    assert bank_files(f"{gcs}/bank") == bank_files(f"{gcs}/clean")


@pytest.mark.slow
def test_training_through_transient_faults_equals_the_reference(lm_data, reference_run, quick_retries, gcs,
                                                               tmp_path):
    """The reference run (tests/conftest.py) in a gs:// workdir, to its first checkpoint (step 3) and resumed from
    it to its second (step 6), while the server fails requests of every layer: gcsfs's uploads (metrics.jsonl,
    TensorBoard events, Orbax's JSON items and commit markers) and listings, TensorStore's uploads and reads of
    Orbax's arrays. Every loss equals the uninterrupted local run's bit for bit, and step 6 holds its statistics."""
    faults = quick_retries
    rules = [dict(count=1, methods=("POST",), match="run/metrics.jsonl"),  # a rule before the more general ones
             dict(count=1, methods=("POST",), match="run/tensorboard/", drop=True),
             dict(count=3, methods=("POST",), match="uploadType=resumable"),
             dict(count=2, methods=("GET",), match="delimiter=/", drop=True),
             dict(count=1, status=500, methods=("POST",), match="uploadType=media"),
             dict(count=1, methods=("GET",), match="manifest.ocdbt", drop=True)]
    workdir = f"{gcs}/run"
    for stop_at in (3, 6):
        for rule in rules:
            faults.add(**rule)
        config = reference_config(lm_data)
        config.train.stop_at = stop_at
        summary = loop.train(config, workdir)
        assert summary["end_step"] == stop_at
        assert faults.failed() == sum(rule["count"] for rule in rules) * stop_at // 3
    (tmp_path / "metrics.jsonl").write_text((epath.Path(workdir) / "metrics.jsonl").read_text())
    assert_invocations(tmp_path, [(0, False, 3), (3, True, 6)], reference_run["losses"])
    step_dir = resolve_step_dir(workdir)
    assert step_dir.name == "6" and load_loop_state(step_dir)["guard"] == guard_state(reference_run["workdir"], 6)


def _save_through_outage(directory: str, faults) -> Exception:
    """Saves step 1, then step 2 while every upload of step 2's commit marker fails; what saving step 2 raised."""
    state = {"params": {"w": np.arange(12.0).reshape(3, 4)}}
    ckpt = Checkpointer(directory, max_to_keep=2)
    ckpt.save(1, state, {}, {"step": 1}, {"run_id": "outage"})
    ckpt.wait()
    faults.add(count=OUTAGE, methods=("POST",), match="checkpoints/2/commit_success.txt")
    try:
        ckpt.save(2, state, {}, {"step": 2}, {"run_id": "outage"})
        ckpt.wait()
    except Exception as e:  # noqa: BLE001 - whatever the layers raise
        return e
    finally:
        faults.clear()
        ckpt.close()
    raise AssertionError("step 2 was saved through the outage")


def test_checkpoint_outage_stops_the_save_and_leaves_no_checkpoint(quick_retries, gcs):
    """A save whose commit marker cannot be written stops with an error; its step, whose every other object is in
    the bucket, is neither a step of the run nor loadable."""
    directory = f"{gcs}/checkpoints"
    _save_through_outage(directory, quick_retries)
    assert sorted(p.name for p in epath.Path(directory).iterdir()) == ["1", "2"]
    assert Checkpointer(directory, max_to_keep=2).all_steps() == [1]
    assert resolve_step_dir(directory).name == "1"
    with pytest.raises(CheckpointError, match=r"checkpoints/2 is an unfinished checkpoint"):
        load_config(f"{directory}/2")


def test_checkpoint_outage_error_names_the_step(quick_retries, gcs):
    """The error of a save that the server stopped names the checkpoint step (gcsfs's own names nothing)."""
    error = _save_through_outage(f"{gcs}/checkpoints", quick_retries)
    assert f"{gcs}/checkpoints/2" in str(error), f"{type(error).__name__}: {error}"


def test_metrics_outage_stops_the_writer_naming_the_object(quick_retries, gcs):
    """An outage on the TensorBoard events and metrics.jsonl of a bucket run: the training thread gets an error
    naming the object (tensorboardX's writer thread would otherwise die and block the next add_scalar for ever)."""
    from m3jax.train.metrics import MetricWriter

    writer = MetricWriter(f"{gcs}/run", upload_every_s=3600.0)  # metrics.jsonl: written at close
    writer.write(1, {"loss": 1.0})
    quick_retries.add(count=OUTAGE, methods=("POST",), match="run/")
    with pytest.raises(OSError, match=rf"cannot write {gcs}/run/tensorboard/events"):
        for step in range(2, 40):  # the event file's flush comes from tensorboardX's thread, a moment later
            writer.write(step, {"loss": 1.0})
            writer._tb.flush()
            time.sleep(0.05)
    with pytest.raises(OSError, match=rf"cannot write {gcs}/run/metrics.jsonl"):
        writer._jsonl.close()
