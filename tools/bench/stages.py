"""Benchmarks that run the project's tools as a pipeline of stages (tools/bench/stage2_*.py).

A stage is a named step whose wall time is recorded in WORKDIR/stages/NAME.json; with `reuse` a stage whose record
exists is skipped, and `share` takes finished stages of another workdir (their directories linked), so that a sweep
point reruns only what its own settings change. Each tool runs in a subprocess on one CPU device, its output in
WORKDIR/logs/STAGE.log; with `compile_cache` the subprocesses share a persistent XLA compilation cache in
WORKDIR/jax_cache, so that runs of one program (seeds and arms of a config) compile it once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Bench:
    """The stages of one workdir."""

    def __init__(self, workdir: Path, reuse: bool, compile_cache: bool = False):
        self.dir = workdir
        self.stages = workdir / "stages"
        self.stages.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}
        self.current = ""
        self.reuse = reuse
        self.shared: set[str] = set()
        self.compile_cache = compile_cache

    def share(self, source: Path, dirs: dict[str, tuple[str, ...]]) -> None:
        """Takes `source`'s finished stages named in `dirs` (stage -> the directories it wrote): their directories are
        linked into this workdir and their records copied, so that they are skipped here."""
        for name, stage_dirs in dirs.items():
            record = source / "stages" / f"{name}.json"
            if not record.exists():
                continue
            for d in stage_dirs:
                if not (self.dir / d).exists():
                    (self.dir / d).symlink_to(source / d)
            (self.stages / f"{name}.json").write_text(record.read_text())
            self.shared.add(name)

    def path(self, *parts) -> str:
        return str(self.dir.joinpath(*parts))

    def stage(self, name: str, fn) -> None:
        """Runs `fn` unless the stage's record exists and it is reused or shared; records its wall time."""
        record = self.stages / f"{name}.json"
        if record.exists() and (self.reuse or name in self.shared):
            self.seconds[name] = json.loads(record.read_text())["seconds"]
            print(f"== {name}: reused ({self.seconds[name]:.0f} s when it ran)", flush=True)
            return
        print(f"== {name}", flush=True)
        self.current = name
        t0 = time.perf_counter()
        fn()
        self.seconds[name] = time.perf_counter() - t0
        record.write_text(json.dumps({"seconds": self.seconds[name]}))
        print(f"   {name}: {self.seconds[name]:.0f} s", flush=True)

    def run(self, *args: str) -> None:
        """A repository tool or module in a subprocess (one CPU device); its output goes to WORKDIR/logs."""
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
        env.pop("XLA_FLAGS", None)
        if self.compile_cache:
            env.update(JAX_COMPILATION_CACHE_DIR=str(self.dir / "jax_cache"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
        log = self.dir / "logs" / f"{self.current}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            tail = log.read_text()[-3000:]
            sys.exit(f"{Path(sys.argv[0]).name}: {' '.join(args[:2])} failed (exit {done.returncode}); {log}:\n{tail}")


def metrics(run_dir: str | Path, split: str) -> dict[int, dict]:
    """A training run's records of `split` ("train", "eval") in its metrics.jsonl, by step; a step logged twice
    (a stage rerun resumed the run) keeps its last record."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records if r.get("split") == split}
