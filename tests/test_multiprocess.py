"""A real 2-process run: jax.distributed on 127.0.0.1 (gloo), 2 x 4 CPU devices, trains, saves, restores."""

import os
import socket
import subprocess
import sys

import numpy as np
from conftest import REPO, lm_config
from test_train import read_losses

from m3jax.train import loop


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


def test_two_processes_train_save_and_restore(lm_data, tmp_path):
    args = ("--config.train.num_steps=6", "--config.train.checkpoint_every=6", "--config.mesh.fsdp=2")
    run_two_processes(tmp_path, lm_data, *args, "--config.train.stop_at=3")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    run_two_processes(tmp_path, lm_data, *args)  # restores step 3 on both processes, continues to 6
    got = read_losses(tmp_path)

    single = loop.train(lm_config(lm_data, num_steps=6, mesh=dict(data=-1, fsdp=2, tensor=1)), str(tmp_path / "one"))
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [single["losses"][s] for s in range(1, 7)],
                               rtol=1e-5)


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
