"""Generates continuations from a checkpoint: the plain model, Memory3 (memory swapped every 64 tokens) or RAG.

    python tools/generate.py --checkpoint=runs/demo/continued --bank=runs/demo/bank \
        --prompt="The history of" [--prompt=...] [--prompts_file=FILE] [--mode=memory3|none|rag] \
        [--max_new_tokens=64 --temperature=0 --top_p=1 --seed=0] [--show_references]

The model, its memory geometry and its retrieval settings are the checkpoint's saved config (`--tokenizer` and
`--index` default to the data's tokenizer and BANK/index). The bank must have been written by this checkpoint
(`--bank_other_checkpoint` reads one another checkpoint wrote, logging its age). References are retrieved by the
prompt's chunks and, while decoding, by the last 64 generated tokens, filtered against the question at
`retrieval.eval_max_overlap` (m3jax/infer/generate.py). `--prompts_file`: one prompt per line, or JSONL with a
"prompt" field. `--show_references` prints, for each row, the ids and text of the references each chunk read.
The checkpoint, bank, index, tokenizer and prompts file may be `gs://` URLs.
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
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Prompts, one per line or JSONL {'prompt': ...}.")
_MODE = flags.DEFINE_enum("mode", "memory3", ["memory3", "none", "rag"], "How the model reads knowledge.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SLOTS = flags.DEFINE_integer("slots", 0, "Memories per chunk / RAG references (0 = config.memory.per_chunk).",
                              lower_bound=0)
_OTHER = flags.DEFINE_bool("bank_other_checkpoint", False, "Read a bank another checkpoint wrote.")
_SHOW_REFS = flags.DEFINE_bool("show_references", False, "Print the references each chunk read.")


def read_prompts() -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        for n, line in enumerate(epath.Path(_PROMPTS_FILE.value).read_text(encoding="utf-8").split("\n"), 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (ValueError, KeyError) as e:
                    raise ValueError(f"{_PROMPTS_FILE.value}:{n}: not a JSON object with a 'prompt': {e}") from e
            else:
                prompts.append(line)
    if not prompts:
        raise ValueError("no prompts: give --prompt or --prompts_file")
    return prompts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ml_collections import config_dict

    from m3jax.checkpoint import CheckpointError, load_model
    from m3jax.data.records import read_metadata
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.infer.generate import BankMemories, Sampling, generate
    from m3jax.memory.bank import BankMismatchError

    try:
        prompts = read_prompts()
        loaded = load_model(_CHECKPOINT.value)
        cfg, saved = loaded.model_config, config_dict.ConfigDict(loaded.saved_config)
        tokenizer = Tokenizer(_TOKENIZER.value or read_metadata(saved.data.path)["tokenizer_path"])
        slots = _SLOTS.value or int(saved.memory.per_chunk)
        source = None
        if _MODE.value != "none":
            if not _BANK.value:
                raise ValueError(f"--mode={_MODE.value} needs --bank")
            source = BankMemories.open(_BANK.value, cfg=cfg, retrieval=saved.retrieval, tokenizer=tokenizer,
                                       checkpoint=loaded.identity, slots=slots, index_path=_INDEX.value,
                                       allow_other_checkpoint=_OTHER.value)
        encoded = [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(prompts)]
        out = generate(loaded.params, cfg, encoded, _MAX_NEW.value, mode=_MODE.value, source=source, slots=slots,
                       sampling=Sampling(_TEMPERATURE.value, _TOP_P.value, _SEED.value), bos_id=tokenizer.bos_id)
    except (ValueError, FileNotFoundError, KeyError, CheckpointError, BankMismatchError) as e:
        sys.exit(f"generate: {e}")

    for i, prompt in enumerate(prompts):
        print(f"=== prompt {i} ({_MODE.value}): {prompt}")
        print(tokenizer.decode(out.tokens[i].tolist()))
        if _SHOW_REFS.value and out.references:
            what = "chunk" if _MODE.value == "memory3" else "prompt"
            for g, ids in enumerate(out.references[i]):
                for ref in ids[ids >= 0]:
                    text = tokenizer.decode([t for t in source.reference_tokens(ref[None])[0] if t >= 0])
                    print(f"    {what} {g}: reference {int(ref)}: {text[:160]!r}")


if __name__ == "__main__":
    app.run(main)
