"""Exports a checkpoint's parameters as a Hugging Face `LlamaForCausalLM` directory (PyTorch/safetensors).

    python tools/export_pytorch.py --checkpoint=runs/demo/checkpoints --out=runs/demo/hf --dtype=bfloat16

`--checkpoint` is a run's checkpoint directory (its latest step is taken) or one step directory. The special
token ids come from the run's data directory when it is readable, unless given as flags.

A model with memory heads also gets `memory_config.json` (m3jax/export/memory_config.py): its memory layers and
heads, chunk size, reference length, k and the sink's tokens (`<s>` + `config.memory.sink_text` in the run's
tokenizer, or `--tokenizer`), which `m3jax.export.torch_memory.Memory3Llama` needs to read the bank in PyTorch.

`--checkpoint`, `--tokenizer` and `--out` may be `gs://` URLs: the weights are then serialised in memory and
uploaded as one object (m3jax/export/llama.py).
"""

import sys

from absl import app, flags

from m3jax.checkpoint import CheckpointError, load_model
from m3jax.data.records import read_metadata
from m3jax.export import save_hf_llama
from m3jax.export.llama import DTYPES
from m3jax.export.memory_config import write_memory_config

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A run's checkpoint directory or one step of it.",
                                  required=True)
_OUT = flags.DEFINE_string("out", None, "Directory or gs:// URL to write config.json and model.safetensors to.",
                           required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "dtype of the exported weights.")
_BOS_ID = flags.DEFINE_integer("bos_id", None, "bos token id (default: from the run's data metadata).",
                               lower_bound=0)
_EOS_ID = flags.DEFINE_integer("eos_id", None, "eos token id (default: from the run's data metadata).",
                               lower_bound=0)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model of the sink's tokens (a model with memory "
                                 "heads; default: the run's data metadata).")
_PAD_ID = flags.DEFINE_integer("pad_id", None, "pad token id (default: from the run's data metadata).",
                               lower_bound=0)


def _data_metadata(config: dict) -> dict:
    """The run's data metadata.json, or {} when it has none readable here."""
    path = config.get("data", {}).get("path")
    if not path:
        return {}
    try:
        return read_metadata(path)
    except (OSError, ValueError):
        return {}


def special_token_ids(config: dict) -> dict[str, int | None]:
    """bos/eos/pad ids: the flags, else the run's data metadata, else unknown (None)."""
    meta = _data_metadata(config)
    flag_values = {"bos": _BOS_ID.value, "eos": _EOS_ID.value, "pad": _PAD_ID.value}
    return {f"{k}_token_id": v if v is not None else meta.get(f"{k}_id") for k, v in flag_values.items()}


def sink(config: dict) -> list[int] | None:
    """The sink's tokens of a model with memory heads: <s> + config.memory.sink_text, in --tokenizer, else the
    run's tokenizer (its data's, or config.data.tokenizer); None when none is readable here."""
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.memory.knowledge import sink_tokens

    path = _TOKENIZER.value or _data_metadata(config).get("tokenizer_path") or config.get("data", {}).get("tokenizer")
    if not path:
        return None
    try:
        return sink_tokens(Tokenizer(path), config["memory"]["sink_text"]).tolist()
    except (OSError, RuntimeError, ValueError) as e:
        if _TOKENIZER.value:
            sys.exit(f"export_pytorch: --tokenizer={path}: {e}")
        return None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        loaded = load_model(_CHECKPOINT.value)  # the checkpoint's own config, on the first device
    except CheckpointError as e:
        sys.exit(f"export_pytorch: {e}")
    config, model_cfg, step_dir = loaded.saved_config, loaded.model_config, loaded.step_dir
    token_ids = special_token_ids(config)
    paths = save_hf_llama(loaded.params, model_cfg, _OUT.value, dtype=_DTYPE.value,
                          max_position_embeddings=int(config["data"]["seq_len"]), **token_ids)
    print(f"exported {step_dir} as LlamaForCausalLM ({_DTYPE.value}; vocab {model_cfg.vocab_size} padded to "
          f"{model_cfg.padded_vocab_size}; {', '.join(f'{k}={v}' for k, v in token_ids.items())})")
    if model_cfg.has_memory:
        tokens = sink(config)
        if tokens is None:
            print("export_pytorch: warning: no memory_config.json (Memory3 in PyTorch needs it): the run's tokenizer "
                  "is not readable here, give --tokenizer for the sink's tokens", file=sys.stderr)
        else:
            paths.append(write_memory_config(_OUT.value, model_cfg, tokens))
    for path in paths:
        print(f"wrote {path} ({path.stat().length:,} bytes)")


if __name__ == "__main__":
    app.run(main)
