"""Prints a run's loss summary from its metrics.jsonl: train loss first/last, held-out loss per evaluation, and
where each invocation of the trainer started (a resumed run has one line per restart) and the spikes it rolled back.

    python tools/summarize_run.py --workdir=runs/demo/train
"""

import sys

from absl import app, flags

from m3jax.train.metrics import read_metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (a local path or a gs:// URL).", required=True)


def main(argv):
    del argv
    try:
        splits, starts = read_metrics(_WORKDIR.value)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"summarize_run: {e}")
    train = splits.get("train", {})
    if not train:
        sys.exit(f"summarize_run: {_WORKDIR.value}/metrics.jsonl has no train records")
    for rec in starts:
        print(f"invocation started at step {rec['step']}" + (" (resumed from its checkpoint)" if rec["resumed"]
                                                              else " (fresh)"))
    first, last = train[min(train)], train[max(train)]
    print(f"train loss: step {first['step']}: {first['loss']:.3f} -> step {last['step']}: {last['loss']:.3f}  "
          f"({last['tokens_per_s']:.0f} tokens/s, MFU {last['mfu']:.1%})")
    for step, rec in sorted(splits.get("eval", {}).items()):
        print(f"held-out loss at step {step}: {rec['loss']:.3f}")
    for step, rec in sorted(splits.get("spike", {}).items()):
        print(f"loss spike at step {step}: {rec['loss']:.3f} (running mean {rec['running_mean']:.3f}), rolled back")


if __name__ == "__main__":
    app.run(main)
