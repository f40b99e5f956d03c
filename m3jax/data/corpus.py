"""Text corpora as lists of `Document`s.

The default corpus is the documentation that ships inside CPython itself (the pydoc topics and the docstrings
of the standard library), so a run needs no download and gets real English prose. Other corpora come from
plain-text files or JSONL.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import glob
import json
import os
import pydoc_data.topics
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from etils import epath

from m3jax.paths import is_url

# Directories of the standard library that hold tests, tools or third-party code rather than documentation.
_SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
# A module whose docstrings add up to less than this is boilerplate (codec tables, tiny shims).
_MIN_DOCSTRING_CHARS = 200
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclasses.dataclass(frozen=True)
class Document:
    """One unit of text. A document lands whole in one data split and gets its own segment when packed."""

    doc_id: str
    text: str


def embedded_corpus() -> list[Document]:
    """CPython's own documentation, sorted by doc_id: `pydoc:<topic>` and `stdlib:<module>` documents.

    Stdlib docstrings are read by parsing the sources with `ast`, never by importing the modules. The result
    depends only on the interpreter's installation, so it is identical across runs.
    """
    return list(_embedded_corpus())


@functools.cache
def _embedded_corpus() -> tuple[Document, ...]:
    docs = [Document(f"pydoc:{topic}", text) for topic, text in pydoc_data.topics.topics.items()]
    docs.extend(_stdlib_documents(Path(sysconfig.get_paths()["stdlib"])))
    return tuple(sorted(docs, key=lambda d: d.doc_id))


def _stdlib_documents(root: Path) -> Iterable[Document]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS)
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath, filename)
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if not parts:
                continue
            module = ".".join(parts)
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError):  # not valid source for this interpreter (templates, py2 code)
                continue
            text = _module_text(tree, module)
            if text is not None:
                yield Document(f"stdlib:{module}", text)


def _module_text(tree: ast.Module, module: str) -> str | None:
    """Module docstring, then each documented class/function/method as "<qualified.name>:\\n<docstring>"."""
    docstring = ast.get_docstring(tree) or ""
    entries: list[tuple[str, str]] = []
    _collect_docstrings(tree, module, entries)
    if len(docstring) + sum(len(doc) for _, doc in entries) < _MIN_DOCSTRING_CHARS:
        return None
    parts = [docstring] if docstring else []
    parts.extend(f"{qualname}:\n{doc}" for qualname, doc in entries)
    return "\n\n".join(parts)


def _collect_docstrings(node: ast.AST, prefix: str, out: list[tuple[str, str]]) -> None:
    """Appends (qualified name, docstring) of the definitions under `node`, descending into classes and
    compound statements (e.g. `if sys.platform ...:` blocks) but not into function bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DEFINITIONS):
            qualname = f"{prefix}.{child.name}"
            docstring = ast.get_docstring(child)
            if docstring:
                out.append((qualname, docstring))
            if isinstance(child, ast.ClassDef):
                _collect_docstrings(child, qualname, out)
        elif isinstance(child, ast.stmt):
            _collect_docstrings(child, prefix, out)


def read_text_files(paths: Iterable[str | os.PathLike]) -> list[Document]:
    """One document per UTF-8 text file, with the path as its doc_id."""
    docs = []
    for path in paths:
        try:
            text = epath.Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read text file {os.fspath(path)}: {e}") from e
        docs.append(Document(os.fspath(path), text))
    return docs


def read_jsonl(paths: Iterable[str | os.PathLike], text_key: str = "text") -> list[Document]:
    """One document per non-blank JSONL line, its text taken from `text_key`. Its doc_id is the line's string "id"
    when it has one (stable wherever the file lives: `prepare`'s held-out split hashes it), else "<path>:<line>".
    Raises ValueError naming the line of a duplicate id."""
    docs, seen = [], {}
    for path in paths:
        path = os.fspath(path)
        try:
            lines = epath.Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read JSONL file {path}: {e}") from e
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {e.msg}") from e
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(
                    f"{path}:{line_no}: expected an object with a string {text_key!r}; got {found}"
                )
            doc_id = obj["id"] if isinstance(obj.get("id"), str) else f"{path}:{line_no}"
            if doc_id in seen:
                raise ValueError(f"{path}:{line_no}: id {doc_id!r} is already the id of {seen[doc_id]}")
            seen[doc_id] = f"{path}:{line_no}"
            docs.append(Document(doc_id, obj[text_key]))
    return docs


def _matches(pattern: str) -> list[str]:
    """The files a path or glob names, sorted: local (`**` recursive), or objects in a bucket (`gs://b/dir/*.jsonl`)."""
    if not is_url(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    base = epath.Path("/".join(parts[:first]))
    found = base.glob("/".join(parts[first:])) if first < len(parts) else [base]
    return sorted(str(p) for p in found if p.is_file())


def load_corpus(spec: str) -> list[Document]:
    """Loads "embedded", or comma-separated paths/globs (local, or gs:// objects): `*.jsonl` files as JSONL, other
    files as text."""
    if spec.strip() == "embedded":
        return embedded_corpus()
    paths: dict[str, None] = {}  # ordered and deduplicated
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            continue
        matches = _matches(pattern)
        if not matches:
            raise FileNotFoundError(f"corpus path {pattern!r} matches no file")
        paths.update(dict.fromkeys(matches))
    if not paths:
        raise ValueError(f"empty corpus spec {spec!r}: give 'embedded' or comma-separated paths/globs")
    docs = []
    for path in paths:
        docs.extend(read_jsonl([path]) if path.endswith(".jsonl") else read_text_files([path]))
    return docs
