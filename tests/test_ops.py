"""Operations at scale: the loss-spike guard, preemption across processes, profiling and the step-time breakdown."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (
    REFERENCE,
    REFERENCE_FLAGS,
    REPO,
    assert_invocations,
    committed_steps,
    guard_state,
    lm_config,
    reference_config,
)
from test_multiprocess import free_port

from m3jax.config import base_config
from m3jax.train import loop
from m3jax.train.guard import LossSpikeError, SpikeGuard
from m3jax.train.hooks import Hook


def guarded_config(data_dir, **train):
    c = lm_config(data_dir, num_steps=train.pop("num_steps", 14))
    c.train.update(checkpoint_every=3, log_every=1, **train)
    c.spike_guard.update(min_steps=4, window=8, threshold=4.0, min_increase=0.5, max_rescues=2, lr_factor=0.5)
    return c


def corrupt(batch):
    """A corrupted batch: every target replaced by one fixed token, as a broken shard might read."""
    out = dict(batch)
    out["targets"] = np.full_like(batch["targets"], 7)
    return out


def read_records(workdir, split):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_guard_statistics_match_an_exponential_average():
    cfg = base_config().spike_guard
    cfg.update(window=10, min_steps=5, threshold=3.0, min_increase=0.01)
    guard, rng = SpikeGuard(cfg), np.random.default_rng(0)
    losses = 5.0 + 0.05 * rng.standard_normal(40)
    mean, var, a = losses[0], 0.0, 0.1  # independent recurrence: exponentially weighted mean and variance
    for i, x in enumerate(losses):
        guard.update(float(x))
        if i:
            mean, var = mean + a * (x - mean), (1 - a) * (var + a * (x - mean) ** 2)
    assert guard.mean == pytest.approx(mean) and guard.var == pytest.approx(var)
    sd = math.sqrt(var)
    assert guard.is_spike(float("nan")) and guard.is_spike(float("inf"))
    assert not guard.is_spike(mean + 2 * sd) and guard.is_spike(mean + 4 * sd)
    guard.min_increase = 10 * sd
    assert not guard.is_spike(mean + 4 * sd)  # a z-score alone is not enough when the noise is tiny
    fresh = SpikeGuard(cfg)
    fresh.update(5.0)
    assert not fresh.is_spike(50.0) and fresh.is_spike(float("nan"))  # too few losses to judge, except non-finite


def test_spike_is_rescued_and_the_run_goes_on(lm_data, tmp_path):
    seen = {"corrupted": 0}

    def hook(step, batch):
        if step == 9 and not seen["corrupted"]:
            seen["corrupted"] += 1
            return corrupt(batch)
        return batch

    summary = loop.train(guarded_config(lm_data), str(tmp_path), batch_hook=hook)
    assert seen["corrupted"] == 1
    assert [(r["step"], r["restored_from"]) for r in summary["rescues"]] == [(9, 6)]
    assert summary["end_step"] == 14
    spikes = read_records(tmp_path, "spike")
    assert len(spikes) == 1 and spikes[0]["loss"] > spikes[0]["running_mean"] + 1.0
    train = {r["step"]: r for r in read_records(tmp_path, "train")}  # later lines win for replayed steps
    assert all(math.isfinite(train[s]["loss"]) for s in range(1, 15))
    assert train[14]["loss"] < spikes[0]["running_mean"]  # it went on learning
    # The learning rate after the rescue is half the schedule's: compare with the logged LR before the spike.
    unscaled = {r["step"]: r["lr"] for r in read_records(tmp_path, "train")[:8]}
    assert train[7]["lr"] == pytest.approx(0.5 * unscaled[7], rel=1e-6)
    resumed = loop.train(guarded_config(lm_data, num_steps=15), str(tmp_path))  # the rescue log is checkpointed
    assert resumed["start_step"] == 14 and [r["step"] for r in resumed["rescues"]] == [9]


def test_repeated_spikes_stop_the_run_with_a_clear_message(lm_data, tmp_path):
    def hook(step, batch):
        return corrupt(batch) if step == 9 else batch

    with pytest.raises(LossSpikeError, match=r"loss spike at step 9.*max_rescues=2.*checkpoints/6"):
        loop.train(guarded_config(lm_data), str(tmp_path), batch_hook=hook)
    assert len(read_records(tmp_path, "spike")) == 3
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert max(steps) == 6  # nothing after the last good step was saved


def test_profile_and_step_time_breakdown(lm_data, tmp_path):
    """The trace of the profiled steps is written; each step's data wait includes a known delay in delivering its
    batch, its compute time is the rest of the step, and tokens/s counts the global batch over the step time."""
    config = lm_config(lm_data, num_steps=5)
    config.train.update(profile_start=2, profile_steps=2, log_every=1)
    delay = 0.1

    def slow_data(step, batch):
        time.sleep(delay)  # the iterator is this much slower at delivering every batch
        return batch

    seen = []  # a hook of the caller's: every 2 steps and at the end, after the built-in ones
    loop.train(config, str(tmp_path), batch_hook=slow_data,
               hooks=[Hook(lambda info: seen.append((info.step, info.final)), every=2)])
    assert seen == [(2, False), (4, False), (5, True)]
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    records = read_records(tmp_path, "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    tokens_per_step = config.data.global_batch_size * config.data.seq_len  # every process's rows, all devices
    for r in records:
        step, wait, step_time = r["step"], r["data_wait_s"], r["step_time_s"]
        # reading the batch itself takes milliseconds
        assert delay <= wait < delay + 0.5, f"step {step}: data wait {wait:.4f} s, the batch came {delay} s late"
        assert r["compute_s"] > 0, r  # the step itself is timed too
        assert r["tokens_per_s"] == pytest.approx(tokens_per_step / step_time, rel=1e-6), (
            f"step {step}: {r['tokens_per_s']:.1f} tokens/s, but {tokens_per_step} tokens in {step_time:.4f} s")


def test_a_fault_point_stops_the_process_there_and_nowhere_else():
    """M3JAX_FAULT arms one point at one count: the process signals itself there (after count 1 is done, before 2
    is) and at no other point or count; a malformed value is refused, naming the variable."""
    code = ("from m3jax import faults\n"
            "for n in (1, 2, 3):\n    faults.reached('after_step', n)\n    print(n, flush=True)")

    def run(fault):
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "M3JAX_FAULT": fault},
                              capture_output=True, text=True, timeout=60)

    killed, termed, elsewhere, bad = (run(f) for f in ("kill_after_step:2", "term_after_step:3",
                                                       "kill_after_save_begins:2", "kill_after_step"))
    assert (killed.returncode, killed.stdout) == (-signal.SIGKILL, "1\n"), killed.stderr
    assert (termed.returncode, termed.stdout) == (-signal.SIGTERM, "1\n2\n"), termed.stderr
    assert (elsewhere.returncode, elsewhere.stdout) == (0, "1\n2\n3\n"), elsewhere.stderr
    assert bad.returncode == 1 and "M3JAX_FAULT='kill_after_step': expected <action>_<point>:<n>" in bad.stderr


def start_process(i, port, workdir, data_dir, *overrides, fault=""):
    """Process `i` of a 2-process trainer (4 CPU devices each), with `fault` as M3JAX_FAULT (m3jax/faults.py)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "M3JAX_FAULT": fault}
    cmd = [sys.executable, "-m", "m3jax.train", "--config=tests/lm_test_config.py", f"--workdir={workdir}",
           f"--config.data.path={data_dir}", "--verbosity=0",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
           f"--config.distributed.process_id={i}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_preemption_of_one_process_saves_the_same_step_on_both(lm_data, reference_run, tmp_path):
    """SIGTERM to process 1 alone, right after its step 3 (fault point): both processes agree on one step S, save
    it, and exit 143. Rerun, both resume from S and train steps S+1..9; every loss, and the spike guard's
    statistics, equal the uninterrupted run's up to cross-process float rounding."""
    port = free_port()
    procs = [start_process(i, port, tmp_path, lm_data, *REFERENCE_FLAGS, fault="term_after_step:3" if i else "")
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == loop.PREEMPTED_EXIT_CODE, err[-3000:]
    said = {int(m) for _, err in outs for m in re.findall(r"preemption notice: saved step (\d+)", err)}
    assert len(said) == 1, outs[0][1][-3000:]  # each process says it saved the same step
    step = said.pop()
    print(f"SIGTERM to process 1 after step 3; both saved step {step}")
    # JAX's preemption sync picks S (any step from 3 on, by timing): the periodic saves up to S and S itself, of
    # which the run keeps the last train.keep_checkpoints
    every, keep = REFERENCE["train.checkpoint_every"], REFERENCE["train.keep_checkpoints"]
    assert 3 <= step < 9 and committed_steps(tmp_path) == sorted(set(range(every, step + 1, every)) | {step})[-keep:]
    assert_invocations(tmp_path, [(0, False, step)], reference_run["losses"], rtol=1e-5)

    port = free_port()
    procs = [start_process(i, port, tmp_path, lm_data, *REFERENCE_FLAGS) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    assert_invocations(tmp_path, [(0, False, step), (step, True, 9)], reference_run["losses"], rtol=1e-5)
    got, want = guard_state(tmp_path, 9), guard_state(reference_run["workdir"], 9)
    assert got["count"] == want["count"] and got == pytest.approx(want, rel=1e-5)


def test_sigterm_to_a_single_process_saves_and_resumes_exactly(lm_data, reference_run, tmp_path, monkeypatch):
    """SIGTERM while step 4 is being prepared: step 4 is trained, saved and the run exits. Rerun, it resumes from
    step 4 and trains steps 5-9: losses and the spike guard's statistics (restored from the checkpoint, then
    updated) equal the uninterrupted run's bit for bit. Negative control: a guard that does not restore them is
    caught by the same check."""
    def preempt(step, batch):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    run, planted = tmp_path / "run", tmp_path / "planted"
    first = loop.train(reference_config(lm_data), str(run), batch_hook=preempt)
    assert first["preempted_at"] == 4 and first["end_step"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone again
    assert committed_steps(run) == [3, 4]
    shutil.copytree(run / "checkpoints", planted / "checkpoints")
    resumed = loop.train(reference_config(lm_data), str(run))
    assert resumed["resumed_from"] == 4
    assert_invocations(run, [(0, False, 4), (4, True, 9)], reference_run["losses"])
    for step in (6, 9):
        assert guard_state(run, step) == guard_state(reference_run["workdir"], step), f"spike guard at step {step}"

    monkeypatch.setattr(SpikeGuard, "load_state_dict", lambda self, state: None)
    loop.train(reference_config(lm_data), str(planted))
    assert_invocations(planted, [(4, True, 9)], reference_run["losses"])  # the losses cannot tell
    assert guard_state(planted, 9) != guard_state(reference_run["workdir"], 9)
