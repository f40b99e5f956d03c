"""Held-out loss on real text after the continued stage: with memory, empty memory and memory off, against the
shuffled-memory and memory-off controls, with seed noise.

    python tools/bench/stage2_controls.py --workdir=runs/stage2_controls [--reuse] [--seeds=0,1,2]
        [--warmup_steps=400 --stage2_steps=60 --batch_size=8 --eval_batches=0 ...]

Cost, measured on 2 CPU cores under a load of ~7: embedding the knowledge base (5.5k references) 6-8 min and the
training split's 10.5k chunks 6-9 min, an LM step 1.75 s, a stage-2 step with memory 2.05 s, a stage-2 run's start-up
and two evaluations ~40 s (the XLA compilation cache shares compiles between runs): ~55 min for the defaults.
Idle cores are ~3x faster (0.55 s a warm-up step): ~20 min; 10 stage-2 steps more add ~1 min (~3 min loaded).

Stages (real components; each one's wall time is measured and kept in WORKDIR/stages/, and `--reuse` skips a
stage whose record exists):
  tokenizer  tools/train_tokenizer.py on the embedded corpus (CPython's documentation)
  data       tools/prepare_data.py at seq_len 256: train and held-out documents; the knowledge base is every
             document, the held-out ones included, so their text reaches a model only through memory
  warmup     configs/demo.py's model, LM objective, --warmup_steps
  bank       tools/write_memory.py: the knowledge base's memories, written by the warm-up checkpoint
  index      tools/build_index.py into WORKDIR/index (it embeds the references' text: no checkpoint in it)
  retrieve_train, retrieve_heldout  tools/retrieve.py: the reference ids of each split's 64-token chunks (eq. 6
             and the provenance filter: a chunk never reads a reference cut from its own document; --provenance
             turns the latter off for the train split)
  ARM_sSEED  for each seed in --seeds and each arm, configs/continued_demo.py (bank mode) from the warm-up
             checkpoint for --stage2_steps, data.shuffle_seed = config.seed = SEED, evaluated at step 0 and at
             the end on every record of the held-out split (or its first --eval_batches global batches):
    memory     reads the retrieved references
    shuffled   memory.shuffle_references=True: every id mapped through a random permutation (seeded by the
               data order's seed), in training and in evaluation alike (its "with memory" loss reads random
               references)
    off        memory.read=False: the plain model, same init, steps, data order and schedule

Each run's eval records (metrics.jsonl) give the loss with memory, with every slot empty (sink kept) and with
memory off (the same weights as a plain model); a memory-off run reports only the last. Prints, per arm, the mean
± std over seeds at step 0 (the warm-up checkpoint: the same for every seed but the shuffled arm's permutation)
and at the end, and the paired differences (within a run: memory − empty memory; across arms, seed by seed:
memory − off, memory − shuffled), and writes WORKDIR/results.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from absl import app, flags, logging

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.stages import Bench, metrics  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/stage2_controls", "Where every stage writes.")
_REUSE = flags.DEFINE_bool("reuse", False, "Skip the stages already finished in --workdir.")
_SHARE_FROM = flags.DEFINE_string("share_from", "", "Another workdir of this bench whose tokenizer, data, warm-up "
                                  "and retrieved ids this run reuses (a sweep over stage-2 settings); its "
                                  "--vocab_size, --batch_size, --warmup_steps and --provenance must equal this run's.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Stage-2 seeds (data order and config.seed); every arm runs "
                           "each.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Tokenizer vocabulary.", lower_bound=300)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences (of 256 tokens) per step, warm-up, stage 2 and "
                              "evaluation alike.", lower_bound=1)
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 400, "Warm-up (LM) training steps.", lower_bound=1)
_STAGE2_STEPS = flags.DEFINE_integer("stage2_steps", 60, "Stage-2 steps of every run.", lower_bound=1)
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 0, "Held-out global batches each evaluation scores (the "
                                     "split's first); 0 = every record.", lower_bound=0)
_PEAK_LR = flags.DEFINE_float("peak_lr", 1e-3, "Stage 2's peak learning rate.", lower_bound=0.0)
_K = flags.DEFINE_integer("k", 8, "memory.k: tokens kept per memory per memory KV head.", lower_bound=1)
_LAYERS = flags.DEFINE_string("memory_layers", "first_half", "memory.layers: first_half, all, or indices.")
_PROVENANCE = flags.DEFINE_bool("provenance", True, "Training chunks drop references cut from their own document "
                                "(False: eq. 6 alone). Held-out chunks always do.")

ARMS = {"memory": (), "shuffled": ("--config.memory.shuffle_references=True",), "off": ("--config.memory.read=False",)}
METRICS = ("loss", "loss_empty_memory", "loss_memory_off")
# Stages a sweep point takes from --share_from (the bank depends on the memory settings: it is its own; the index
# embeds the references' text and the retrieved ids name references, whatever they are) and the directories each
# one wrote.
SHARED_DIRS = {"tokenizer": ("tokenizer",), "data": ("data",), "warmup": ("warmup",),
               "index": ("index", "index-vectors"), "retrieve_train": (), "retrieve_heldout": ()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    seeds = [int(s) for s in _SEEDS.value]
    if not seeds or len(set(seeds)) != len(seeds):
        raise app.UsageError(f"--seeds: distinct integers, got {_SEEDS.value}")
    workdir = Path(_WORKDIR.value).resolve()
    if not _REUSE.value and workdir.exists() and any(workdir.iterdir()):
        sys.exit(f"stage2_controls: {workdir} is not empty; give --reuse to continue it or another --workdir")
    b = Bench(workdir, _REUSE.value, compile_cache=True)
    if _SHARE_FROM.value:
        b.share(Path(_SHARE_FROM.value).resolve(), SHARED_DIRS)
    spm, data, bank, warm = b.path("tokenizer", "spm.model"), b.path("data"), b.path("bank"), b.path("warmup")
    index = b.path("index")
    w, s, batch = _WARMUP_STEPS.value, _STAGE2_STEPS.value, _BATCH.value
    memory_flags = [f"--config.memory.k={_K.value}", f"--config.memory.layers={_LAYERS.value}"]

    b.stage("tokenizer", lambda: b.run("tools/train_tokenizer.py", "--corpus=embedded",
                                       f"--out={spm[:-len('.model')]}", f"--vocab_size={_VOCAB.value}"))
    b.stage("data", lambda: b.run("tools/prepare_data.py", "--corpus=embedded", f"--tokenizer={spm}",
                                  f"--out={data}", "--seq_len=256"))
    heldout = json.loads(Path(data, "metadata.json").read_text())["splits"]["heldout"]["num_records"]
    eval_batches = _EVAL_BATCHES.value
    if eval_batches > heldout // batch:
        sys.exit(f"stage2_controls: the held-out split of {data} holds {heldout} records, {heldout // batch} "
                 f"batches of --batch_size={batch}: --eval_batches={eval_batches} does not fit")
    b.stage("warmup", lambda: b.run("-m", "m3jax.train", "--config=configs/demo.py", f"--workdir={warm}",
                                    f"--config.data.path={data}", f"--config.data.global_batch_size={batch}",
                                    f"--config.train.num_steps={w}", f"--config.train.checkpoint_every={w}",
                                    "--config.train.eval_every=0", "--config.train.log_every=10", *memory_flags,
                                    f"--config.optimizer.warmup_steps={min(20, max(1, w // 10))}"))
    b.stage("bank", lambda: b.run("tools/write_memory.py", "--config=configs/demo.py", f"--checkpoint={warm}",
                                  f"--tokenizer={spm}", "--knowledge=embedded", f"--bank={bank}", *memory_flags))
    b.stage("index", lambda: b.run("tools/build_index.py", "--config=configs/demo.py", f"--bank={bank}",
                                   f"--tokenizer={spm}", f"--index={index}", *memory_flags))
    for split in ("train", "heldout"):
        knowledge = [] if split == "heldout" or _PROVENANCE.value else ["--knowledge="]
        b.stage(f"retrieve_{split}", lambda split=split, knowledge=knowledge: b.run(
            "tools/retrieve.py", "--config=configs/demo.py", f"--data={data}", f"--bank={bank}", f"--index={index}",
            f"--split={split}", *knowledge, *memory_flags))

    for seed in seeds:
        for arm, extra in ARMS.items():
            name = f"{arm}_s{seed}"
            b.stage(name, lambda name=name, seed=seed, extra=extra: b.run(
                "-m", "m3jax.train", "--config=configs/continued_demo.py", f"--workdir={b.path(name)}",
                f"--config.init_from={warm}/checkpoints/{w}", f"--config.data.path={data}",
                f"--config.memory.bank={bank}", "--config.retrieval.mode=bank",
                f"--config.seed={seed}", f"--config.data.shuffle_seed={seed}",
                f"--config.data.global_batch_size={batch}", f"--config.train.num_steps={s}",
                f"--config.train.checkpoint_every={s}", f"--config.train.eval_every={s}",
                f"--config.train.eval_batches={eval_batches}", "--config.train.log_every=10", *memory_flags, *extra,
                f"--config.optimizer.peak_lr={_PEAK_LR.value}",
                f"--config.optimizer.warmup_steps={min(10, max(1, s // 10))}"))

    results = summarize(b, seeds, s)
    results["heldout"] = {"records": heldout, "eval_batches": eval_batches,
                          "records_scored": heldout if eval_batches == 0 else eval_batches * batch}
    results["retrieval"] = {split: retrieval_line(b, split) for split in ("train", "heldout")}
    results["stage_seconds"] = b.seconds
    settings = (_SEEDS, _VOCAB, _BATCH, _WARMUP_STEPS, _STAGE2_STEPS, _EVAL_BATCHES, _PEAK_LR, _K, _LAYERS,
                _PROVENANCE, _SHARE_FROM)
    results["settings"] = {f.name: f.value for f in settings}
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))
    print(f"wrote {workdir / 'results.json'}")


def summarize(b: Bench, seeds: list[int], steps: int) -> dict:
    """Each run's eval metrics at step 0 and `steps`, their mean ± std over seeds, and the paired differences.

    A memory-off run's only metric, its "loss", is the plain model's: it goes to loss_memory_off."""
    runs: dict[str, dict[int, dict]] = {}
    for arm in ARMS:
        runs[arm] = {}
        for seed in seeds:
            evals, train = metrics(b.path(f"{arm}_s{seed}"), "eval"), metrics(b.path(f"{arm}_s{seed}"), "train")
            missing = {0, steps} - set(evals)
            if missing:
                sys.exit(f"stage2_controls: {b.path(f'{arm}_s{seed}', 'metrics.jsonl')} has no eval record at "
                         f"step {sorted(missing)}")
            per_step = {}
            for step in (0, steps):
                rec = evals[step]
                per_step[step] = ({"loss_memory_off": rec["loss"]} if arm == "off"
                                  else {m: rec[m] for m in METRICS})
            times = [train[st]["step_time_s"] for st in sorted(train) if "step_time_s" in train[st]][1:]  # 1st: compile
            runs[arm][seed] = {"step0": per_step[0], "final": per_step[steps],
                               "step_time_s": statistics.median(times) if times else None}
    table = {when: {arm: {m: mean_std([runs[arm][seed][when][m] for seed in seeds])
                          for m in runs[arm][seeds[0]][when]} for arm in ARMS} for when in ("step0", "final")}

    def paired(a: str, ma: str, b_: str, mb: str) -> dict:
        return mean_std([runs[a][seed]["final"][ma] - runs[b_][seed]["final"][mb] for seed in seeds])

    differences = {
        "memory: loss - loss_empty_memory (within a run)": paired("memory", "loss", "memory", "loss_empty_memory"),
        "shuffled: loss - loss_empty_memory (within a run)": paired("shuffled", "loss", "shuffled",
                                                                    "loss_empty_memory"),
        "memory arm loss - off arm loss (same seed)": paired("memory", "loss", "off", "loss_memory_off"),
        "memory arm loss - shuffled arm loss (same seed)": paired("memory", "loss", "shuffled", "loss"),
        "memory arm loss_memory_off - off arm loss (same seed)": paired("memory", "loss_memory_off", "off",
                                                                        "loss_memory_off"),
    }
    step_times = {arm: [r["step_time_s"] for r in runs[arm].values() if r["step_time_s"] is not None]
                  for arm in ARMS}
    return {"steps": steps, "seeds": seeds, "table": table, "differences": differences,
            "step_time_s": {arm: mean_std(t) if t else None for arm, t in step_times.items()},
            "runs": {arm: {str(seed): r for seed, r in by_seed.items()} for arm, by_seed in runs.items()}}


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (None for one value) of `values`."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def retrieval_line(b: Bench, split: str) -> str:
    """tools/retrieve.py's summary of a split (chunks searched, dropped by each filter, left without a reference),
    from the log of the workdir that ran it."""
    stage = f"retrieve_{split}"
    ran_in = Path(_SHARE_FROM.value).resolve() if stage in b.shared else b.dir
    log = ran_in / "logs" / f"{stage}.log"
    lines = [line for line in log.read_text().splitlines() if line.startswith("retrieve: process")] if log.exists() \
        else []
    return lines[-1] if lines else ""


def fmt(v: dict | None) -> str:
    if v is None:
        return f"{'-':>17}"
    std = f"{v['std']:.4f}" if v["std"] is not None else "-"
    return f"{v['mean']:>8.4f} ± {std:<6}"


def render(results: dict) -> str:
    h, n = results["heldout"], len(results["seeds"])
    first = f" (the first {h['eval_batches']} batches)" if h["eval_batches"] else ""
    lines = [f"held-out loss on the embedded corpus: {h['records_scored']} of {h['records']} held-out records{first}; "
             f"mean ± std over {n} seeds ({', '.join(map(str, results['seeds']))}); the shuffled arm reads shuffled "
             "references in evaluation"]
    header = f"{'':<26} " + " ".join(f"{c:>17}" for c in ("with memory", "empty memory", "memory off"))
    for when, title in (("step0", "step 0 (the warm-up checkpoint)"), ("final", f"after {results['steps']} stage-2 "
                                                                                 "steps")):
        lines += ["", title, header]
        for arm, row in results["table"][when].items():
            lines.append(f"{arm:<26} " + " ".join(fmt(row.get(m)) for m in METRICS))
    lines += ["", f"paired differences after {results['steps']} steps (mean ± std, n seeds)"]
    for name, d in results["differences"].items():
        lines.append(f"{name:<54} {fmt(d)} n={d['n']}")
    lines.append("")
    lines.append("median step time (s), mean over seeds: " + ", ".join(
        f"{arm} {v['mean']:.3f}" if v else f"{arm} -" for arm, v in results["step_time_s"].items()))
    for split, line in results["retrieval"].items():
        lines.append(f"{split}: {line}")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_seconds"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
