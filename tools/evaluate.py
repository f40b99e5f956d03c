"""Evaluates a checkpoint with memory, without memory (same weights) and with RAG, side by side.

    python tools/evaluate.py --checkpoint=runs/demo/continued --bank=runs/demo/bank --out=results.json \
        [--entities=runs/demo/entities] [--choices=tasks.jsonl] [--heldout_data=DATA --heldout_split=heldout] \
        [--modes=none,memory3,rag] [--fsdp=1]

Suites (m3jax/infer/evaluation.py), each run when its input is given:
  entities        held-out entities' cloze items of ENTITIES/cloze.jsonl: answer accuracy and loss, recall@1
  choices         a JSONL file of {"context", "choices", "answer"}: acc and acc_norm by log-likelihood
  knowledge cloze the held-out split of --heldout_data (default: the checkpoint's data): each document's first
                  --question_tokens tokens as the question, the next --answer_tokens as the answer, against
                  --distractors other documents' spans
  perplexity      every record segment of that split, with causal retrieval (--passages of them; 0 = all)
  decode speed    --decode_prompts > 0: greedy generation of --decode_tokens per prompt, tokens/s per mode
The model, memory geometry and retrieval settings are the checkpoint's saved config; the parameters are restored
onto every local device (`--fsdp` of them shard the parameters, the rest replicate), so a job evaluates whatever
devices it has. The bank must have been written by this checkpoint (`--bank_other_checkpoint` reads another's).
Writes --out (JSON: settings, per suite and mode the numbers) and prints a table.

The checkpoint, bank, index, tokenizer, entities directory, choices file and --out may be `gs://` URLs; prepared
data (--heldout_data) is local (m3jax/data/records.py says how to mount a bucket).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from etils import epath

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A run's workdir, its checkpoint directory or one step.",
                                  required=True)
_BANK = flags.DEFINE_string("bank", None, "The memory bank (tools/write_memory.py); needed by memory3 and rag.")
_INDEX = flags.DEFINE_string("index", None, "The bank's retrieval index (default BANK/index).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (default: the checkpoint data's).")
_OTHER = flags.DEFINE_bool("bank_other_checkpoint", False, "Read a bank another checkpoint wrote.")
_MODES = flags.DEFINE_list("modes", ["none", "memory3", "rag"], "Modes evaluated side by side.")
_SLOTS = flags.DEFINE_integer("slots", 0, "Memories per chunk / RAG references (0 = config.memory.per_chunk).",
                              lower_bound=0)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.", lower_bound=1)
_FSDP = flags.DEFINE_integer("fsdp", 1, "Devices that shard the parameters (the mesh's fsdp axis).", lower_bound=1)
_ENTITIES = flags.DEFINE_string("entities", "", "A tools/make_entities.py directory: its held-out cloze items.")
_ENTITY_ITEMS = flags.DEFINE_integer("entity_items", 0, "Held-out items evaluated (0 = all; else a fixed sample).",
                                     lower_bound=0)
_CHOICES = flags.DEFINE_string("choices", "", "A multiple-choice JSONL file.")
_HELDOUT_DATA = flags.DEFINE_string("heldout_data", None, "Prepared data whose held-out split is scored (default: "
                                    "the checkpoint's data.path; '' = none).")
_HELDOUT_SPLIT = flags.DEFINE_string("heldout_split", "heldout", "The split of --heldout_data.")
_KNOWLEDGE_CLOZE = flags.DEFINE_bool("knowledge_cloze", True, "Score the knowledge cloze of --heldout_data (the "
                                      "perplexity suite runs either way).")
_PASSAGES = flags.DEFINE_integer("passages", 0, "Perplexity passages (0 = every record segment).", lower_bound=0)
_QUESTION = flags.DEFINE_integer("question_tokens", 64, "Knowledge cloze: question tokens.", lower_bound=1)
_ANSWER = flags.DEFINE_integer("answer_tokens", 16, "Knowledge cloze: answer tokens.", lower_bound=1)
_DISTRACTORS = flags.DEFINE_integer("distractors", 3, "Knowledge cloze: other documents' spans per question.",
                                    lower_bound=1)
_DECODE_PROMPTS = flags.DEFINE_integer("decode_prompts", 0, "Decode speed: prompts generated from at once, in every "
                                      "mode (the first held-out entity prompts, else held-out passages' first 64 "
                                      "tokens); 0 = not measured.", lower_bound=0)
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 128, "Decode speed: tokens generated per prompt.",
                                      lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Results JSON.", required=True)


def heldout_text(data_dir: str, split: str):
    """(documents: the tokens of each document starting in the split, bos dropped; passages: every record
    segment's tokens, a leading bos dropped)."""
    import numpy as np

    from m3jax.data.pipeline import split_records

    documents, passages = {}, []
    for record in split_records(data_dir, split):
        seg = record["segment_ids"]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            tokens = [*record["inputs"][where].tolist(), int(record["targets"][where[-1]])]
            doc, offset = int(record["documents"][where[0]]), int(record["doc_offsets"][where[0]])
            body = tokens[1:] if offset == 0 else tokens
            passages.append(body)
            if offset == 0:
                documents[doc] = body
            elif doc in documents:
                documents[doc] = documents[doc] + tokens
    return [documents[d] for d in sorted(documents)], passages


def read_jsonl(path: str) -> list[dict]:
    items = []
    for n, line in enumerate(epath.Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from e
    return items


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    import numpy as np
    from ml_collections import config_dict

    from m3jax import parallel
    from m3jax.checkpoint import CheckpointError, load_config, load_model, resolve_step_dir
    from m3jax.data.records import read_metadata
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.evals import entities as entity_eval
    from m3jax.infer import evaluation
    from m3jax.infer.generate import BankMemories
    from m3jax.memory.bank import BankMismatchError

    results: dict = {}
    try:
        devices = jax.local_devices()
        mesh = parallel.make_mesh(config_dict.ConfigDict({"data": -1, "fsdp": _FSDP.value, "tensor": 1}), devices)
        saved = config_dict.ConfigDict(load_config(resolve_step_dir(_CHECKPOINT.value)))  # the job's config
        loaded = load_model(_CHECKPOINT.value, saved, mesh=mesh)
        cfg = loaded.model_config
        tokenizer = Tokenizer(_TOKENIZER.value or read_metadata(saved.data.path)["tokenizer_path"])
        slots = _SLOTS.value or int(saved.memory.per_chunk)
        source = None
        if set(_MODES.value) - {"none"}:
            if not _BANK.value:
                raise ValueError(f"--modes={','.join(_MODES.value)} needs --bank (or --modes=none)")
            source = BankMemories.open(_BANK.value, cfg=cfg, retrieval=saved.retrieval, tokenizer=tokenizer,
                                       checkpoint=loaded.identity, slots=slots, index_path=_INDEX.value,
                                       allow_other_checkpoint=_OTHER.value)
        ev = evaluation.Evaluator(loaded.params, cfg, tokenizer, source, tuple(_MODES.value), slots, _BATCH.value)
        with mesh:
            items, passages = [], []
            if _ENTITIES.value:
                items = entity_eval.read_items(str(epath.Path(_ENTITIES.value) / "cloze.jsonl"),
                                               _ENTITY_ITEMS.value)
                own = np.full(len(items), -1, np.int64)
                if source is not None:
                    texts = [tokenizer.decode([t for t in row if t >= 0])
                             for lo in range(0, source.bank.num_refs, 4096)
                             for row in source.reference_tokens(np.arange(lo, min(lo + 4096, source.bank.num_refs)))]
                    own = entity_eval.entity_references(texts, [it["name"] for it in items])
                results["entities"] = evaluation.entity_knowledge(ev, items, own)
            if _CHOICES.value:
                results["choices"] = evaluation.multiple_choice(ev, read_jsonl(_CHOICES.value))
            data = saved.data.path if _HELDOUT_DATA.value is None else _HELDOUT_DATA.value
            if data:
                documents, passages = heldout_text(data, _HELDOUT_SPLIT.value)
                if not passages:
                    raise ValueError(f"--heldout_data={data}: split {_HELDOUT_SPLIT.value!r} has no records")
                if _KNOWLEDGE_CLOZE.value:
                    windows = evaluation.document_windows(documents, _QUESTION.value, _ANSWER.value,
                                                          _DISTRACTORS.value)
                    results["knowledge_cloze"] = evaluation.knowledge_cloze(ev, windows)
                chosen = passages[:_PASSAGES.value] if _PASSAGES.value else passages
                results["perplexity"] = evaluation.passage_perplexity(ev, chosen)
            if _DECODE_PROMPTS.value:
                prompts = ev.encode([it["prompt"] for it in items]) if items else [
                    [tokenizer.bos_id, *p[:63]] for p in passages]
                if len(prompts) < _DECODE_PROMPTS.value:
                    raise ValueError(f"--decode_prompts={_DECODE_PROMPTS.value}: only {len(prompts)} prompts "
                                     "(held-out entity items or passages)")
                results["decode"] = evaluation.decode_speed(ev, prompts[:_DECODE_PROMPTS.value], _DECODE_TOKENS.value)
    except (ValueError, FileNotFoundError, KeyError, CheckpointError, BankMismatchError) as e:
        sys.exit(f"evaluate: {e}")
    if not results:
        sys.exit("evaluate: nothing to evaluate: give --entities, --choices or held-out data")
    results["settings"] = {"checkpoint": str(loaded.step_dir), "bank": _BANK.value, "modes": _MODES.value,
                           "slots": slots, "devices": len(devices), "fsdp": _FSDP.value,
                           "eval_max_overlap": float(saved.retrieval.eval_max_overlap)}
    epath.Path(_OUT.value).write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))
    print(f"wrote {_OUT.value}")


def render(results: dict) -> str:
    modes = results["settings"]["modes"]
    lines = [f"{'suite':<18} {'metric':<14} " + " ".join(f"{m:>10}" for m in modes)]
    for suite, out in results.items():
        if suite == "settings":
            continue
        metrics = [k for k in out.get(modes[0], {}) if not isinstance(out[modes[0]][k], dict)]
        for metric in metrics:
            lines.append(f"{suite:<18} {metric:<14} " + " ".join(f"{out[m][metric]:>10.4f}" for m in modes))
        if "recall_at_1" in out:
            lines.append(f"{suite:<18} {'recall@1':<14} {out['recall_at_1']:>10.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
