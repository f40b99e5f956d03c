"""Metric sinks: stdout, a JSONL file and TensorBoard event files. Only process 0 writes."""

from __future__ import annotations

import json
import os

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 - closed in close()
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        fields = "  ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"[{prefix}] step {step}: {fields}", flush=True)
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        self._jsonl.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
