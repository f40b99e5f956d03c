"""What hangs off the training loop: periodic hooks (logging, held-out evaluation, checkpoints, profiling).

A hook is a function of a `StepInfo`, run after every `every`-th good step (a step the spike guard did not roll
back), at the invocation's last step when `at_end`, and before the first step when `at_start`. The loop runs
them in the order they were added; their wall time is not counted as training time in the throughput figures.
Held-out evaluations share one hook, so that their metrics share one line (`m3jax.train.loop.evaluation`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from m3jax import paths


@dataclasses.dataclass
class StepInfo:
    step: int  # steps done
    state: Any  # the TrainState after them
    metrics: dict | None  # the last step's metrics on device (None before the first step)
    final: bool  # the last step of this invocation (train.stop_at or num_steps)


@dataclasses.dataclass
class Hook:
    fn: Callable[[StepInfo], None]
    every: int  # 0 = only at the start / end, as flagged
    at_start: bool = False
    at_end: bool = True

    def due(self, info: StepInfo) -> bool:
        if info.metrics is None:
            return self.at_start
        return bool(self.every and info.step % self.every == 0) or (self.at_end and info.final)


class Throughput:
    """Wall time per step since the last report, split into time blocked on data and the rest (dispatch and
    compute); hook time is left out."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps, self.data_wait, self.excluded, self.taken = time.perf_counter(), 0, 0.0, 0.0, False

    def step(self, data_wait: float) -> None:
        self.steps += 1
        self.data_wait += data_wait

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (hooks) out; a window reported during them restarts once they are done."""
        if self.taken:
            self.reset()
        else:
            self.excluded += seconds

    def take(self) -> dict[str, float]:
        dt = time.perf_counter() - self.t0 - self.excluded
        out = {"step_time_s": dt / self.steps, "data_wait_s": self.data_wait / self.steps}
        out["compute_s"] = out["step_time_s"] - out["data_wait_s"]
        out["data_wait_frac"] = self.data_wait / dt
        self.taken = True
        return out


def log_hook(every: int, writer, meter: Throughput, summary: dict, *, tokens_per_step: int,
             flops_per_token: float, peak_flops: float) -> Hook:
    """Training metrics (loss, lr, gradient norm, tokens/s, MFU, step-time split) to the metric writer."""
    from m3jax.train import flops as flops_lib

    def fn(info: StepInfo) -> None:
        m = {k: float(v) for k, v in jax.device_get(info.metrics).items()}
        if not np.isfinite(m["loss"]):
            raise FloatingPointError(f"non-finite loss {m['loss']} at step {info.step}")
        timing = meter.take()
        m["tokens_per_s"] = tokens_per_step / timing["step_time_s"]
        m["mfu"] = flops_lib.mfu(m["tokens_per_s"], flops_per_token, 1, peak_flops)
        m.update(timing)
        writer.write(info.step, m)
        summary["losses"][info.step] = m["loss"]

    return Hook(fn, every)


def eval_hook(every: int, evaluate: Callable[[Any], dict[str, float]], writer, summary: dict,
              prefix: str = "eval") -> Hook:
    """`evaluate(params) -> {"loss": ..., other metrics...}` (`m3jax.train.loop.evaluation`: the held-out losses,
    the entities' accuracy) every `every` steps, at the end, and at step 0 of a fresh run: one line (stdout,
    metrics.jsonl, TensorBoard) with every metric side by side. The summary keeps summary[prefix][step] = the loss,
    and summary[f"{prefix}/{name}"][step] for each other metric."""

    def fn(info: StepInfo) -> None:
        if info.metrics is None and info.step != 0:
            return  # a resumed run evaluated its start already
        losses = evaluate(info.state.params)
        writer.write(info.step, losses, prefix=prefix)
        for name, value in losses.items():
            summary.setdefault(prefix if name == "loss" else f"{prefix}/{name}", {})[info.step] = value

    return Hook(fn, every, at_start=True)


def checkpoint_hook(every: int, save: Callable[[int, Any], None]) -> Hook:
    return Hook(lambda info: save(info.step, info.state), every)


class Profiler:
    """A jax.profiler trace of steps [train.profile_start, + train.profile_steps) into WORKDIR/profile.

    The profiler writes through the operating system only: for a bucket workdir it traces into a local temporary
    directory, whose files are uploaded to WORKDIR/profile (same layout) when the trace stops.

    jax 0.10's profiler crashes in a process that loaded the TPU plugin on a host without TPUs. Training never
    loads it where libtpu came from `make venv-tpu` (kept outside the import path); a CPU host that pip-installed
    libtpu into its environment loads it in every process.
    """

    def __init__(self, train_cfg, workdir: str, process_index: int):
        self.first = int(train_cfg.profile_start)
        self.last = self.first + int(train_cfg.profile_steps) - 1
        self.enabled = self.first > 0 and (bool(train_cfg.profile_all_processes) or process_index == 0)
        self.directory = os.path.join(workdir, "profile")
        self._local = None  # the local directory of a trace bound for a bucket
        self.active = False

    def hook(self) -> Hook:
        """Starts the trace after step first − 1 (or before the first step), stops it after the last."""
        return Hook(self._on_step, every=1 if self.enabled else 0, at_start=self.enabled, at_end=False)

    def _on_step(self, info: StepInfo) -> None:
        if not self.active and info.step == self.first - 1:
            self._local = tempfile.mkdtemp(prefix="m3jax-profile-") if paths.is_url(self.directory) else None
            jax.profiler.start_trace(self._local or self.directory)
            self.active = True
        elif self.active and info.step >= self.last:
            self.stop(info.metrics)

    def stop(self, outputs=None) -> None:
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            if self._local:
                _upload_tree(self._local, paths.absolute(self.directory))
                shutil.rmtree(self._local, ignore_errors=True)
            logging.info("profile of steps %d-%d written to %s", self.first, self.last, self.directory)


def _upload_tree(local: str, target: epath.Path) -> None:
    """Copies the files under the local directory `local` to `target` (a bucket prefix), keeping their layout."""
    for directory, _, names in os.walk(local):
        for name in names:
            source = os.path.join(directory, name)
            dest = target / os.path.relpath(source, local)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(Path(source).read_bytes())
