"""Prints a run's loss summary from its metrics.jsonl: train loss first/last, held-out loss per evaluation.

    python tools/summarize_run.py --workdir=runs/demo/train
"""

import json
import sys
from pathlib import Path

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv):
    del argv
    path = Path(_WORKDIR.value) / "metrics.jsonl"
    if not path.exists():
        sys.exit(f"summarize_run: {path} does not exist")
    train, evals = {}, {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        (train if rec["split"] == "train" else evals)[rec["step"]] = rec
    if not train:
        sys.exit(f"summarize_run: {path} has no train records")
    first, last = train[min(train)], train[max(train)]
    print(f"train loss: step {first['step']}: {first['loss']:.3f} -> step {last['step']}: {last['loss']:.3f}  "
          f"({last['tokens_per_s']:.0f} tokens/s, MFU {last['mfu']:.1%})")
    for step in sorted(evals):
        print(f"held-out loss at step {step}: {evals[step]['loss']:.3f}")


if __name__ == "__main__":
    app.run(main)
