"""Loss on held-out passages with the memory of their own source reference, vs shuffled, empty and no memory.

    python tools/eval_memory_loss.py --config=configs/demo.py --checkpoint=runs/demo/train \
        --tokenizer=runs/demo/tokenizer/spm.model [--num_passages=128 --k=128,8 --codec=bf16,int8 --json=FILE]

Passages are cut from the held-out documents of the checkpoint's data (the split the warm-up run never trained
on; `--data` overrides the data directory the checkpoint's config names). Each passage is scored as the
context `<s> + passage` while every 64-token chunk reads the memory of the passage's own reference (k kept
tokens per memory head, stored with each codec), another passage's reference (shuffled), no memory with the
sink kept (empty), or nothing (off: the plain model at positions 0…). See m3jax/memory/evaluate.py.

The model's architecture comes from `--config` (a vocab_size of -1 is taken from the checkpoint) and must equal
the checkpoint's; the memory geometry is `config.memory`'s. A warm-up model was never trained
to read memory: the numbers say what it does with memory, not what a Memory3 model would.

The checkpoint, tokenizer, the data's corpus and `--json` may be `gs://` URLs; the data directory is local
(m3jax/data/records.py says how to mount a bucket).
"""

from __future__ import annotations

import json
import sys
import time

import jax
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from m3jax import cli
from m3jax.checkpoint import CheckpointError, load_model
from m3jax.data.corpus import load_corpus
from m3jax.data.records import read_metadata
from m3jax.data.tokenizer import Tokenizer
from m3jax.memory import evaluate
from m3jax.memory.knowledge import sink_tokens

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A run's workdir, its checkpoint directory or one step.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The SentencePiece model that wrote the checkpoint's data.")
_DATA = flags.DEFINE_string("data", None, "Data directory naming the corpus and held-out split (default: the "
                            "checkpoint's config.data.path).")
_NUM_PASSAGES = flags.DEFINE_integer("num_passages", 128, "held-out passages to score (at least 2: the "
                                     "shuffled control)", lower_bound=2)
_MIN_TOKENS = flags.DEFINE_integer("min_tokens", 32, "drop passages (document tails) shorter than this", lower_bound=1)
_K = flags.DEFINE_list("k", ["128", "8"], "tokens kept per memory head")
_CODEC = flags.DEFINE_list("codec", ["bf16", "int8"], f"memory codecs; '{evaluate.NO_CODEC}' = the encoder's output")
_BATCH = flags.DEFINE_integer("batch_size", 16, "passages per forward", lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "also write the results (summary and per-passage losses) to this file")


def _positive_ints(values: list[str]) -> bool:
    try:
        return bool(values) and all(int(v) > 0 for v in values)
    except ValueError:
        return False


flags.register_validator("k", _positive_ints, message="--k must be a comma-separated list of positive integers")

def render(s: dict, setup: dict, codec_effects: dict) -> str:
    lines = [f"checkpoint {setup['checkpoint']}; {setup['num_passages']} held-out passages from "
             f"{setup['num_documents']} documents, {setup['num_tokens']:,} scored tokens "
             f"({setup['min_len']}-{setup['max_len']} per passage)",
             f"memory layers {setup['memory_layers']}, memory KV heads {setup['memory_kv_heads']}, sink "
             f"{setup['sink_tokens']} (p={len(setup['sink_tokens'])}), context at positions p+{setup['ref_len']}…; "
             "a chunk = one memory",
             "loss: mean next-token loss over all tokens; passage mean ± standard error over passages; Δ: paired "
             "difference of passage means",
             "",
             f"{'condition':<22} {'loss':>7} {'passage mean':>17} {'Δ vs empty':>17} {'Δ vs off':>17}"]
    for name, r in s.items():
        lines.append(f"{name:<22} {r['loss']:>7.4f} {r['passage_mean']:>8.4f} ± {r['passage_sem']:<6.4f} "
                     f"{r['delta_empty']:>+8.4f} ± {r['delta_empty_sem']:<6.4f} "
                     f"{r['delta_off']:>+8.4f} ± {r['delta_off_sem']:<6.4f}")
    if codec_effects:
        lines += ["", "codec effect on the loss (paired over passages: mean ± standard error, max |Δ| of a passage):"]
    for name, d in codec_effects.items():
        lines.append(f"  {name}: {d['mean']:+.2e} ± {d['sem']:.1e}, max {d['max_abs']:.1e}")
    return "\n".join(lines)


