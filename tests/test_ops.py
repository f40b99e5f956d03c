"""Operations at scale: the loss-spike guard, preemption across processes, profiling and the step-time breakdown."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, lm_config
from test_multiprocess import free_port
from test_train import read_losses

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
    config = lm_config(lm_data, num_steps=5)
    config.train.update(profile_start=2, profile_steps=2, log_every=1)
    seen = []  # a hook of the caller's: every 2 steps and at the end, after the built-in ones
    loop.train(config, str(tmp_path), hooks=[Hook(lambda info: seen.append((info.step, info.final)), every=2)])
    assert seen == [(2, False), (4, False), (5, True)]
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    for r in read_records(tmp_path, "train"):
        assert r["step_time_s"] > 0 and 0 <= r["data_wait_s"] <= r["step_time_s"]
        assert r["compute_s"] == pytest.approx(r["step_time_s"] - r["data_wait_s"])


def start_process(i, port, workdir, data_dir, *overrides):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "m3jax.train", "--config=tests/lm_test_config.py", f"--workdir={workdir}",
           f"--config.data.path={data_dir}", "--verbosity=0",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
           f"--config.distributed.process_id={i}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_preemption_of_one_process_saves_the_same_step_on_both(lm_data, tmp_path):
    """SIGTERM to process 1 only: both processes save one common step and exit; the resumed run's losses equal
    an uninterrupted run's."""
    args = ("--config.train.num_steps=400", "--config.train.checkpoint_every=1000", "--config.mesh.fsdp=2",
            "--config.train.eval_every=0")
    port = free_port()
    procs = [start_process(i, port, tmp_path, lm_data, *args) for i in range(2)]
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").exists() or max(read_losses(tmp_path), default=0) < 3:
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == loop.PREEMPTED_EXIT_CODE, err[-3000:]
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 400, saved
    step = saved[0]
    print(f"SIGTERM to process 1 at step >= 3; both saved step {step}")
    for _, err in outs:  # each process says it saved that step
        assert f"preemption notice: saved step {step}" in err

    port = free_port()
    procs = [start_process(i, port, tmp_path, lm_data, *args, f"--config.train.stop_at={step + 3}") for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    got = read_losses(tmp_path)

    straight = lm_config(lm_data, num_steps=400, stop_at=step + 3, mesh=dict(data=-1, fsdp=2, tensor=1))
    want = loop.train(straight, str(tmp_path / "straight"))["losses"]
    assert sorted(got) == list(range(1, step + 4))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5)


def test_sigterm_to_a_single_process_saves_and_resumes_exactly(lm_data, tmp_path):
    def hook(step, batch):
        if step == 3:  # the notice arrives while step 3 is being prepared: step 3 is the one saved
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    first = loop.train(lm_config(lm_data, num_steps=6), str(tmp_path / "run"), batch_hook=hook)
    assert first["preempted_at"] == 3 and first["end_step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone again
    resumed = loop.train(lm_config(lm_data, num_steps=6), str(tmp_path / "run"))
    straight = loop.train(lm_config(lm_data, num_steps=6), str(tmp_path / "straight"))
    assert resumed["start_step"] == 3
    assert [resumed["losses"][s] for s in (4, 5, 6)] == [straight["losses"][s] for s in (4, 5, 6)]
