"""The layers contract (pyproject.toml, [tool.importlinter]): each room of the package imports only rooms below it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(cwd: Path) -> subprocess.CompletedProcess:
    """lint-imports on the m3jax package found first on the path from `cwd`, with `cwd`'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers():
    out = lint(Path(REPO))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 kept, 0 broken" in out.stdout


def test_a_back_edge_breaks_the_contract(tmp_path):
    """The model (the bottom room but one) importing the training loop: the contract names the edge."""
    shutil.copytree(Path(REPO) / "m3jax", tmp_path / "m3jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(REPO) / "pyproject.toml", tmp_path)
    memory = tmp_path / "m3jax" / "model" / "memory.py"
    memory.write_text(memory.read_text() + "\n\ndef _planted():\n    from m3jax.train import loop  # noqa: F401\n")
    out = lint(tmp_path)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and "m3jax.model.memory -> m3jax.train.loop" in out.stdout, out.stdout[-3000:]
