"""Paths a job reads or writes: a local path or a bucket URL (`gs://bucket/dir`).

A URL goes through the libraries' own layers, never through a copy on local disk: etils.epath (gcsfs for gs://)
for directories and small files, TensorStore kvstores for arrays. A local path is made absolute, so that it names
the same files whatever the working directory (a resume compares them; Orbax wants absolute paths).
"""

from __future__ import annotations

import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (`gs://...`, `file://...`) rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL as it is, a local path made absolute."""
    return epath.Path(path if is_url(path) else os.path.abspath(path))
