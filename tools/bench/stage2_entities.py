"""The stage-2 entity experiment end to end on CPU: does a model continued with memory read facts it never
trained on?

    python tools/bench/stage2_entities.py --workdir=runs/stage2_entities [--reuse] [--num_entities=300 ...]

Stages (real components; each one's wall time is measured and kept in WORKDIR/stages/, and `--reuse` skips a
stage whose record exists; `--share_from=OTHER` takes OTHER's entities, tokenizer, data, warm-up and retrieved ids,
so a sweep over stage-2 settings (k, memory layers, steps, learning rate) retrains only stage 2):
  entities     tools/make_entities.py: fictional people; held-out ones exist only in the knowledge base; the
               stage-2 text is their bios mixed with the embedded corpus (--mix_ratio of the characters);
               --num_attributes=N keeps the first N attributes (4: references of ~37 tokens instead of ~71-100)
  tokenizer    tools/train_tokenizer.py on the stage-2 text
  data         tools/prepare_data.py at --seq_len (256) (the stage-2 text)
  data_warmup  the embedded corpus alone (--warmup_text=corpus, the default): no entity's facts are in the
               weights when stage 2 starts, so whatever it gets right it learned in stage 2
  warmup       configs/demo.py's model, LM objective, --warmup_steps
  bank         tools/write_memory.py: the knowledge base's memories, written by the warm-up checkpoint
  index        tools/build_index.py;  retrieve: tools/retrieve.py (the train split's reference ids)
  stage2_memory  configs/continued_demo.py in --mode (bank: the warm-up's bank) from the warm-up checkpoint
  stage2_off     (--controls) the same init, steps, data order and schedule, memory.read=False
  bank_*       banks rewritten by each stage-2 checkpoint (the "rewritten" rows)
  cloze        m3jax/infer/cloze.py on --eval_entities held-out and training entities, every arm, every model

Prints a table of exact-match accuracy per arm (retrieved, oracle, shuffled, empty, off) and the retrieval
recall@1, and writes WORKDIR/results.json (per attribute too). A stage-2 model is evaluated with the warm-up's
bank (what it trained with; its memories are --stage2_steps old) and with a bank its own checkpoint rewrote.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from absl import app, flags, logging

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.bench.stages import Bench  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/stage2_entities", "Where every stage writes.")
_REUSE = flags.DEFINE_bool("reuse", False, "Skip the stages already finished in --workdir.")
_NUM_ENTITIES = flags.DEFINE_integer("num_entities", 300, "Fictional people (20% held out).", lower_bound=10)
_ATTRIBUTES = flags.DEFINE_integer("num_attributes", 10, "Attributes per entity (the first N; fewer: shorter "
                                   "knowledge-base references).", lower_bound=2)
_BIOS = flags.DEFINE_integer("bios_per_entity", 4, "Biographies per training entity.", lower_bound=1)
_MIX_RATIO = flags.DEFINE_float("mix_ratio", 0.5, "Fraction of the stage-2 training text that is bios (the rest: "
                                "the embedded corpus).")
_WARMUP_TEXT = flags.DEFINE_enum("warmup_text", "corpus", ["corpus", "train"],
                                 "What the warm-up trains on: the embedded corpus alone (no entity's facts are in "
                                 "the weights when stage 2 starts), or stage 2's own text (bios included).")
_SHARE_FROM = flags.DEFINE_string("share_from", "", "Another workdir of this bench whose entities, tokenizer, data, "
                                  "warm-up and retrieved ids this run reuses (a sweep over stage-2 settings); "
                                  "its data-shaping flags must equal this run's.")
_OVERRIDES = flags.DEFINE_list("overrides", [], "More config settings (key=value, comma-separated) for every tool, "
                                "e.g. a smaller model: model.hidden_size=128,model.mlp_dim=256.")
_TRACK = flags.DEFINE_integer("track_every", 0, "Score the held-out entities every N steps of the memory run while it "
                              "trains (eval.cloze through the warm-up bank's index; 0: only at the end).",
                              lower_bound=0)
_CONTROLS = flags.DEFINE_bool("controls", True, "Also train the memory-off control run.")
_PEAK_LR = flags.DEFINE_float("peak_lr", 1e-3, "Stage 2's peak learning rate.", lower_bound=0.0)
_MODE = flags.DEFINE_enum("mode", "bank", ["bank", "online"], "Stage 2's retrieval.mode: the warm-up's bank, or "
                          "the references encoded in every step by the parameters being trained.")
_ENCODE_GRAD = flags.DEFINE_bool("encode_grad", False, "Online mode: gradients through the encoding "
                                 "(memory.encode_grad), so that the writer learns what to keep.")
_VOCAB = flags.DEFINE_integer("vocab_size", 2048, "Tokenizer vocabulary.", lower_bound=300)
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 400, "Warm-up (LM) training steps.", lower_bound=1)
_STAGE2_STEPS = flags.DEFINE_integer("stage2_steps", 1000, "Stage-2 steps (memory run and its control).",
                                     lower_bound=1)
_K = flags.DEFINE_integer("k", 8, "memory.k: tokens kept per memory per memory KV head.", lower_bound=1)
_LAYERS = flags.DEFINE_string("memory_layers", "first_half", "memory.layers: first_half, all, or indices.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the entities, the model's init and the data order.")
_EVAL_ENTITIES = flags.DEFINE_integer("eval_entities", 50, "Entities of each split (held out, training) whose "
                                      "cloze items are evaluated.", lower_bound=2)
_GEN_STEPS = flags.DEFINE_integer("gen_tokens", 6, "Greedy tokens generated per prompt.", lower_bound=1)
_TRAIN_BATCH = flags.DEFINE_integer("batch_size", 8, "Training sequences (of --seq_len tokens) per step.",
                                    lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Training sequence length of both stages (a multiple of "
                                "memory.chunk_size = 64).", lower_bound=64)
_BATCH = flags.DEFINE_integer("eval_batch", 64, "Prompts per generation batch.", lower_bound=1)

# Stages a sweep point takes from --share_from (the bank and index depend on memory.k: they are its own) and the
# directories each one wrote.
SHARED_DIRS = {"entities": ("entities",), "tokenizer": ("tokenizer",), "data": ("data",),
               "data_warmup": ("data_warmup",), "warmup": ("warmup",), "retrieve": ()}
ARM_ORDER = ("retrieved", "oracle", "shuffled", "empty", "off")


def memory_flags() -> list[str]:
    """Config settings every tool of the pipeline gets: the memory geometry and --overrides."""
    return [f"--config.memory.k={_K.value}", f"--config.memory.layers={_LAYERS.value}",
            *(f"--config.{o}" for o in _OVERRIDES.value)]


def stage2_mode_flags(knowledge: str, spm: str) -> list[str]:
    """Stage 2's memory mode: bank (the warm-up's bank) or online, with or without the encoding's gradient."""
    if _MODE.value == "bank":
        if _ENCODE_GRAD.value:
            raise app.UsageError("--encode_grad needs --mode=online: a bank's memories are constants")
        return ["--config.retrieval.mode=bank"]
    return ["--config.retrieval.mode=online", f"--config.memory.knowledge={knowledge}",
            f"--config.data.tokenizer={spm}", f"--config.memory.encode_grad={_ENCODE_GRAD.value}"]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    workdir = Path(_WORKDIR.value).resolve()
    if not _REUSE.value and workdir.exists() and any(workdir.iterdir()):
        sys.exit(f"stage2_entities: {workdir} is not empty; give --reuse to continue it or another --workdir")
    b = Bench(workdir, _REUSE.value)
    if _SHARE_FROM.value:
        b.share(Path(_SHARE_FROM.value).resolve(), SHARED_DIRS)
    ent, spm, data, bank = b.path("entities"), b.path("tokenizer", "spm.model"), b.path("data"), b.path("bank")
    knowledge = b.path("entities", "knowledge.jsonl")
    warm, w, s = b.path("warmup"), _WARMUP_STEPS.value, _STAGE2_STEPS.value
    warm_data = b.path("data_warmup") if _WARMUP_TEXT.value == "corpus" else data
    demo_flags = [f"--config.seed={_SEED.value}", f"--config.data.shuffle_seed={_SEED.value}",
                  "--config.train.eval_every=0", "--config.train.log_every=10",
                  f"--config.data.global_batch_size={_TRAIN_BATCH.value}",
                  f"--config.data.seq_len={_SEQ_LEN.value}", *memory_flags()]

    b.stage("entities", lambda: b.run("tools/make_entities.py", f"--out={ent}", f"--seed={_SEED.value}",
                                      f"--num_entities={_NUM_ENTITIES.value}", f"--bios_per_entity={_BIOS.value}",
                                      f"--num_attributes={_ATTRIBUTES.value}",
                                      f"--mix_ratio={_MIX_RATIO.value}"))
    b.stage("tokenizer", lambda: b.run("tools/train_tokenizer.py", f"--corpus={ent}/train.jsonl",
                                       f"--out={spm[:-len('.model')]}", f"--vocab_size={_VOCAB.value}"))
    b.stage("data", lambda: b.run("tools/prepare_data.py", f"--corpus={ent}/train.jsonl", f"--tokenizer={spm}",
                                  f"--out={data}", f"--seq_len={_SEQ_LEN.value}"))
    if _WARMUP_TEXT.value == "corpus":
        b.stage("data_warmup", lambda: b.run("tools/prepare_data.py", "--corpus=embedded", f"--tokenizer={spm}",
                                             f"--out={warm_data}", f"--seq_len={_SEQ_LEN.value}"))
    b.stage("warmup", lambda: b.run("-m", "m3jax.train", "--config=configs/demo.py", f"--workdir={warm}",
                                    f"--config.data.path={warm_data}", f"--config.train.num_steps={w}",
                                    f"--config.train.checkpoint_every={w}", *demo_flags,
                                    f"--config.optimizer.warmup_steps={min(20, max(1, w // 10))}"))

    def write_bank(checkpoint: str, out: str) -> None:
        b.run("tools/write_memory.py", "--config=configs/demo.py", f"--checkpoint={checkpoint}", f"--tokenizer={spm}",
              f"--knowledge={knowledge}", f"--bank={out}", *memory_flags())

    b.stage("bank", lambda: write_bank(warm, bank))
    b.stage("index", lambda: b.run("tools/build_index.py", "--config=configs/demo.py", f"--bank={bank}",
                                   f"--tokenizer={spm}", *memory_flags()))
    b.stage("retrieve", lambda: b.run("tools/retrieve.py", "--config=configs/demo.py", f"--data={data}",
                                      f"--bank={bank}", "--knowledge=", *memory_flags()))
    if _TRACK.value and not os.path.exists(os.path.join(data, "retrieval-heldout", "retrieval.json")):
        # the scoring during training also reports held-out text with memory: its chunks' retrieved ids
        b.stage("retrieve_heldout", lambda: b.run("tools/retrieve.py", "--config=configs/demo.py", f"--data={data}",
                                                  "--split=heldout", f"--bank={bank}", "--knowledge=",
                                                  *memory_flags()))
    runs = {"stage2_memory": []}
    if _TRACK.value:
        runs["stage2_memory"] = [f"--config.train.eval_every={_TRACK.value}", f"--config.eval.cloze={ent}/cloze.jsonl",
                                 f"--config.eval.cloze_index={bank}/index",
                                 f"--config.eval.cloze_tokens={_GEN_STEPS.value}"]
    if _CONTROLS.value:
        runs["stage2_off"] = ["--config.memory.read=False"]
    for name, extra in runs.items():
        b.stage(name, lambda name=name, extra=extra: b.run(
            "-m", "m3jax.train", "--config=configs/continued_demo.py", f"--workdir={b.path(name)}",
            f"--config.init_from={warm}/checkpoints/{w}", f"--config.data.path={data}", f"--config.memory.bank={bank}",
            f"--config.train.num_steps={s}", f"--config.train.checkpoint_every={s}", *demo_flags, *extra,
            f"--config.optimizer.peak_lr={_PEAK_LR.value}", *stage2_mode_flags(knowledge, spm),
            f"--config.optimizer.warmup_steps={min(10, max(1, s // 10))}"))
        b.stage(f"bank_{name}", lambda name=name: write_bank(b.path(name), b.path(f"bank_{name}")))

    t0 = time.perf_counter()
    results = evaluate(b, spm, knowledge, bank)
    results["writer_selection"] = writer_selection(b, spm, knowledge, bank)
    # what the memory run's own writer keeps: the bank its final checkpoint wrote, which its rows read
    results["writer_selection_trained"] = writer_selection(b, spm, knowledge, b.path("bank_stage2_memory"))
    b.seconds["cloze"] = time.perf_counter() - t0
    results["stage_seconds"] = b.seconds
    settings = (_NUM_ENTITIES, _ATTRIBUTES, _BIOS, _MIX_RATIO, _WARMUP_TEXT, _VOCAB, _TRAIN_BATCH, _WARMUP_STEPS,
                _STAGE2_STEPS, _PEAK_LR, _MODE, _ENCODE_GRAD, _K, _LAYERS, _OVERRIDES, _SEED, _EVAL_ENTITIES,
                _GEN_STEPS, _CONTROLS, _SHARE_FROM)
    results["settings"] = {f.name: f.value for f in settings}
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))
    print(f"wrote {workdir / 'results.json'}")


