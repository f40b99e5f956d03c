"""Loss-spike guard and preemption watch: the two ways a long run is interrupted and carried on.

`SpikeGuard` keeps exponential running statistics of the training loss and calls a step a spike when its loss
is not finite, or lies more than `threshold` standard deviations and at least `min_increase` nats above the
running mean. The loop then restores the last good checkpoint, keeps its data iterator where it is (so the
batches that led to the spike are skipped), optionally lowers the learning rate, and goes on; after
`max_rescues` rescues it stops with `LossSpikeError`. Its state travels in checkpoints, so a resumed run judges
spikes exactly as an uninterrupted one would.

`PreemptionWatch` answers, at every loop iteration, whether this is the step to save and exit: with several
processes through JAX's preemption sync point (a SIGTERM to any process makes all of them agree on one step);
with one process through a SIGTERM handler of its own.
"""

from __future__ import annotations

import math
import signal

from jax.experimental import multihost_utils


class LossSpikeError(RuntimeError):
    """The loss spiked more often than `spike_guard.max_rescues` allows."""


class SpikeGuard:
    def __init__(self, cfg):
        self.enabled = bool(cfg.enabled)
        self.threshold = float(cfg.threshold)
        self.min_increase = float(cfg.min_increase)
        self.decay = 1.0 - 1.0 / float(cfg.window)
        self.min_steps = int(cfg.min_steps)
        self.max_rescues = int(cfg.max_rescues)
        self.lr_factor = float(cfg.lr_factor)
        self.count, self.mean, self.var = 0, 0.0, 0.0

    def is_spike(self, loss: float) -> bool:
        """Whether `loss` is a spike against the statistics so far (it does not update them)."""
        if not math.isfinite(loss):
            return True
        if self.count < self.min_steps:
            return False
        excess = loss - self.mean
        return excess > self.min_increase and excess > self.threshold * math.sqrt(self.var)

    def update(self, loss: float) -> None:
        """Adds a good step's loss to the running statistics (bias-corrected start: the first loss is the mean)."""
        if self.count == 0:
            self.mean, self.var = loss, 0.0
        else:
            delta = loss - self.mean
            self.mean += (1.0 - self.decay) * delta
            self.var = self.decay * (self.var + (1.0 - self.decay) * delta * delta)
        self.count += 1

    def describe(self) -> str:
        return f"running mean {self.mean:.4f} ± {math.sqrt(self.var):.4f} over {self.count} steps"

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, d: dict) -> None:
        self.count, self.mean, self.var = int(d["count"]), float(d["mean"]), float(d["var"])


class PreemptionWatch:
    """Is it time to save and exit? Call `reached(iteration)` once per loop iteration on every process."""

    def __init__(self, multiprocess: bool):
        self.multiprocess = multiprocess
        self.signalled = False
        self._previous = None
        if not multiprocess:
            # With jax.distributed, JAX's preemption notifier owns SIGTERM; a Python handler would displace it.
            try:
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread: the caller owns signals
                self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.signalled = True

    def reached(self, iteration: int) -> bool:
        """True at the iteration every process agrees to save at. `iteration` must grow by one per call."""
        if self.multiprocess:
            return multihost_utils.reached_preemption_sync_point(iteration)
        return self.signalled

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