def main(argv):
    cli.start(argv)
    t0 = time.perf_counter()
    config = _CONFIG.value
    try:
        if not config.memory.heads:
            raise ValueError("config.memory.heads=False: a model without memory heads reads no memory")
        loaded = load_model(_CHECKPOINT.value, config)  # on the first device; vocab_size -1: the checkpoint's
        step_dir, params, cfg = loaded.step_dir, loaded.params, loaded.model_config
        data_dir = _DATA.value or loaded.saved_config.get("data", {}).get("path")
        if not data_dir:
            raise ValueError("the checkpoint's config names no data directory; give --data")
        meta = read_metadata(data_dir)
        tokenizer = Tokenizer(_TOKENIZER.value)
        loaded.check_tokenizer(tokenizer.sha256, _TOKENIZER.value)
        if tokenizer.sha256 != meta["tokenizer_sha256"]:
            raise ValueError(f"{_TOKENIZER.value} is not the tokenizer that wrote {data_dir}")
    except (CheckpointError, OSError, ValueError) as e:
        sys.exit(f"eval_memory_loss: {e}")
    mem = config.memory
    passages = evaluate.heldout_passages(load_corpus(meta["corpus"]), tokenizer,
                                         heldout_fraction=meta["heldout_fraction"], seed=meta["seed"],
                                         ref_len=mem.ref_len, num_passages=_NUM_PASSAGES.value,
                                         min_tokens=_MIN_TOKENS.value)
    sink = sink_tokens(tokenizer, mem.sink_text)
    nll = evaluate.passage_nll(params, cfg, passages, sink, bos_id=tokenizer.bos_id, ks=[int(k) for k in _K.value],
                               codecs=_CODEC.value, batch_size=_BATCH.value)
    summary = evaluate.summarize(nll)
    ks, codecs = [int(k) for k in _K.value], _CODEC.value
    codec_effects = {f"own k={k} {c} − {codecs[0]}": evaluate.paired_difference(nll, f"own k={k} {c}",
                                                                                f"own k={k} {codecs[0]}")
                     for k in ks for c in codecs[1:]}
    setup = {"checkpoint": str(step_dir), "num_passages": len(passages),
             "num_documents": len(set(passages.doc_ids)), "num_tokens": int(passages.lengths.sum()),
             "min_len": int(passages.lengths.min()), "max_len": int(passages.lengths.max()),
             "memory_layers": list(cfg.memory_layers), "memory_kv_heads": list(cfg.memory_kv_heads),
             "sink_tokens": sink.tolist(), "ref_len": mem.ref_len, "seconds": time.perf_counter() - t0,
             "max_position": len(sink) + mem.ref_len + int(passages.lengths.max()) - 1,
             "trained_seq_len": loaded.saved_config.get("data", {}).get("seq_len")}
    print(render(summary, setup, codec_effects))
    if setup["trained_seq_len"] and setup["max_position"] >= setup["trained_seq_len"]:
        print(f"note: with memory on, context positions reach {setup['max_position']}; the checkpoint was trained "
              f"on positions < {setup['trained_seq_len']}")
    print(f"\n{setup['seconds']:.0f} s on {jax.devices()[0].device_kind}")
    if _JSON.value:
        per_passage = {name: (v / nll["tokens"]).tolist() for name, v in nll.items() if name != "tokens"}
        epath.Path(_JSON.value).write_text(json.dumps(
            {"setup": setup, "summary": summary, "codec_effects": codec_effects, "doc_ids": list(passages.doc_ids),
             "tokens": passages.lengths.tolist(), "passage_loss": per_passage}, indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "checkpoint", "tokenizer"])
    app.run(main)
