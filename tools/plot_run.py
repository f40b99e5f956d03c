"""Plots runs' training and held-out loss curves side by side into one PNG, from their metrics.jsonl.

    python tools/plot_run.py --run=memory=runs/demo/stage2 --run=control=runs/demo/stage2_off \\
        --out=runs/demo/plots/stage2.png [--title="continued stage"]

Left: the train loss of every run against the step. Right: every held-out metric a run logged (`loss`, and with
memory `loss_empty_memory`, `loss_memory_off`, entity accuracies, ...; `--eval_keys` picks them) against the step,
one line per run and metric. Each run is `LABEL=WORKDIR` (a local path or a gs:// URL).
"""

from __future__ import annotations

import sys

from absl import app, flags
from etils import epath

from m3jax.train.metrics import read_metrics

_RUNS = flags.DEFINE_multi_string("run", None, "LABEL=WORKDIR of a run to plot (repeat the flag).", required=True)
_OUT = flags.DEFINE_string("out", None, "The PNG to write (its directory is created).", required=True)
_TITLE = flags.DEFINE_string("title", "", "A title over both panels.")
_EVAL_KEYS = flags.DEFINE_list("eval_keys", ["loss"], "Held-out metrics to plot (those a run did not log are left "
                               "out; 'all' = every numeric one).")


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
    runs = []
    for spec in specs:
        label, sep, workdir = spec.partition("=")
        if not sep or not label or not workdir:
            raise ValueError(f"--run={spec!r}: expected LABEL=WORKDIR")
        runs.append((label, workdir))
    return runs


def plot(runs: list[tuple[str, str]], out: str, title: str = "", eval_keys: tuple[str, ...] = ("loss",)) -> dict:
    """Writes the PNG; returns what it drew: {label: {"train": n points, "eval/KEY": n points}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    drawn: dict[str, dict[str, int]] = {}
    for label, workdir in runs:
        splits, _ = read_metrics(workdir)
        train = splits.get("train", {})
        if not train:
            raise ValueError(f"{workdir}/metrics.jsonl has no train records")
        steps = sorted(train)
        line, = ax_train.plot(steps, [train[s]["loss"] for s in steps], label=label)
        drawn[label] = {"train": len(steps)}
        evals = splits.get("eval", {})
        keys = sorted({k for rec in evals.values() for k, v in rec.items()
                       if isinstance(v, int | float) and k not in ("step", "split")}) if "all" in eval_keys else [
            k for k in eval_keys if any(k in rec for rec in evals.values())]
        for i, key in enumerate(keys):
            points = sorted((s, rec[key]) for s, rec in evals.items() if key in rec)
            ax_eval.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                         linestyle=("-", "--", ":", "-.")[i % 4], color=line.get_color(),
                         label=f"{label}: {key}" if len(keys) > 1 or len(runs) > 1 else key)
            drawn[label][f"eval/{key}"] = len(points)
    ax_train.set(xlabel="step", ylabel="train loss", title="training")
    ax_eval.set(xlabel="step", ylabel="held-out", title="held-out")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = epath.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return drawn


def main(argv):
    del argv
    try:
        drawn = plot(parse_runs(_RUNS.value), _OUT.value, _TITLE.value, tuple(_EVAL_KEYS.value))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"plot_run: {e}")
    for label, counts in drawn.items():
        print(f"{label}: " + ", ".join(f"{k} {n} points" for k, n in counts.items()))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
