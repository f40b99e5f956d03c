"""Conversion between m3jax parameters and Hugging Face `LlamaForCausalLM` checkpoints.

The m3jax decoder is Llama's math: pre-norm RMSNorm, rotate-half RoPE, GQA (query head h reads KV head
h // group), SwiGLU, no biases, untied head. So the conversion is a renaming plus reshapes: our kernels are
`[*input_axes, *output_axes]` and a torch `Linear` weight is `[output, input]`, and the stacked `layers` axis
becomes one module per layer. No permutation of the q/k heads is needed.

The embedding and the LM head keep their padded rows (HF `vocab_size` = `padded_vocab_size`); config.json
records the real vocabulary under `m3jax_vocab_size`. HF does not mask the padding logits as our model does:
generation_config.json suppresses those ids in `generate`, but a direct forward pass returns their logits, so
a consumer must ignore ids >= `m3jax_vocab_size`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy

from m3jax.model.config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# Our per-layer parameter -> its module inside HF `model.layers.{i}`.
_LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}
_NORMS = ("attn_norm", "mlp_norm")
# Old HF checkpoints store the RoPE frequencies as a buffer; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _kernel_to_linear(w: np.ndarray, num_in_axes: int = 1) -> np.ndarray:
    """Our kernel `[*input_axes, *output_axes]` -> a torch Linear weight `[output, input]`."""
    n_in = int(np.prod(w.shape[:num_in_axes]))
    return w.reshape(n_in, -1).T


def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of one layer's slice of each stacked parameter."""
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    return {
        "attn_norm": (d,),
        "wq": (d, h, hd),
        "wk": (d, kv, hd),
        "wv": (d, kv, hd),
        "wo": (h, hd, d),
        "mlp_norm": (d,),
        "w_gate": (d, f),
        "w_up": (d, f),
        "w_down": (f, d),
    }


def hf_llama_config(
    model_cfg: ModelConfig,
    *,
    dtype: str = "float32",
    max_position_embeddings: int = 2048,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """The config.json of `model_cfg` as a `LlamaForCausalLM`.

    RoPE is written both in the transformers-5 form (`rope_parameters`) and as a top-level `rope_theta` for
    older readers. Unknown special-token ids are written as null, so that LlamaConfig's defaults (1, 2) do not
    silently apply.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    rope_theta = float(model_cfg.rope_base)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.padded_vocab_size,
        "m3jax_vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.mlp_dim,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads,
        "num_key_value_heads": model_cfg.num_kv_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(model_cfg.norm_eps),
        "max_position_embeddings": int(max_position_embeddings),
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_theta": rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": float(model_cfg.init_std),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def to_hf_llama(
    params: Mapping[str, Any], model_cfg: ModelConfig, *, dtype: str = "float32", **config_options: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, HF state dict of contiguous numpy arrays in `dtype`) of our parameter tree.

    `params` is the pure dict of `init_params`/`load_params` (jax or numpy arrays, fully addressable);
    `config_options` are the keyword arguments of `hf_llama_config`.
    """
    config = hf_llama_config(model_cfg, dtype=dtype, **config_options)
    np_dtype = DTYPES[dtype]
    layers = {name: np.asarray(params["layers"][name]) for name in _LAYER_MODULES}
    state = {
        "model.embed_tokens.weight": np.asarray(params["embed"]),
        "model.norm.weight": np.asarray(params["final_norm"]),
        "lm_head.weight": _kernel_to_linear(np.asarray(params["lm_head"])),
    }
    for i in range(model_cfg.num_layers):
        for name, module in _LAYER_MODULES.items():
            w = layers[name][i]
            if name not in _NORMS:
                w = _kernel_to_linear(w, num_in_axes=2 if name == "wo" else 1)
            state[f"model.layers.{i}.{module}.weight"] = w
    return config, {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in state.items()}


def save_hf_llama(
    params: Mapping[str, Any], model_cfg: ModelConfig, out_dir: str | os.PathLike, **options: Any
) -> list[Path]:
    """Writes config.json, generation_config.json and model.safetensors into `out_dir`; returns their paths.

    `options` are the keyword arguments of `to_hf_llama` (`dtype="float32"|"bfloat16"`, the max position and
    the special-token ids).
    """
    config, state = to_hf_llama(params, model_cfg, **options)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    padding_ids = list(range(model_cfg.vocab_size, model_cfg.padded_vocab_size))
    if padding_ids:
        generation["suppress_tokens"] = padding_ids
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / CONFIG_FILE, out / GENERATION_CONFIG_FILE, out / WEIGHTS_FILE]
    for path, content in zip(paths[:2], (config, generation), strict=True):
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    safetensors.numpy.save_file(state, paths[2], metadata={"format": "pt"})
    return paths


