"""Decode throughput of generation's three modes, side by side in one run: no memory, Memory3 (retrieval every 64
tokens; the bank's RAM cache off and on) and RAG (5 references of up to 128 tokens before the prompt).

    python tools/bench/decode.py [--model=bench100m|demo] [--batch=32 --prompt_tokens=128 --new_tokens=128]
        [--kb_docs=60 --workdir=runs/bench_decode]

The paper's setup: batch 32, 128 tokens in and 128 out. Wall time of `generate()` includes everything a served
request pays: prefill, decoding, the query embeddings, the ScaNN search, the leakage filter and the bank reads.
Each mode runs once to compile, then `--repeats` timed times (best kept). Tokens/s counts generated tokens.
The model has random parameters (speed does not depend on them); the knowledge base is the first `--kb_docs`
documents of the embedded corpus, written into a bank by those parameters (kept in `--workdir` with the tokenizer
and the index, reused by a rerun). Prompts are windows of the corpus. Targets: Memory3 >= 0.85x no memory and
>= 1.5x RAG (the paper: 733 vs 1131 tokens/s, RAG models 50-60% slower).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from configs import demo  # noqa: E402
from m3jax.config import base_config  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "bench100m", ["bench100m", "demo"], "The model (random parameters).")
_BATCH = flags.DEFINE_integer("batch", 32, "Prompts decoded together.", lower_bound=1)
_PROMPT = flags.DEFINE_integer("prompt_tokens", 128, "Tokens per prompt (bos included).", lower_bound=2)
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per prompt.", lower_bound=1)
_KB_DOCS = flags.DEFINE_integer("kb_docs", 60, "Documents of the embedded corpus in the knowledge base.",
                                lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per mode (best kept).", lower_bound=1)
_WORKDIR = flags.DEFINE_string("workdir", "runs/bench_decode", "Tokenizer, bank and index (reused when present).")
_VOCAB = 4096


def model_config():
    if _MODEL.value == "demo":
        c = demo.get_config()
    else:
        c = base_config()
        c.model.update(num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=16, head_dim=64, mlp_dim=2816,
                       dtype="float32")
    c.model.vocab_size = _VOCAB
    return c


def prepare(workdir: Path, config):
    """(tokenizer, model config, params, bank, index): built once into `workdir`."""
    from m3jax.data.corpus import embedded_corpus
    from m3jax.data.tokenizer import Tokenizer, train_tokenizer
    from m3jax.memory import bank as bank_lib
    from m3jax.memory import knowledge as knowledge_lib
    from m3jax.memory import writer
    from m3jax.model import ModelConfig
    from m3jax.model.params import init_params
    from m3jax.retrieval import build
    from m3jax.retrieval.embedder import Embedder
    from m3jax.retrieval.index import Index, IndexSettings

    workdir.mkdir(parents=True, exist_ok=True)
    spm = workdir / "spm.model"
    docs = embedded_corpus()
    if not spm.exists():
        train_tokenizer([d.text for d in docs], str(spm)[:-len(".model")], vocab_size=_VOCAB)
    tokenizer = Tokenizer(str(spm))
    cfg = ModelConfig.from_config(config.model, config.memory)
    params = init_params(cfg, seed=0)
    knowledge = workdir / f"kb_{_KB_DOCS.value}.jsonl"
    if not knowledge.exists():
        knowledge.write_text("".join(json.dumps({"text": d.text, "id": d.doc_id}) + "\n"
                                     for d in docs[:_KB_DOCS.value]))
    refs = knowledge_lib.load_references(str(knowledge), tokenizer, cfg.memory_ref_len)
    sink = knowledge_lib.sink_tokens(tokenizer, config.memory.sink_text)
    bank_dir = workdir / f"bank_{_MODEL.value}_{_KB_DOCS.value}"
    if not (bank_dir / "done").exists():
        bank, _ = writer.open_for_writing(
            str(bank_dir), refs, architecture=bank_lib.architecture(cfg), tokenizer_sha256=tokenizer.sha256,
            checkpoint={"run_id": "bench", "step": 0}, sink=sink, codec="bf16", refs_per_shard=256,
            record=writer.writer_record(refs, 1, cfg.dtype))
        t0 = time.perf_counter()
        writer.write_references(bank, params, cfg, refs, sink, batch_size=32)
        print(f"bank: {len(refs)} references written in {time.perf_counter() - t0:.0f} s", flush=True)
        (bank_dir / "done").write_text("")
    embedder = Embedder.from_config(config.retrieval)
    bank = bank_lib.MemoryBank.open(str(bank_dir), expect_architecture=bank_lib.architecture(cfg),
                                    expect_tokenizer=tokenizer.sha256)
    index_dir = workdir / f"index_{_MODEL.value}_{_KB_DOCS.value}"
    if not (index_dir / "done").exists():
        vectors = embedder.embed(build.reference_texts(bank, tokenizer, np.arange(bank.num_refs)))
        Index.build(vectors, IndexSettings.from_config(config.retrieval), embedder=embedder.identity, max_k=64,
                    bank=build.bank_binding(bank)).save(str(index_dir))
        (index_dir / "done").write_text("")
    index = Index.load(str(index_dir), expect_embedder=embedder.identity)
    return tokenizer, cfg, params, bank, index, embedder, docs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from m3jax.infer.generate import BankMemories, generate
    from m3jax.memory import bank as bank_lib
    from m3jax.retrieval.query import QueryRetriever

    config = model_config()
    tokenizer, cfg, params, bank, index, embedder, docs = prepare(Path(_WORKDIR.value), config)
    slots = int(config.memory.per_chunk)
    text = tokenizer.encode(" ".join(d.text for d in docs[_KB_DOCS.value:_KB_DOCS.value + 60]))
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(text) - _PROMPT.value, _BATCH.value)
    prompts = [[tokenizer.bos_id, *text[s:s + _PROMPT.value - 1]] for s in starts]

    def source(cache_rows: int) -> BankMemories:
        b = bank_lib.MemoryBank.open(bank.path, expect_architecture=bank_lib.architecture(cfg),
                                     expect_tokenizer=tokenizer.sha256, cache_rows=cache_rows)
        retriever = QueryRetriever.from_config(config.retrieval, embedder, index, b.read_tokens, tokenizer,
                                               refs=slots)
        return BankMemories(b, retriever, tokenizer)

    variants = {"none": ("none", None), "memory3, cache off": ("memory3", 0),
                "memory3, cache on": ("memory3", 4096), "rag": ("rag", 4096)}
    seconds = {}
    for name, (mode, cache_rows) in variants.items():
        src = source(cache_rows) if mode != "none" else None
        runs = []
        for _ in range(_REPEATS.value + 1):
            if cache_rows == 0 and src is not None:
                src = source(0)  # a fresh bank object: nothing cached between runs either
            t0 = time.perf_counter()
            out = generate(params, cfg, prompts, _NEW.value, mode=mode, source=src, slots=slots,
                           bos_id=tokenizer.bos_id)
            jax.block_until_ready(out.tokens)
            runs.append(time.perf_counter() - t0)
        seconds[name] = min(runs[1:])
        print(f"{name:<20} {seconds[name]:8.2f} s  {_BATCH.value * _NEW.value / seconds[name]:8.1f} tokens/s "
              f"(compile run {runs[0]:.1f} s)", flush=True)
    base = seconds["none"]
    print(f"\n{cfg.num_layers} layers x {cfg.hidden_size}, {jax.devices()[0].platform}, batch {_BATCH.value}, "
          f"{_PROMPT.value} in / {_NEW.value} out, {bank.num_refs} references")
    for name, s in seconds.items():
        print(f"{name:<20} {_BATCH.value * _NEW.value / s:8.1f} tokens/s  {base / s:5.2f}x no memory")
    for cache in ("off", "on"):
        print(f"memory3 (cache {cache}) / rag: {seconds['rag'] / seconds[f'memory3, cache {cache}']:.2f}x "
              f"(target >= 1.5x); / none: {base / seconds[f'memory3, cache {cache}']:.2f}x (target >= 0.85x)")


if __name__ == "__main__":
    app.run(main)
