"""The results of `make demo` (tools/demo.sh) as one table, a plot and a generated sample.

    python tools/demo_report.py --demo_dir=runs/demo

Reads DEMO_DIR/eval/*.json (tools/evaluate.py: the continued model with memory / without / RAG, the memory-off
controls and the warm-up without memory), DEMO_DIR/eval/sample_*.txt (tools/generate.py) and DEMO_DIR/stages/*.json
(each stage's wall time). Prints the table, writes it to DEMO_DIR/results.md with the numbers in
DEMO_DIR/results.json, and draws DEMO_DIR/plots/evaluation.png: held-out entity accuracy, held-out real-text loss
and decode speed of every model and mode side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

_DIR = flags.DEFINE_string("demo_dir", "runs/demo", "The demo's directory (tools/demo.sh DEMO_DIR).")
_TOTAL = flags.DEFINE_integer("total_seconds", 0, "Wall time of this invocation of the demo (0 = not shown).",
                              lower_bound=0)

MODE_NAMES = {"memory3": "with memory (Memory3)", "none": "same weights, no memory", "rag": "RAG (reference in "
              "the prompt)"}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: run tools/demo.sh (make demo) to the end first") from None
    except ValueError as e:
        raise ValueError(f"{path}: not JSON: {e}") from e


def collect(demo: Path) -> dict:
    """Every number of the table: rows (model, mode, entity accuracy, answer loss, real-text loss, tokens/s), the
    retrieval recall, the controls' seed spread, the decode ratios, the stage times."""
    continued = read_json(demo / "eval" / "continued.json")
    controls = sorted(demo.glob("eval/control_s*.json"), key=lambda p: int(p.stem.split("_s")[-1]))
    if not controls:
        raise FileNotFoundError(f"{demo}/eval/control_s*.json: no memory-off control was evaluated")
    rows = []

    def row(model: str, result: dict, mode: str) -> dict:
        ent, text = result["entities"][mode], result["perplexity"][mode]
        return {"model": model, "mode": mode, "entity_accuracy": ent["accuracy"], "answer_loss": ent["answer_loss"],
                "text_loss": text["loss"], "tokens_per_s": result.get("decode", {}).get(mode, {}).get("tokens_per_s")}

    for mode in ("memory3", "none", "rag"):
        rows.append(row("continued", continued, mode))
    for path in controls:
        rows.append(row(f"control, seed {path.stem.split('_s')[-1]}", read_json(path), "none"))
    rows.append(row("warm-up", read_json(demo / "eval" / "warmup.json"), "none"))
    by = {(r["model"], r["mode"]): r for r in rows}
    memory3 = by["continued", "memory3"]["entity_accuracy"]
    ctrl = [r for r in rows if r["model"].startswith("control")]
    out = {"rows": rows, "items": continued["entities"]["items"],
           "recall_at_1": continued["entities"].get("recall_at_1"),
           "passages": continued["perplexity"]["passages"], "text_tokens": continued["perplexity"]["tokens"],
           "margin_over_none": memory3 - by["continued", "none"]["entity_accuracy"],
           "margin_over_control": memory3 - max(r["entity_accuracy"] for r in ctrl),
           "control_seeds": len(ctrl),
           "control_spread": {k: max(r[k] for r in ctrl) - min(r[k] for r in ctrl) for k in ("entity_accuracy",
                                                                                            "text_loss")}}
    decode = continued.get("decode")
    if decode:
        out["decode"] = {"prompts": decode["prompts"], "new_tokens": decode["new_tokens"],
                         "memory3_over_rag": decode["memory3"]["tokens_per_s"] / decode["rag"]["tokens_per_s"],
                         "memory3_over_none": decode["memory3"]["tokens_per_s"] / decode["none"]["tokens_per_s"]}
    out["stage_seconds"] = {p.stem: json.loads(p.read_text())["seconds"] for p in sorted(
        (demo / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime)}
    return out


def sample_text(demo: Path) -> list[str]:
    """The held-out entity's prompt and true answer, and what each mode generated (with the references read)."""
    prompt = read_json(demo / "eval" / "sample_prompt.jsonl")
    lines = [f"held-out entity {prompt['name']!r}: {prompt['prompt']!r} -> true answer {prompt['answer']!r}"]
    for mode in ("memory3", "none"):
        path = demo / "eval" / f"sample_{mode}.txt"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run tools/demo.sh (make demo) to the end first")
        body = [line for line in path.read_text().splitlines() if not line.startswith("=== ")]
        lines.append(f"  {MODE_NAMES[mode]}: {body[0] if body else ''!r}")
        lines.extend(f"  {line.strip()}" for line in body[1:])
    return lines


def render(r: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| model | reads | held-out entity accuracy | answer loss (nats/token) | held-out real text loss "
             "(nats/token) | decode tokens/s |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {MODE_NAMES[row['mode']]} | {row['entity_accuracy']:.3f} | "
                     f"{row['answer_loss']:.3f} | {row['text_loss']:.3f} | {num(row['tokens_per_s'], '.1f')} |")
    lines.append("")
    lines.append(f"Held-out entities: {r['items']} items (facts only in the knowledge base); retrieval recall@1 "
                 f"{num(r['recall_at_1'], '.3f')}. Memory over the same weights without memory: "
                 f"{r['margin_over_none']:+.3f}; over the best memory-off control: {r['margin_over_control']:+.3f}.")
    spread = r["control_spread"]
    if r["control_seeds"] > 1:
        lines.append(f"Seed noise of the control ({r['control_seeds']} seeds, max - min): entity accuracy "
                     f"{spread['entity_accuracy']:.3f}, real-text loss {spread['text_loss']:.4f} nats/token.")
    else:
        lines.append("Seed noise of the control: not measured (one seed; DEMO_CONTROL_SEEDS=\"0 1\" runs two).")
    lines.append(f"Held-out real text: {r['passages']} passages of the embedded corpus ({r['text_tokens']:,} tokens). "
                 "The knowledge base holds only the entities, so memory cannot help there: the rows show what reading "
                 "memory costs plain text, and what the continued stage's text (80% bios) cost it since the warm-up.")
    if "decode" in r:
        d = r["decode"]
        lines.append(f"Decode: {d['prompts']} prompts x {d['new_tokens']} tokens, greedy; Memory3 runs at "
                     f"{d['memory3_over_rag']:.2f}x RAG's speed and {d['memory3_over_none']:.2f}x the model without "
                     "memory.")
    lines.append("Stage seconds: " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items())
                 + f" (total {sum(r['stage_seconds'].values())} s)")
    return "\n".join(lines)


