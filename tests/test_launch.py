"""The launchers: local.sh (N local processes), gpu_slurm.sh (sbatch -> srun -> JAX's SLURM detection) and
tpu_pod.sh (gcloud). One real 2-process training (the SLURM task body), which local.sh's 2 processes then resume;
stubs stand in for sbatch, srun, gcloud, and for the trainer where only local.sh's process handling is tested."""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, assert_invocations

BASH = shutil.which("bash")
SLURM_PORT_BASE = 65535 - 2**12 + 1  # jax's SlurmCluster: coordinator port = this + SLURM_JOB_ID % 4096


def clean_env(**extra) -> dict[str, str]:
    """This environment without SLURM, launcher or coordinator variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "M3JAX_", "JAX_COORDINATOR", "TPU_")) and k not in ("NUM_PROCESSES",)}
    env.update(extra)
    return env


def cpu_env(devices: int, **extra) -> dict[str, str]:
    return clean_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                     PY=sys.executable, **extra)


def write_stub(path: Path, body: str) -> Path:
    """An executable Python script at `path` that records its argv (and M3JAX_* variables) as a JSON line."""
    path.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    env = {{k: v for k, v in os.environ.items() if k.startswith("M3JAX_")}}
    f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "args": args, "env": env}}) + "\\n")
{body}
""")
    path.chmod(0o755)
    return path


def read_calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def train_args(workdir: Path, data_dir: str) -> list[str]:
    return ["tests/lm_test_config.py", f"--workdir={workdir}", f"--config.data.path={data_dir}",
            "--config.train.num_steps=2"]


def assert_two_process_run(workdir: Path, logs: list[str], expected: list[tuple[int, bool, int]]) -> None:
    """Both processes joined one jax.distributed run over 2 x 2 devices; the run's invocations were `expected`
    ((start step, resumed, last step) each, see conftest.assert_invocations) and it holds checkpoint 2."""
    for i, text in enumerate(logs):
        assert f"jax.distributed: process {i} of 2, 2 local / 4 global devices" in text, text[-3000:]
        assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1} on 2 processes" in text, text[-3000:]
    assert_invocations(workdir, expected)
    assert (workdir / "checkpoints" / "2" / "state").is_dir()


# ---------------------------------------------------------------------------------------------------- SLURM


def slurm_job_id_with_free_port() -> int:
    """A job id whose derived coordinator port (jax's SlurmCluster rule) is free on this machine."""
    for port in random.sample(range(SLURM_PORT_BASE, 65536), 64):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return 7 * 2**12 + port - SLURM_PORT_BASE
    raise RuntimeError("no free port in jax's SLURM coordinator range")


