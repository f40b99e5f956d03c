"""Fault points: a process stops itself at one exact place in its work, so that a test's kill lands where it means.

`M3JAX_FAULT=<action>_<point>:<n>` arms one fault point of the process it is set for:

- action `kill`: SIGKILL to itself (it dies at once: nothing flushed, no handler runs); `term`: SIGTERM to itself
  (a preemption notice, which the trainer answers by saving and exiting).
- point (the place, and what `n` counts):
    `after_step`         the trainer has trained step n and run its hooks (metrics of step n written; a checkpoint
                         due at n handed to Orbax).
    `after_save_begins`  the trainer has handed the checkpoint of step n to Orbax, which is still writing it: Orbax
                         commits a step (renames its temporary directory) from a background thread once its files
                         are written, so a kill here leaves step n uncommitted and the previous checkpoint the last.
    `after_bank_write`   the memory writer's n-th bank write of this process has returned (its rows durable and
                         flagged written); writes are runs of rows within one shard, in order, from one thread, so a
                         fresh writer is killed with exactly its first n runs written.

E.g. `M3JAX_FAULT=kill_after_save_begins:6`, `M3JAX_FAULT=term_after_step:3`. The variable is read once per process,
at its first fault point; unset, a fault point costs one cached lookup.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal

ENV = "M3JAX_FAULT"
ACTIONS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
POINTS = ("after_step", "after_save_begins", "after_bank_write")


@dataclasses.dataclass(frozen=True)
class Fault:
    signal: signal.Signals
    point: str
    n: int


def parse(value: str) -> Fault:
    """`<action>_<point>:<n>` (module docstring) -> the Fault it arms; a ValueError naming the variable otherwise."""
    spec, _, n = value.partition(":")
    action, _, point = spec.partition("_")
    if action not in ACTIONS or point not in POINTS or not n.isdigit():
        raise ValueError(f"{ENV}={value!r}: expected <action>_<point>:<n> with action one of {sorted(ACTIONS)}, "
                         f"point one of {list(POINTS)} and n a step or count, e.g. kill_after_save_begins:6")
    return Fault(ACTIONS[action], point, int(n))


@functools.cache
def armed() -> Fault | None:
    """The fault this process's environment arms (read once), or None."""
    value = os.environ.get(ENV)
    return parse(value) if value else None


def reached(point: str, n: int) -> None:
    """Fault point `point` at count `n`: signals this process if `M3JAX_FAULT` arms exactly this place."""
    fault = armed()
    if fault is not None and fault.point == point and fault.n == n:
        os.kill(os.getpid(), fault.signal)