def evaluate(b: Bench, spm: str, knowledge: str, warm_bank: str) -> dict:
    """Cloze accuracy of every (model, bank) pair and arm on the chosen held-out and training entities."""
    import numpy as np
    from ml_collections import config_dict

    from m3jax.checkpoint import load_model
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.infer import cloze
    from m3jax.memory import bank as bank_lib
    from m3jax.memory import knowledge as knowledge_lib
    from m3jax.retrieval.embedder import Embedder
    from m3jax.retrieval.index import Index
    from m3jax.retrieval.query import QueryRetriever

    tokenizer = Tokenizer(spm)
    meta = json.loads(Path(b.path("entities", "entities.json")).read_text())
    items = [json.loads(line) for line in Path(b.path("entities", "cloze.jsonl")).read_text().splitlines()]
    rng = np.random.default_rng(_SEED.value)
    chosen = set()
    for heldout in (True, False):
        pool = [e["index"] for e in meta["entities"] if e["heldout"] == heldout]
        chosen.update(rng.choice(pool, min(_EVAL_ENTITIES.value, len(pool)), replace=False).tolist())
    items = [it for it in items if it["entity"] in chosen]
    prompts = [it["prompt"] for it in items]

    warm = load_model(b.path("warmup"))
    cfg = load_model(b.path("stage2_memory")).model_config  # the memory geometry of stage 2 (and of the banks)
    refs = knowledge_lib.load_references(knowledge, tokenizer, cfg.memory_ref_len)
    first_ref = np.searchsorted(refs.doc_index, np.arange(len(refs.doc_ids)))  # each entity's first reference
    spans = np.bincount(refs.doc_index, minlength=len(refs.doc_ids))
    oracle = first_ref[[it["entity"] for it in items]]
    sink = knowledge_lib.sink_tokens(tokenizer, "Reference:")

    retrieval = config_dict.ConfigDict({"embedder": "all-MiniLM-L6-v2", "embed_max_len": 256,
                                        "embed_batch_size": 64, "refs_per_chunk": 1, "candidates": 20,
                                        "eval_max_overlap": 2 / 3})
    embedder = Embedder.from_config(retrieval)
    index = Index.load(os.path.join(warm_bank, "index"), expect_embedder=embedder.identity)
    retriever = QueryRetriever.from_config(retrieval, embedder, index, lambda ids: refs.rows(ids)[0], tokenizer)
    retrieved = retriever(prompts)[:, 0]
    references = cloze.arm_references(ARM_ORDER, oracle, retrieved=retrieved, seed=_SEED.value)

    def open_bank(path):
        return bank_lib.MemoryBank.open(path, expect_architecture=bank_lib.architecture(cfg),
                                        expect_tokenizer=tokenizer.sha256, expect_sink_tokens=sink.tolist())

    rows = {}
    models = {"warmup": (warm, {"warmup": warm_bank}),
              "stage2_memory": (None, {"warmup": warm_bank, "rewritten": b.path("bank_stage2_memory")})}
    if _CONTROLS.value:
        models["stage2_off"] = (None, {"warmup": warm_bank, "rewritten": b.path("bank_stage2_off")})
    attributes = [it["attribute"] for it in items]
    heldout = np.asarray([it["heldout"] for it in items])
    answers = [it["answer"] for it in items]
    for model_name, (loaded, banks) in models.items():
        loaded = loaded or load_model(b.path(model_name))
        off = None
        for bank_name, path in banks.items():
            arms = {a: r for a, r in references.items() if a != "off" or off is None}
            t0 = time.perf_counter()
            texts = cloze.complete(loaded.params, cfg, tokenizer, prompts, arms, bank=open_bank(path), sink=sink,
                                   steps=_GEN_STEPS.value, batch_size=_BATCH.value)
            off = texts.get("off", off)
            texts["off"] = off
            correct = {a: np.asarray([cloze.exact_match(t, ans) for t, ans in zip(texts[a], answers, strict=True)])
                       for a in ARM_ORDER}
            row = rows[f"{model_name} / {bank_name} bank"] = {
                "summary": cloze.summarize(correct, attributes, heldout, oracle, retrieved),
                "examples": [{"prompt": prompts[i], "answer": answers[i], **{a: texts[a][i] for a in ARM_ORDER}}
                             for i in np.flatnonzero(heldout)[:3]],
                "seconds": time.perf_counter() - t0}
            print(f"   cloze {model_name} / {bank_name} bank: {row['seconds']:.0f} s", flush=True)
    chance = {name: a["majority_chance"] for name, a in meta["attributes"].items()}
    return {"items": len(items), "entities": {"heldout": int(heldout.sum() // len(set(attributes))),
                                              "train": int((~heldout).sum() // len(set(attributes)))},
            "entities_over_one_reference": int((spans > 1).sum()), "majority_chance_heldout": chance,
            "rows": rows}


def writer_selection(b: Bench, spm: str, knowledge: str, bank_path: str, max_refs: int = 200) -> dict:
    """Which tokens of the entity references the bank kept (the writer's top-k by attention received): per memory
    layer, the share of attribute values whose first token some head of the layer kept, the share one head keeps
    on average, the share whose every token some head of the layer kept (a value of several pieces is answered
    piece by piece), and the pieces kept most often. A value whose tokens no layer kept cannot be read."""
    import collections

    import jax.numpy as jnp
    import numpy as np

    from m3jax.checkpoint import load_model
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.memory import bank as bank_lib
    from m3jax.memory import knowledge as knowledge_lib

    tokenizer = Tokenizer(spm)
    cfg = load_model(b.path("stage2_memory")).model_config
    bank = bank_lib.MemoryBank.open(bank_path, expect_architecture=bank_lib.architecture(cfg),
                                    expect_tokenizer=tokenizer.sha256)
    sink_len = len(bank.metadata["sink_tokens"])
    refs = knowledge_lib.load_references(knowledge, tokenizer, cfg.memory_ref_len)
    meta = json.loads(Path(b.path("entities", "entities.json")).read_text())
    attributes = list(meta["attributes"])  # in ATTRIBUTES order, as the entry states them
    first_ref = np.searchsorted(refs.doc_index, np.arange(len(refs.doc_ids)))
    n = min(max_refs, len(meta["entities"]))
    _, positions = bank.gather(first_ref[:n, None], dtype=jnp.float32)
    positions = np.asarray(positions)[:, 0] - sink_len  # [n, Lm, mkv, k] token index in the reference (<0: none)
    layers = positions.shape[1]
    any_head = np.zeros((n, layers, len(attributes)), bool)
    per_head = np.zeros((n, layers, len(attributes)))
    whole = np.zeros((n, layers, len(attributes)), bool)
    value_tokens = []
    pieces: collections.Counter = collections.Counter()
    for i in range(n):
        r = first_ref[i]
        tokens = refs.tokens[refs.starts[r]:refs.starts[r] + refs.lengths[r]].tolist()
        starts = [len(tokenizer.decode(tokens[:j])) for j in range(len(tokens) + 1)]
        text = tokenizer.decode(tokens)
        values = meta["entities"][i]["values"]
        # each value's first token: the last token starting at or before the value's first character
        cursor, first_tokens, spans = 0, [], []
        for a in attributes:
            c = text.find(values[a], cursor)
            cursor = c + len(values[a])
            first_tokens.append(max(j for j in range(len(tokens)) if starts[j] <= c))
            spans.append([j for j in range(first_tokens[-1], len(tokens)) if starts[j] < cursor])
        value_tokens.append(np.mean([len(t) for t in spans]))
        for layer in range(layers):
            kept = [set(positions[i, layer, h][positions[i, layer, h] >= 0].tolist())
                    for h in range(positions.shape[2])]
            union = set().union(*kept)
            any_head[i, layer] = [t in union for t in first_tokens]
            per_head[i, layer] = [np.mean([t in k for k in kept]) for t in first_tokens]
            whole[i, layer] = [set(span) <= union for span in spans]
            pieces.update(tokenizer.decode([tokens[t]]).strip() or repr(tokenizer.decode([tokens[t]]))
                          for t in union if t < len(tokens))
    return {"references": n, "k": int(positions.shape[-1]), "mean_tokens": float(refs.lengths[first_ref[:n]].mean()),
            "memory_layers": list(cfg.memory_layers),
            "value_kept_by_some_head": [float(any_head[:, layer].mean()) for layer in range(layers)],
            "value_kept_by_one_head": [float(per_head[:, layer].mean()) for layer in range(layers)],
            "value_kept_by_some_layer": float(any_head.any(axis=1).mean()),
            "mean_value_tokens": float(np.mean(value_tokens)),
            "whole_value_kept_by_some_head": [float(whole[:, layer].mean()) for layer in range(layers)],
            "by_attribute_some_layer": {a: float(any_head[:, :, j].any(axis=1).mean())
                                        for j, a in enumerate(attributes)},
            "most_kept_pieces": pieces.most_common(12)}


def render(results: dict) -> str:
    chance = results["majority_chance_heldout"]
    lines = [f"cloze exact match, {results['entities']['heldout']} held-out and {results['entities']['train']} "
             f"training entities ({results['items']} items); held-out majority chance, mean over attributes: "
             f"{sum(chance.values()) / len(chance):.3f}",
             f"{'model / bank':<30} {'split':<8} " + " ".join(f"{a:>9}" for a in ARM_ORDER) + f" {'recall@1':>9}"]
    for name, row in results["rows"].items():
        for split in ("heldout", "train"):
            s = row["summary"][split]
            lines.append(f"{name:<30} {split:<8} " + " ".join(f"{s['accuracy'][a]:>9.3f}" for a in ARM_ORDER)
                         + f" {s['recall_at_1']:>9.3f}")
    for key, who in (("writer_selection", "warm-up writer"), ("writer_selection_trained", "stage-2 writer")):
        w = results[key]
        lines.append(f"{who} (k={w['k']}, {w['references']} references of {w['mean_tokens']:.0f} tokens): "
                     f"attribute values kept by some head, per memory layer {w['memory_layers']}: "
                     + ", ".join(f"{v:.2f}" for v in w["value_kept_by_some_head"])
                     + "; by one head: " + ", ".join(f"{v:.2f}" for v in w["value_kept_by_one_head"])
                     + f"; by some layer: {w['value_kept_by_some_layer']:.2f}; every token of the value "
                     f"({w['mean_value_tokens']:.1f} on average) by some head: "
                     + ", ".join(f"{v:.2f}" for v in w["whole_value_kept_by_some_head"]) + "; most kept: "
                     + ", ".join(f"{p!r} {c}" for p, c in w["most_kept_pieces"][:8]))
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_seconds"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
