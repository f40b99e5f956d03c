"""`make demo` end to end at DEMO_SIZE=tiny (the conftest's background job): every stage runs, the results table is
printed and the plots are written; a second invocation skips every finished stage. The gains the full-size demo
shows are asserted where they are measured at a size a test affords: tests/test_continued.py and
tests/test_evaluate_tool.py (the entity fixture model)."""

import json
import os
import subprocess

import pytest
from conftest import DEMO_TINY, REPO

pytestmark = pytest.mark.slow

STAGES = ("entities", "tokenizer", "data", "warmup", "bank", "index", "retrieve", "continued", "control_s0",
          "rewrite", "evaluate", "sample", "plots")
PLOTS = ("warmup.png", "continued.png", "continued_entities.png", "evaluation.png")
ROWS = ("| continued | with memory (Memory3) |", "| continued | same weights, no memory |",
        "| continued | RAG (reference in the prompt) |", "| control, seed 0 | same weights, no memory |",
        "| warm-up | same weights, no memory |")


def test_make_demo_runs_every_stage_prints_the_table_and_writes_the_plots(demo_tiny):
    out = demo_tiny.stdout
    assert demo_tiny.returncode == 0, f"{out[-3000:]}\n{demo_tiny.stderr[-3000:]}"
    demo = demo_tiny.root / "demo"
    for name in STAGES:  # each stage announced, its tool commands printed, its wall time recorded
        assert f"== {name}: " in out
        assert f"   {name}: " in out
        assert json.loads((demo / "stages" / f"{name}.json").read_text())["seconds"] >= 0
    assert "$ bash launch/local.sh configs/quickstart_continued.py" in out
    assert "--config.memory.read=False" in out
    for row in ROWS:
        assert row in out and row in (demo / "results.md").read_text()
    assert "held-out entity accuracy" in out and "Memory3 runs at" in out
    sample = out[out.index("== a generated answer"):]
    assert "true answer" in sample and "chunk 0: reference" in sample  # the references the answer read
    results = json.loads((demo / "results.json").read_text())
    assert {r["mode"] for r in results["rows"]} == {"memory3", "none", "rag"}
    assert results["decode"]["memory3_over_rag"] > 0
    for name in PLOTS:
        png = (demo / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name


def test_make_demo_again_skips_what_is_done(demo_tiny):
    assert demo_tiny.returncode == 0
    again = subprocess.run([*DEMO_TINY, f"DEMO_DIR={demo_tiny.root / 'demo'}"], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert again.returncode == 0, again.stderr[-3000:]
    for name in STAGES:
        assert f"== {name}: done (" in again.stdout and "skipped" in again.stdout
    assert "| continued | with memory (Memory3) |" in again.stdout


def test_demo_refuses_an_unknown_size(tmp_path):
    r = subprocess.run(["bash", "tools/demo.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DEMO_SIZE": "huge", "DEMO_DIR": str(tmp_path)})
    assert r.returncode == 2
    assert "DEMO_SIZE must be full or tiny, got 'huge'" in r.stderr
