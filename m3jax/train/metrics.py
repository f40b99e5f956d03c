"""Metric sinks: stdout, a JSONL file and TensorBoard event files, in a local workdir or a bucket (`gs://...`).
Only process 0 writes.

Locally every metrics.jsonl line is flushed as it is written. A bucket's objects cannot be appended to, so there a
file is kept in memory and rewritten whole (`BucketFile`): metrics.jsonl at most every `upload_every_s` seconds
and at close, TensorBoard's event files when tensorboardX flushes them (every 2 minutes) and at close. A run
killed in between loses its last lines there (stdout has them).
"""

from __future__ import annotations

import json
import os
import time

import jax
from etils import epath
from tensorboardX import SummaryWriter, record_writer

from m3jax import paths


class BucketFile:
    """A file in a bucket opened for appending: its bytes so far (those already there, then the ones written), which
    `flush` writes as the whole object, through etils.epath."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self.data = bytearray(self.path.read_bytes() if self.path.exists() else b"")
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def flush(self) -> None:
        try:
            self.path.write_bytes(bytes(self.data))
        except Exception as e:  # noqa: BLE001 - gcsfs's errors name no object
            raise OSError(f"cannot write {self.path} ({type(e).__name__}: {e})") from e

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _EventFile(BucketFile):
    """An event file in a bucket. tensorboardX flushes it from its writer thread, which dies on an exception (and
    `add_scalar` then blocks for ever on the thread's full queue): a failed flush is kept in `error` instead, and
    MetricWriter raises it in the training thread."""

    error: OSError | None = None

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            self.error = e


class _BucketEventFiles:
    """tensorboardX's writer factory for gs:// event files: `_EventFile`s (its own writes through the
    google-cloud-storage client, and writes the whole file again when garbage-collected)."""

    def __init__(self):
        self.files: list[_EventFile] = []

    def open(self, path: str) -> _EventFile:
        self.files.append(_EventFile(path))
        return self.files[-1]

    def raise_failure(self, directory: str) -> None:
        """Raises the first failed flush of an event file under `directory`."""
        for f in self.files:
            if f.error is not None and str(f.path).startswith(directory):
                raise f.error

    def directory_check(self, path: str) -> None:
        pass  # a bucket has no directories to create


_EVENT_FILES = _BucketEventFiles()
record_writer.register_writer_factory("gs", _EVENT_FILES)


class MetricWriter:
    def __init__(self, workdir: str, *, upload_every_s: float = 30.0):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            jsonl = os.path.join(workdir, "metrics.jsonl")
            self._local = not paths.is_url(workdir)
            if self._local:
                os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(jsonl, "ab") if self._local else BucketFile(jsonl)  # noqa: SIM115 - closed in close()
            self._upload_every_s, self._uploaded = upload_every_s, time.monotonic()
            self._tb_dir = os.path.join(workdir, "tensorboard")
            self._tb = SummaryWriter(self._tb_dir)

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        fields = "  ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"[{prefix}] step {step}: {fields}", flush=True)
        self._jsonl.write((json.dumps({"step": step, "split": prefix, **metrics}) + "\n").encode())
        if self._local or time.monotonic() - self._uploaded >= self._upload_every_s:
            self._jsonl.flush()
            self._uploaded = time.monotonic()
        if not self._local:
            _EVENT_FILES.raise_failure(self._tb_dir)
        for k, v in metrics.items():
            self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if not self._local:
                _EVENT_FILES.raise_failure(self._tb_dir)


def read_metrics(workdir: str) -> tuple[dict[str, dict[int, dict]], list[dict]]:
    """A run's WORKDIR/metrics.jsonl (local or gs://) as ({split: {step: record}}, the `start` records in order).

    A step logged twice (a resumed run replays the steps after its checkpoint) keeps its later record. Raises
    FileNotFoundError naming the file when it is missing and ValueError naming the line that is not a record."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    splits: dict[str, dict[int, dict]] = {}
    starts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
            split, step = rec["split"], rec["step"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n} is not a metrics record ({e!r})") from None
        if split == "start":
            starts.append(rec)
        splits.setdefault(split, {})[step] = rec
    return splits, starts
