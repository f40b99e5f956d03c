"""Imports a Hugging Face Llama as an m3jax checkpoint: an existing Transformer as the start of the continued stage.

    python tools/import_hf.py --hf=path/to/llama --out=runs/llama/imported --tokenizer=path/to/spm.model \
        [--config=configs/warmup.py] [--dtype=float32|bfloat16] [--untie_embeddings] [--config.memory.layers=...]

- `--hf`: a `LlamaForCausalLM` directory: config.json and safetensors weights (model.safetensors, or the shards
  model.safetensors.index.json lists) in float32, bfloat16 or float16, read exactly into float32 parameters by the
  mapping table of m3jax/export/llama.py (tools/export_pytorch.py writes them back the same way).
- The model's architecture (layers, sizes, heads, KV heads, head_dim, RoPE base, norm eps, vocabulary) is
  config.json's; everything else — the memory geometry (Memory3 adds no parameters: memory layers and heads are
  config), the vocabulary padding, the optimiser — comes from `--config` and its overrides. An override of an
  architecture key that disagrees with config.json is refused. `--dtype` sets the compute dtype
  (`config.model.dtype`; default: the config file's); parameters are float32 either way.
- `--out`: a new checkpoint directory, local or a `gs://` URL. Step 0 is written with the run layout of
  m3jax/checkpoint.py (parameters only, the config beside them, a fresh run id), so `--config.init_from=OUT`
  starts a run from it, `tools/write_memory.py --checkpoint=OUT` writes its bank and
  `tools/export_pytorch.py --checkpoint=OUT` exports it again. The printed `--config.model.*` flags describe the
  model to those jobs.
- `--tokenizer`: the SentencePiece model whose ids the model's vocabulary uses (the one that prepares the data).
  It is recorded as the checkpoint's tokenizer, which tools/write_memory.py checks; without it, a bank cannot be
  written from the checkpoint.
- `--untie_embeddings`: accept a model with tied embeddings (`tie_word_embeddings`), starting our untied LM head as
  a copy of the embedding.

A directory that is incomplete or holds a model the m3jax model cannot express (another architecture, biases, RoPE
scaling, sliding windows, tied embeddings, inconsistent sizes, ...) exits non-zero with `import_hf: FILE: what`,
naming the config.json key or the tensor; nothing is written. `--hf` must be local (safetensors opens its files by
local path: a `gs://` URL is refused, saying so); `--tokenizer` may be a `gs://` object.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from m3jax import cli

_REPO = Path(__file__).resolve().parents[1]
_CONFIG = config_flags.DEFINE_config_file("config", str(_REPO / "configs" / "warmup.py"),
                                          "Config file of everything but the architecture (configs/*.py).",
                                          lock_config=True)
_HF = flags.DEFINE_string("hf", None, "A Hugging Face LlamaForCausalLM directory (config.json + safetensors).")
_OUT = flags.DEFINE_string("out", None, "The checkpoint directory or gs:// URL to write (new or empty).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The SentencePiece model of the model's vocabulary (recorded as "
                                 "the checkpoint's tokenizer).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (config.model.dtype); default: "
                           "the config file's. Parameters are float32.")
_UNTIE = flags.DEFINE_bool("untie_embeddings", False, "Accept tied embeddings: the LM head starts as a copy of the "
                           "embedding.")


def check_overrides(model: dict) -> None:
    """An explicit `--config.model.KEY` of the architecture must agree with config.json (vocab_multiple is ours)."""
    for name in flags.FLAGS:
        key = name.removeprefix("config.model.")
        given = _CONFIG.value.model[key] if key != name and key in model else None
        if given is not None and key != "vocab_multiple" and given != model[key]:
            raise ValueError(f"--{name}={given!r}, but {_HF.value}/config.json gives {model[key]!r}: the architecture "
                             "is the checkpoint's")


def main(argv):
    cli.start(argv)
    from m3jax import paths
    from m3jax.config import validate
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.export.llama import load_hf_llama

    config = _CONFIG.value
    out = paths.absolute(_OUT.value)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"--out={out} exists and is not an empty directory; give a new one")
        tokenizer = Tokenizer(_TOKENIZER.value) if _TOKENIZER.value else None
        model, params, weights = load_hf_llama(_HF.value, vocab_multiple=int(config.model.vocab_multiple),
                                               untie_embeddings=_UNTIE.value)
        check_overrides(model)
        config.model.update(model)
        if _DTYPE.value:
            config.model.dtype = _DTYPE.value
        if tokenizer is not None:
            if tokenizer.vocab_size > model["vocab_size"]:
                raise ValueError(f"--tokenizer={tokenizer.path} has {tokenizer.vocab_size} ids, more than the "
                                 f"vocabulary of {_HF.value}/config.json (vocab_size {model['vocab_size']})")
            config.data.tokenizer = str(paths.absolute(tokenizer.path))
        validate(config)
    except (ValueError, FileNotFoundError) as e:  # HFCheckpointError and ConfigError are ValueErrors
        sys.exit(f"import_hf: {e}")

    import jax

    from m3jax import checkpoint as ckpt_lib

    source = os.path.abspath(_HF.value)
    loop_state = {"run_id": ckpt_lib.new_run_id(f"hf-{Path(source).name}"),
                  "imported_from": {"hf": source, "weights": str(weights.source), "dtypes": sorted(weights.dtypes)}}
    if tokenizer is not None:
        loop_state["data"] = {"tokenizer_sha256": tokenizer.sha256}
    params = jax.device_put(params, jax.local_devices()[0])
    step_dir = ckpt_lib.save_params(out, params, json.loads(config.to_json_best_effort()), loop_state)

    m = config.model
    print(f"import_hf: read {len(weights)} tensors ({', '.join(sorted(weights.dtypes))}) of {source}: "
          f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads / {m.num_kv_heads} KV heads of "
          f"{m.head_dim}, mlp {m.mlp_dim}, vocab {m.vocab_size}, rope_base {m.rope_base:g}, norm_eps {m.norm_eps:g}")
    print(f"import_hf: wrote {step_dir} (run {loop_state['run_id']}, compute dtype {m.dtype}"
          f"{'' if tokenizer else '; no --tokenizer recorded: tools/write_memory.py will refuse it'})")
    print("import_hf: its model for --config.init_from, tools/write_memory.py and other jobs: "
          + " ".join(f"--config.model.{k}={m[k]}" for k in model))


if __name__ == "__main__":
    flags.mark_flags_as_required(["hf", "out"])
    app.run(main)
