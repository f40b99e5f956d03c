"""A real 2-process run: jax.distributed on 127.0.0.1 (gloo), 2 x 4 CPU devices, trains, saves, restores."""

import os
import socket
import subprocess
import sys

import pytest
from conftest import REFERENCE_FLAGS, REPO, assert_invocations, committed_steps, guard_state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, data_dir, *overrides):
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "m3jax.train", "--config=tests/lm_test_config.py", f"--workdir={workdir}",
             f"--config.data.path={data_dir}", "--verbosity=-1",
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_processes_train_save_and_restore(lm_data, reference_run, tmp_path):
    """Two processes train steps 1-3 and save; rerun, both restore step 3 and train steps 4-9. Every loss, and the
    spike guard's statistics, equal the 1-process reference run's (same mesh) up to cross-process float rounding."""
    run_two_processes(tmp_path, lm_data, *REFERENCE_FLAGS, "--config.train.stop_at=3")
    assert committed_steps(tmp_path) == [3]
    run_two_processes(tmp_path, lm_data, *REFERENCE_FLAGS)
    assert committed_steps(tmp_path) == [6, 9]
    assert_invocations(tmp_path, [(0, False, 3), (3, True, 9)], reference_run["losses"], rtol=1e-5)
    got, want = guard_state(tmp_path, 9), guard_state(reference_run["workdir"], 9)
    assert got["count"] == want["count"] and got == pytest.approx(want, rel=1e-5)


def test_processes_given_different_settings_stop_naming_them(lm_data, tmp_path):
    """Two processes of one run, one of them given another learning rate and batch seed: both stop at start-up,
    naming each differing key and its value on each process; nothing is trained."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    extra = [[], ["--config.optimizer.peak_lr=0.001", "--config.data.shuffle_seed=7"]]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "m3jax.train", "--config=tests/lm_test_config.py", f"--workdir={tmp_path}",
             f"--config.data.path={lm_data}", "--verbosity=-1",
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", *extra[i]],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode != 0
        assert ("ConfigError: the 2 processes of this run were given different settings: data.shuffle_seed: "
                "process 0 0, process 1 7; optimizer.peak_lr: process 0 0.01, process 1 0.001") in err, err[-3000:]
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
