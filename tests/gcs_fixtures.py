"""A local Google Cloud Storage server for tests: `gcs_server` (one per session) and `gcs` (a fresh gs:// prefix).

Use: `pytest_plugins = ("gcs_fixtures",)` in a test module; a test taking `gcs` then gets a
`gs://BUCKET/<test name>-<n>` base of its own (nothing exists under it yet).

The server is gcp-storage-emulator (requirements-dev.txt) with GCS's generation preconditions added
(tests/gcs_emulator.py), in a subprocess on 127.0.0.1, in memory, with one bucket; it answers within a second and is
stopped when the session ends. The fixture points every library that
speaks gs:// at it through the environment, which the processes a test starts inherit too:

- STORAGE_EMULATOR_HOST: gcsfs (etils.epath's gs:// backend, hence Orbax's directory operations), the
  google-cloud-storage client (Orbax's bucket checks, tensorboardX's gs:// writer), both unauthenticated there.
- TENSORSTORE_GCS_HTTP_URL: TensorStore's `gcs` kvstore (Orbax's arrays, the memory bank);
  GOOGLE_AUTH_TOKEN_FOR_TESTING gives it a fixed token instead of a search for credentials.
- GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs (2026.x) otherwise asks a bucket's storage layout over gRPC
  before using it; the emulator speaks no gRPC, and with any credentials at hand that probe retries for a minute
  (and is not cached when it fails) before gcsfs falls back to plain HTTP. It is read when gcsfs is imported.
- FSSPEC_GCS_TOKEN=anon (and fsspec's config in this process): gcsfs does not look for credentials (or a
  metadata server) either.

`gcs_faults` makes that server fail requests for a while (5xx answers, dropped connections: tests/gcs_emulator.py),
until the test ends.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import fsspec.config
import pytest

BUCKET = "m3jax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _start(port: int, log) -> subprocess.Popen:
    """The server on `port`, its stderr to the file `log`: a pipe nobody reads would fill with the tracebacks it
    prints of clients that hang up before the answer (gcsfs races two lookups and drops the loser), and block it."""
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), "start", "--host=127.0.0.1",
           f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}", "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """The emulator's URL (http://127.0.0.1:PORT), with the environment pointing at it for the session."""
    if "gcsfs" in sys.modules:  # it read GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT already: every bucket probe would be slow
        raise RuntimeError("gcsfs was imported before the gcs_server fixture set its environment")
    with tempfile.TemporaryFile("w+") as log:
        for _ in range(3):  # another process may take the free port before the emulator binds it
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            proc = _start(port, log)
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline and not _answers(url + "/"):
                time.sleep(0.05)
            if proc.poll() is None and _answers(url + "/"):
                break
            proc.kill()
            proc.wait()
        else:
            log.seek(0)
            raise RuntimeError(f"the GCS emulator did not start: {log.read()[-2000:]}")
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
               "FSSPEC_GCS_TOKEN": "anon"}
        try:
            with pytest.MonkeyPatch.context() as mp:
                for key, value in env.items():
                    mp.setenv(key, value)
                # fsspec reads FSSPEC_* when imported: this process may have imported it already
                mp.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}), "token": "anon"})
                yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_prefixes = itertools.count()


@pytest.fixture
def gcs(gcs_server, request) -> str:
    """A gs:// base of this test's own on the session's emulator: `gs://BUCKET/<test name>-<n>` (no trailing /)."""
    name = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in request.node.name)
    return f"gs://{BUCKET}/{name}-{next(_prefixes)}"


class Faults:
    """The fault rules of the session's server (tests/gcs_emulator.py says what a rule does)."""

    def __init__(self, url: str):
        self.url = url + "/_faults"

    def _call(self, method: str, rule: dict | None = None) -> list[dict]:
        data = None if rule is None else json.dumps(rule).encode()
        request = urllib.request.Request(self.url, data, {"Content-Type": "application/json"}, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def add(self, *, count: int, status: int = 503, methods: tuple[str, ...] = (), match: str = "",
            drop: bool = False) -> None:
        """The next `count` requests of `methods` (any if empty) whose unquoted path and query contain `match`
        fail: with `status`, or with the connection closed unanswered (`drop`)."""
        self._call("POST", {"count": count, "status": status, "methods": list(methods), "match": match, "drop": drop})

    def failed(self) -> int:
        """How many requests the rules failed so far."""
        return sum(rule["failed"] for rule in self._call("GET"))

    def clear(self) -> None:
        self._call("DELETE")


@pytest.fixture
def gcs_faults(gcs_server) -> Iterator[Faults]:
    """The session server's fault rules, none at the start of the test and removed at its end."""
    faults = Faults(gcs_server)
    faults.clear()
    yield faults
    faults.clear()
