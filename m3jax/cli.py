"""What the command-line tools (tools/*.py) share: start-up checks, progress lines, the end-of-work barrier."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging


def start(argv: Sequence[str]) -> None:
    """Refuses positional arguments; logs at WARNING unless --verbosity was given (Orbax logs every restore at
    INFO)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def progress(prefix: str) -> Callable[[str], None]:
    """A progress printer: each line to stderr, flushed, after `prefix` ("tool: ")."""

    def log(line: str) -> None:
        print(f"{prefix}{line}", file=sys.stderr, flush=True)

    return log


def barrier(name: str) -> None:
    """Waits for every process of a jax.distributed job (nothing to wait for with one)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