def _check_supported(config: Mapping[str, Any]) -> float:
    """Rejects Llama variants our model cannot express; returns the RoPE base."""
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"{key}=true is not supported: the m3jax model has no biases")
    if config.get("rope_scaling"):
        raise ValueError(f"rope_scaling {config['rope_scaling']} is not supported (only default RoPE)")
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (only default RoPE)")
    return float(rope["rope_theta"])


def _fit_rows(w: np.ndarray, rows: int) -> np.ndarray:
    """Pads with zeros or cuts the vocabulary rows to `rows` (rows past the real vocabulary are padding)."""
    if w.shape[0] >= rows:
        return w[:rows]
    return np.pad(w, ((0, rows - w.shape[0]), (0, 0)))


def from_hf_llama(
    state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any], *, vocab_multiple: int = 128
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`config.model` entries for `ModelConfig.from_config`, float32 numpy parameter tree) of an HF Llama.

    `state_dict` maps HF names to numpy arrays (e.g. `safetensors.numpy.load_file`), `config` is config.json.
    The vocabulary rows are padded (or cut, past the real vocabulary) to a multiple of `vocab_multiple`.
    """
    heads = int(config["num_attention_heads"])
    model = {
        "vocab_size": int(config.get("m3jax_vocab_size", config["vocab_size"])),
        "vocab_multiple": vocab_multiple,
        "num_layers": int(config["num_hidden_layers"]),
        "hidden_size": int(config["hidden_size"]),
        "num_heads": heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or config["hidden_size"] // heads),
        "mlp_dim": int(config["intermediate_size"]),
        "rope_base": _check_supported(config),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
    }
    cfg = ModelConfig.from_config(model)
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in state_dict:
            raise KeyError(f"HF state dict has no {name!r}")
        w = np.asarray(state_dict[name], dtype=np.float32)
        if w.shape != shape:
            raise ValueError(f"{name} has shape {w.shape}, the config implies {shape}")
        used.add(name)
        return w

    def take_kernel(name: str, shape: tuple[int, ...], num_in_axes: int = 1) -> np.ndarray:
        n_in = int(np.prod(shape[:num_in_axes]))
        return take(name, (int(np.prod(shape)) // n_in, n_in)).T.reshape(shape)

    d, vocab_rows = cfg.hidden_size, int(config["vocab_size"])
    embed = take("model.embed_tokens.weight", (vocab_rows, d))
    if config.get("tie_word_embeddings", False):
        lm_head = embed.T
        used.add("lm_head.weight")  # a tied checkpoint may store the head too: it is the embedding
    else:
        lm_head = take_kernel("lm_head.weight", (d, vocab_rows))
    layers: dict[str, list[np.ndarray]] = {name: [] for name in _LAYER_MODULES}
    for i in range(cfg.num_layers):
        for name, shape in _layer_shapes(cfg).items():
            key = f"model.layers.{i}.{_LAYER_MODULES[name]}.weight"
            if name in _NORMS:
                w = take(key, shape)
            else:
                w = take_kernel(key, shape, num_in_axes=2 if name == "wo" else 1)
            layers[name].append(w)
    params = {
        "embed": _fit_rows(embed, cfg.padded_vocab_size),
        "layers": {name: np.stack(ws) for name, ws in layers.items()},
        "final_norm": take("model.norm.weight", (d,)),
        "lm_head": np.ascontiguousarray(_fit_rows(lm_head.T, cfg.padded_vocab_size).T),
    }
    unused = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if unused:
        raise ValueError(f"HF state dict has weights the m3jax model has no place for: {unused}")
    return model, params