@pytest.fixture(scope="module")
def slurm_run(lm_data, tmp_path_factory):
    """Mode (c), run once: two tasks of one fake SLURM step train 2 steps on 2 x 2 CPU devices. Returns the run's
    directory, the tasks' outputs and the coordinator port that jax derived from the job id."""
    root = tmp_path_factory.mktemp("slurm_run")
    job_id = slurm_job_id_with_free_port()
    procs = []
    for i in range(2):
        env = cpu_env(2, SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                      SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0", SLURM_STEP_NUM_NODES="1")
        with open(root / f"task_{i}.log", "w") as log:
            procs.append(subprocess.Popen([BASH, "launch/gpu_slurm.sh", *train_args(root / "run", lm_data)],
                                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    for p in procs:
        p.wait(timeout=600)
    texts = [(root / f"task_{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    return root / "run", texts, SLURM_PORT_BASE + job_id % 2**12


@pytest.mark.slow
def test_slurm_task_body_trains_with_two_processes(slurm_run):
    """jax.distributed.initialize() found both tasks from SLURM_* alone: no coordinator was passed."""
    workdir, texts, port = slurm_run
    assert f"Connecting to JAX distributed service on 127.0.0.1:{port}" in texts[1]
    assert_two_process_run(workdir, texts, [(0, False, 2)])


def test_slurm_submits_itself_then_sruns_one_task_per_gpu(tmp_path):
    """Mode (a) under a stub sbatch, then mode (b) run from a spooled copy of the script under a stub srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(bin_dir / "sbatch", "print('Submitted batch job 4242')")
    write_stub(bin_dir / "srun", "")
    log = tmp_path / "calls.jsonl"
    args = ["configs/warmup.py", "--workdir=/shared/run", "--config.run_name=a b"]
    output = tmp_path / "slurm" / "%x-%j.out"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log), NODES="2", GPUS_PER_NODE="4",
                    TIME="02:00:00", PARTITION="gpu", ACCOUNT="proj", JOB_NAME="m3", OUTPUT=str(output))
    r = subprocess.run([BASH, f"{REPO}/launch/gpu_slurm.sh", *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Submitted batch job 4242" in r.stdout
    [sbatch] = read_calls(log)
    script = f"{REPO}/launch/gpu_slurm.sh"
    assert sbatch["prog"] == "sbatch"
    assert sbatch["args"] == [
        "--job-name=m3", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=02:00:00",
        f"--output={output}", f"--chdir={REPO}", "--export=ALL", "--partition=gpu", "--account=proj", script, *args]
    assert sbatch["env"] == {"M3JAX_REPO": REPO, "M3JAX_SLURM_STEP": "batch"}
    assert output.parent.is_dir()

    # The batch step runs a copy of the script from SLURM's spool directory, with SLURM_PROCID=0 set.
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(script, spool / "slurm_script")
    log.unlink()
    batch_env = {**env, **sbatch["env"], "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    r = subprocess.run([BASH, str(spool / "slurm_script"), *args], cwd=spool, env=batch_env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    [srun] = read_calls(log)
    assert srun["prog"] == "srun"
    assert srun["args"] == ["--kill-on-bad-exit=1", "--label", "bash", script, *args]
    assert srun["env"]["M3JAX_SLURM_STEP"] == "task"


def test_slurm_without_sbatch_fails_clearly(tmp_path):
    r = subprocess.run([BASH, f"{REPO}/launch/gpu_slurm.sh", "configs/warmup.py"], cwd=tmp_path,
                       env=clean_env(PATH=str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 127
    assert "sbatch not found" in r.stderr


# ---------------------------------------------------------------------------------------------------- TPU pod

GCLOUD_STUB = """
if "describe" in args:
    print("10.0.0.1;10.0.0.2;10.0.0.3;10.0.0.4")
elif "scp" in args:
    import tarfile
    with tarfile.open(args[args.index("scp") + 1]) as t:
        print("\\n".join(t.getnames()), file=open(os.environ["STUB_LOG"] + ".tar", "w"))
elif "ssh" in args:
    worker = next(a for a in args if a.startswith("--worker="))[len("--worker="):]
    print(f"hello from worker {worker}")
    if worker == os.environ.get("STUB_FAIL_WORKER"):
        print("worker crashed", file=sys.stderr)
        sys.exit(1)
"""
TPU_ARGS = ["configs/warmup.py", "--workdir=gs://bucket/runs/run", "--config.data.path=/tmp/gcs/data/prepared",
            "--config.run_name=it's a run"]


def run_tpu_pod(tmp_path: Path, args=TPU_ARGS, path: str | None = None, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_stub(bin_dir / "gcloud", GCLOUD_STUB)
    full_env = clean_env(PATH=path if path is not None else f"{bin_dir}:{os.environ['PATH']}",
                         STUB_LOG=str(tmp_path / "calls.jsonl"), LOG_DIR=str(tmp_path / "logs"), **env)
    return subprocess.run([BASH, f"{REPO}/launch/tpu_pod.sh", *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=120)


def argv_of(command: str) -> list[str]:
    """The training command a worker's shell runs: everything after `exec`, split by bash itself."""
    setup, train = command.split("; exec ", 1)
    out = subprocess.run([BASH, "-c", f"printf '%s\\0' {train}"], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


@pytest.mark.parametrize("config", ["configs/warmup.py", "configs/continued.py"])
def test_tpu_pod_copies_installs_and_starts_every_worker(tmp_path, config):
    args = [config, *TPU_ARGS[1:]]
    r = run_tpu_pod(tmp_path, args, TPU_NAME="pod", ZONE="us-central2-b", PROJECT="proj",
                    GCSFUSE="gs://data:/tmp/gcs/data,more:/mnt/more")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr  # a gs:// workdir: every worker sees it
    calls = [c["args"] for c in read_calls(tmp_path / "calls.jsonl")]
    where = ["--zone=us-central2-b", "--project=proj"]
    assert calls[0][:4] == ["compute", "tpus", "tpu-vm", "describe"] and calls[0][4] == "pod"
    assert all(w in calls[0] for w in where)
    scp = calls[1]
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5].startswith("pod:/tmp/m3jax-code-") and all(w in scp for w in where)
    packed = (tmp_path / "calls.jsonl.tar").read_text().split()
    assert "m3jax/parallel.py" in packed and "launch/tpu_pod.sh" in packed and config in packed
    assert not any(n.startswith((".venv/", ".git/", "runs/")) for n in packed)

    ssh = {int(next(a for a in c if a.startswith("--worker="))[len("--worker="):]): c for c in calls[2:]}
    assert len(calls) == 6 and sorted(ssh) == [0, 1, 2, 3]  # one session per worker, started together
    for i, c in ssh.items():
        assert c[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"] and all(w in c for w in where)
        command = next(a for a in c if a.startswith("--command="))[len("--command="):]
        assert "pip install --quiet -r requirements.txt -r requirements-tpu.txt" in command
        assert "pip install --quiet --no-deps -e ." in command
        # The data bucket is mounted (read-only, once) before the trainer starts.
        mount = "mkdir -p {1}; mountpoint -q {1} || gcsfuse --implicit-dirs -o ro {0} {1}; "
        assert mount.format("data", "/tmp/gcs/data") + mount.format("more", "/mnt/more") + "cd m3jax;" in command
        assert f"python -m m3jax.train --config={config}" in command
        assert argv_of(command) == [
            ".venv/bin/python", "-m", "m3jax.train", f"--config={config}", *TPU_ARGS[1:],
            "--config.distributed.coordinator_address=10.0.0.1:8482", "--config.distributed.num_processes=4",
            f"--config.distributed.process_id={i}"]
        assert (tmp_path / "logs" / f"worker_{i}.log").read_text() == f"hello from worker {i}\n"


def test_tpu_pod_names_the_failed_worker(tmp_path):
    r = run_tpu_pod(tmp_path, TPU_NAME="pod", ZONE="z", STUB_FAIL_WORKER="2")
    assert r.returncode != 0
    assert f"FAILED: worker 2, log: {tmp_path}/logs/worker_2.log" in r.stderr
    assert "FAILED: worker 0" not in r.stderr and "FAILED: worker 3" not in r.stderr
    assert "worker crashed" in (tmp_path / "logs" / "worker_2.log").read_text()


def test_tpu_pod_warns_of_a_local_workdir_and_refuses_a_bad_mount(tmp_path):
    r = run_tpu_pod(tmp_path, ["configs/warmup.py", "--workdir=/mnt/run"], TPU_NAME="pod", ZONE="z")
    assert r.returncode == 0, r.stderr
    assert "warning: /mnt/run is not a gs:// URL: every worker must see it (a shared mount)" in r.stderr
    r = run_tpu_pod(tmp_path, TPU_NAME="pod", ZONE="z", GCSFUSE="data:relative/dir")
    assert r.returncode == 2 and "GCSFUSE entry 'data:relative/dir' is not BUCKET:/MOUNT/POINT" in r.stderr


@pytest.mark.parametrize("missing", ["TPU_NAME", "ZONE", "gcloud"])
def test_tpu_pod_fails_clearly_without_its_settings(tmp_path, missing):
    env = {"TPU_NAME": "pod", "ZONE": "z"}
    if missing != "gcloud":
        del env[missing]
    r = run_tpu_pod(tmp_path, path=str(tmp_path / "empty") if missing == "gcloud" else None, **env)
    assert r.returncode == 2
    assert missing in r.stderr
    assert not (tmp_path / "calls.jsonl").exists()


# ---------------------------------------------------------------------------------------------------- local.sh


@pytest.mark.slow
def test_local_two_processes_resume_a_run(slurm_run, lm_data, tmp_path):
    """NUM_PROCESSES=2: two local processes join one jax.distributed run (explicit coordinator on 127.0.0.1) and
    restore the SLURM run's step-2 checkpoint together: the invocation starts at step 2, resumed, and trains none
    (the run has 2 steps). Training itself is covered once, by the SLURM run."""
    workdir = tmp_path / "run"
    shutil.copytree(slurm_run[0], workdir)
    r = subprocess.run([BASH, "launch/local.sh", *train_args(workdir, lm_data)], cwd=REPO,
                       env=cpu_env(2, NUM_PROCESSES="2"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [(workdir / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    for text in logs:
        assert f"resumed from {workdir}/checkpoints/2 at step 2" in text, text[-3000:]
    assert_two_process_run(workdir, logs, [(0, False, 2), (2, True, 2)])
    assert "resumed from" in r.stdout  # process 0 is followed on the terminal
    assert "127.0.0.1:" in r.stderr and f"{workdir}/logs/process_<i>.log" in r.stderr


FAKE_TRAINER = """#!/usr/bin/env bash
# Stands in for python: `-c` goes to the real one; a trainer records its pid and how it ends.
if [[ $1 == -c ]]; then exec "$REAL_PY" "$@"; fi
last=${!#}
id=${last#--config.distributed.process_id=}
trap 'echo TERM >"$OUT/ended_$id"; exit 143' TERM
echo $$ >"$OUT/pid_$id"
echo "trainer $id up"
if [[ $id == "$FAIL_ID" ]]; then
  while [[ ! -e $OUT/pid_0 ]]; do sleep 0.05; done  # crash once process 0 is up
  echo "trainer $id crashed"; exit 3
fi
for ((n = 0; n < 600; n++)); do sleep 0.05; done  # at most ~30 s, should a test leave it behind
"""


def start_fake_local(tmp_path: Path, fail_id: str = "") -> subprocess.Popen:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    env = clean_env(PY=str(fake), REAL_PY=sys.executable, OUT=str(tmp_path), FAIL_ID=fail_id, NUM_PROCESSES="2")
    # SIGINT at its default, as in a terminal: a test run started in the background (CI under nohup ... &) has it
    # ignored, and a shell cannot trap a signal ignored at its start.
    return subprocess.Popen([BASH, "launch/local.sh", "configs/demo.py", f"--workdir={tmp_path}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_local_failure_stops_the_others_and_names_the_process(tmp_path):
    proc = start_fake_local(tmp_path, fail_id="1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert f"FAILED: process 1 exited 3; see {tmp_path}/logs/process_1.log" in err
    assert (tmp_path / "ended_0").read_text() == "TERM\n"  # process 0 was stopped
    assert "trainer 1 crashed" in (tmp_path / "logs" / "process_1.log").read_text()
    assert "trainer 0 up" in out


VICTIM_TRAINER = """#!/usr/bin/env bash
# Process 1 fails on its own and is slow to exit; process 0 then dies of it (as a collective timing out would) and
# exits at once, before process 1. Each prints the line m3jax.train prints when it fails.
if [[ $1 == -c ]]; then exec "$REAL_PY" "$@"; fi
last=${!#}
id=${last#--config.distributed.process_id=}
if [[ $id == 1 ]]; then
  echo "m3jax.train: failed at $(date +%s.%N) (ConfigError)" >&2; touch "$OUT/failed_1"; sleep 1.5; exit 1
fi
while [[ ! -e $OUT/failed_1 ]]; do sleep 0.05; done
sleep 0.2; echo "m3jax.train: failed at $(date +%s.%N) (JaxRuntimeError)" >&2; exit 4
"""


def test_local_names_the_process_whose_error_came_first(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text(VICTIM_TRAINER)
    fake.chmod(0o755)
    env = clean_env(PY=str(fake), REAL_PY=sys.executable, OUT=str(tmp_path), NUM_PROCESSES="2")
    r = subprocess.run([BASH, "launch/local.sh", "configs/demo.py", f"--workdir={tmp_path}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert "process 0 failed (exit 4)" in r.stderr  # process 0 exited first ...
    assert re.search(rf"FAILED: process 1 exited \d+; see {re.escape(str(tmp_path))}/logs/process_1.log",
                     r.stderr)  # ... but process 1's error came first (it exits 143: stopped while exiting)
    assert r.returncode != 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_local_passes_signals_on(tmp_path, sig):
    proc = start_fake_local(tmp_path)
    deadline = time.time() + 30
    while not all((tmp_path / f"pid_{i}").exists() for i in range(2)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert [(tmp_path / f"ended_{i}").read_text() for i in range(2)] == ["TERM\n", "TERM\n"]


def test_local_rejects_a_bad_process_count():
    r = subprocess.run([BASH, "launch/local.sh", "configs/demo.py"], cwd=REPO, env=clean_env(NUM_PROCESSES="two"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "NUM_PROCESSES" in r.stderr


def test_shell_syntax():
    for script in ("local.sh", "gpu_slurm.sh", "tpu_pod.sh"):
        subprocess.run([BASH, "-n", f"{REPO}/launch/{script}"], check=True)