def plot(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['model'].replace('control, seed ', 'control s')}\n{row['mode']}" for row in r["rows"]]
    colors = ["tab:green" if row["mode"] == "memory3" else "tab:orange" if row["mode"] == "rag" else "tab:gray"
              for row in r["rows"]]
    panels = [("entity_accuracy", "held-out entity accuracy"), ("text_loss", "held-out real text loss (nats/token)")]
    decoded = [row for row in r["rows"] if row["tokens_per_s"] is not None]
    fig, axes = plt.subplots(1, 3 if decoded else 2, figsize=(15 if decoded else 10, 4.5), dpi=110)
    for ax, (key, title) in zip(axes, panels, strict=False):
        ax.bar(range(len(labels)), [row[key] for row in r["rows"]], color=colors)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if key == "text_loss":  # losses differ by hundredths: start the axis near them
            low, high = min(row[key] for row in r["rows"]), max(row[key] for row in r["rows"])
            ax.set_ylim(low - 0.5 * (high - low) - 0.05, high + 0.2 * (high - low) + 0.02)
    if decoded:
        ax = axes[2]
        ax.bar(range(len(decoded)), [row["tokens_per_s"] for row in decoded],
               color=[c for c, row in zip(colors, r["rows"], strict=True) if row["tokens_per_s"] is not None])
        ax.set_xticks(range(len(decoded)), [row["mode"] for row in decoded], fontsize=8)
        ax.set_title("decode speed, continued model (tokens/s)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("m3jax demo: the continued model with memory, without it and with RAG; memory-off controls")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    demo = Path(_DIR.value)
    try:
        results = collect(demo)
        sample = sample_text(demo)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"demo_report: {e}")
    table = render(results)
    (demo / "results.md").write_text(table + "\n\n" + "\n".join(sample) + "\n")
    (demo / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, demo / "plots" / "evaluation.png")
    print("\n".join(["", "== results", table, "", "== a generated answer", *sample, ""]))
    if _TOTAL.value:
        print(f"demo: {_TOTAL.value} s in this invocation")
    print(f"wrote {demo / 'results.md'}, {demo / 'results.json'}, {demo / 'plots'}/*.png")


if __name__ == "__main__":
    app.run(main)
