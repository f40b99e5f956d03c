"""Conversion between m3jax parameters and Hugging Face `LlamaForCausalLM` checkpoints, both ways.

The m3jax decoder is Llama's math: pre-norm RMSNorm, rotate-half RoPE, GQA (query head h reads KV head
h // group), SwiGLU, no biases, untied head. So the conversion is a renaming plus reshapes, and one table,
`PARAM_MAP`, says it for both directions: each of our parameters, its HF name, and how the array changes (our
kernels are `[*input_axes, *output_axes]` and a torch `Linear` weight is `[output, input]`; the stacked `layers`
axis becomes one module per layer). No permutation of the q/k heads is needed.

The embedding and the LM head keep their padded rows (HF `vocab_size` = `padded_vocab_size`); config.json
records the real vocabulary under `m3jax_vocab_size`. HF does not mask the padding logits as our model does:
generation_config.json suppresses those ids in `generate`, but a direct forward pass returns their logits, so
a consumer must ignore ids >= `m3jax_vocab_size`.

Import (`load_hf_llama`) reads a Hugging Face directory: config.json and safetensors weights (one
model.safetensors, or the shards that model.safetensors.index.json lists) in float32, bfloat16 or float16, each
tensor read when it is converted. The parameters are float32, which holds all three exactly. A checkpoint that is
incomplete, or uses an option our model does not have (biases, RoPE scaling, sliding windows, tied embeddings
unless asked to untie them, ...), is an `HFCheckpointError` naming the file and the key or tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from m3jax.model import params as params_lib
from m3jax.model.config import ModelConfig
from m3jax.paths import is_url

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# The weight dtypes an import reads: float32 holds each of them exactly.
HF_WEIGHT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
# Old HF checkpoints store the RoPE frequencies as a buffer; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint that cannot become m3jax parameters: incomplete, or using an option our model does
    not have. `tensor` is the tensor it is about (None: a config.json key); `load_hf_llama` prefixes the file."""

    def __init__(self, message: str, *, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """One of our parameters and its HF tensor(s).

    ours: its path in our parameter tree ("layers/wq"); a `layers/` parameter is stacked over the layers, and `hf`
      names one tensor per layer through "{layer}".
    in_axes: None: the same array on both sides (norm weights, the embedding); n: our kernel
      `[*input_axes (n of them), *output_axes]` is the torch Linear weight `[output, input]`.
    vocab_rows: the HF tensor's rows are the vocabulary (our padded rows; an import pads or cuts them).
    """

    ours: str
    hf: str
    in_axes: int | None = None
    vocab_rows: bool = False

    @property
    def layered(self) -> bool:
        return "{layer}" in self.hf

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf.format(layer=i) for i in range(num_layers)] if self.layered else [self.hf]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF shape of our array of `shape` (one layer's slice of a stacked parameter)."""
        if self.in_axes is None:
            return tuple(shape)
        return math.prod(shape[self.in_axes :]), math.prod(shape[: self.in_axes])

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        """Our array (one layer's slice) -> its HF tensor."""
        return w if self.in_axes is None else w.reshape(math.prod(w.shape[: self.in_axes]), -1).T

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """An HF tensor -> our array of `shape` (one layer's slice)."""
        return (w if self.in_axes is None else w.T).reshape(shape)


_LAYER = "model.layers.{layer}"
PARAM_MAP = (
    ParamMap("embed", "model.embed_tokens.weight", vocab_rows=True),
    ParamMap("layers/attn_norm", f"{_LAYER}.input_layernorm.weight"),
    ParamMap("layers/wq", f"{_LAYER}.self_attn.q_proj.weight", in_axes=1),
    ParamMap("layers/wk", f"{_LAYER}.self_attn.k_proj.weight", in_axes=1),
    ParamMap("layers/wv", f"{_LAYER}.self_attn.v_proj.weight", in_axes=1),
    ParamMap("layers/wo", f"{_LAYER}.self_attn.o_proj.weight", in_axes=2),
    ParamMap("layers/mlp_norm", f"{_LAYER}.post_attention_layernorm.weight"),
    ParamMap("layers/w_gate", f"{_LAYER}.mlp.gate_proj.weight", in_axes=1),
    ParamMap("layers/w_up", f"{_LAYER}.mlp.up_proj.weight", in_axes=1),
    ParamMap("layers/w_down", f"{_LAYER}.mlp.down_proj.weight", in_axes=1),
    ParamMap("final_norm", "model.norm.weight"),
    ParamMap("lm_head", "lm_head.weight", in_axes=1, vocab_rows=True),
)


def _lookup(tree: Mapping[str, Any], path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _assign(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


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
    state = {}
    for entry in PARAM_MAP:
        w = np.asarray(_lookup(params, entry.ours))
        for name, part in zip(entry.hf_names(model_cfg.num_layers), w if entry.layered else [w], strict=True):
            state[name] = np.ascontiguousarray(entry.to_hf(part).astype(np_dtype))
    return config, state


def save_hf_llama(
    params: Mapping[str, Any], model_cfg: ModelConfig, out_dir: str | os.PathLike, **options: Any
) -> list[epath.Path]:
    """Writes config.json, generation_config.json and model.safetensors into `out_dir` (a local directory or a
    `gs://` URL); returns their paths.

    `options` are the keyword arguments of `to_hf_llama` (`dtype="float32"|"bfloat16"`, the max position and
    the special-token ids). In a bucket the weights are serialised in memory and uploaded as one object (safetensors
    writes files by local path only), so the upload holds a second copy of them in memory.
    """
    config, state = to_hf_llama(params, model_cfg, **options)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    padding_ids = list(range(model_cfg.vocab_size, model_cfg.padded_vocab_size))
    if padding_ids:
        generation["suppress_tokens"] = padding_ids
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / CONFIG_FILE, out / GENERATION_CONFIG_FILE, out / WEIGHTS_FILE]
    for path, content in zip(paths[:2], (config, generation), strict=True):
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if is_url(out_dir):
        paths[2].write_bytes(safetensors.numpy.save(state, metadata={"format": "pt"}))
    else:
        safetensors.numpy.save_file(state, paths[2], metadata={"format": "pt"})
    return paths


def _rope_type(rope: Mapping[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def _check_supported(config: Mapping[str, Any]) -> float:
    """Rejects checkpoints that are not a Llama our model can express (naming the config.json key); returns the
    RoPE base. Tied embeddings are `from_hf_llama`'s choice."""
    architectures = config.get("architectures")
    if architectures is not None and list(architectures) != ["LlamaForCausalLM"]:
        raise HFCheckpointError(f"architectures {architectures} is not supported (only ['LlamaForCausalLM'])")
    if config.get("model_type") != "llama":
        raise HFCheckpointError(f"model_type {config.get('model_type')!r} is not supported (only 'llama')")
    if config.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise HFCheckpointError(f"{key}=true is not supported: the m3jax model has no biases")
    if config.get("rope_scaling") and _rope_type(config["rope_scaling"]) != "default":
        raise HFCheckpointError(f"rope_scaling {config['rope_scaling']} is not supported (only default RoPE)")
    rope = config.get("rope_parameters") or {}
    if _rope_type(rope) != "default":
        raise HFCheckpointError(f"rope_parameters.rope_type {_rope_type(rope)!r} is not supported (only default RoPE)")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise HFCheckpointError(f"partial_rotary_factor {partial} is not supported (RoPE on the whole head only)")
    if config.get("sliding_window") is not None or config.get("use_sliding_window"):
        raise HFCheckpointError(f"sliding_window={config.get('sliding_window')} is not supported: the m3jax model "
                                "attends to the whole context")
    other_layers = sorted({t for t in config.get("layer_types") or () if t != "full_attention"})
    if other_layers:
        raise HFCheckpointError(f"layer_types {other_layers} are not supported (only full_attention)")
    if config.get("quantization_config"):
        raise HFCheckpointError("quantization_config is set: quantized weights are not supported (import the "
                                "float checkpoint)")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _positive_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HFCheckpointError(f"{key} must be a positive integer, got {value!r}" if key in config
                                else f"has no {key!r}")
    return value


def _model_entries(config: Mapping[str, Any], vocab_multiple: int) -> dict[str, Any]:
    """The `config.model` entries (architecture) of an HF Llama config.json."""
    rope_base = _check_supported(config)
    sizes = {key: _positive_int(config, key) for key in ("vocab_size", "hidden_size", "intermediate_size",
                                                         "num_hidden_layers", "num_attention_heads")}
    heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
    kv_heads = _positive_int(config, "num_key_value_heads") if config.get("num_key_value_heads") else heads
    if heads % kv_heads:
        raise HFCheckpointError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if config.get("head_dim") is not None:
        head_dim = _positive_int(config, "head_dim")
    elif hidden % heads:
        raise HFCheckpointError(f"has no head_dim, and hidden_size {hidden} is not a multiple of "
                                f"num_attention_heads {heads}")
    else:
        head_dim = hidden // heads
    if head_dim % 2:
        raise HFCheckpointError(f"head_dim {head_dim} is odd: RoPE rotates pairs of dimensions")
    return {
        "vocab_size": int(config.get("m3jax_vocab_size", sizes["vocab_size"])),
        "vocab_multiple": vocab_multiple,
        "num_layers": sizes["num_hidden_layers"],
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "mlp_dim": sizes["intermediate_size"],
        "rope_base": rope_base,
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
    }


def _fit_rows(w: np.ndarray, rows: int) -> np.ndarray:
    """Pads with zeros or cuts the vocabulary rows to `rows` (rows past the real vocabulary are padding)."""
    if w.shape[0] >= rows:
        return w[:rows]
    return np.pad(w, ((0, rows - w.shape[0]), (0, 0)))


def from_hf_llama(
    state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any], *, vocab_multiple: int = 128,
    untie_embeddings: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`config.model` entries for `ModelConfig.from_config`, float32 numpy parameter tree) of an HF Llama.

    `state_dict` maps HF names to numpy arrays (e.g. `safetensors.numpy.load_file`), `config` is config.json.
    The vocabulary rows are padded (or cut, past the real vocabulary) to a multiple of `vocab_multiple`. Our LM
    head is untied: a checkpoint with `tie_word_embeddings` is refused unless `untie_embeddings`, which starts the
    head as a copy of the embedding (the two then train apart). Raises `HFCheckpointError`.
    """
    model = _model_entries(config, vocab_multiple)
    cfg = ModelConfig.from_config(model)
    vocab_rows = int(config["vocab_size"])
    aliases = {}
    if config.get("tie_word_embeddings", False):
        if not untie_embeddings:
            raise HFCheckpointError("tie_word_embeddings=true is not supported: the m3jax LM head is a parameter of "
                                    "its own; untie it (tools/import_hf.py --untie_embeddings) to start the head as "
                                    "a copy of the embedding")
        aliases["lm_head.weight"] = "model.embed_tokens.weight"  # a stored head, if any, is the embedding too
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = aliases.get(name, name)
        if key not in state_dict:
            raise HFCheckpointError(f"has no tensor {key!r}", tensor=key)
        w = np.asarray(state_dict[key])
        if w.dtype not in HF_WEIGHT_DTYPES:
            raise HFCheckpointError(f"tensor {key!r} has dtype {w.dtype}; only float32, bfloat16 and float16 "
                                    "weights are supported", tensor=key)
        if w.shape != shape:
            raise HFCheckpointError(f"tensor {key!r} has shape {w.shape}, but config.json's sizes imply {shape}",
                                    tensor=key)
        used.update((name, key))
        return w.astype(np.float32)

    abstract = params_lib.abstract_params(cfg)
    params: dict[str, Any] = {}
    for entry in PARAM_MAP:
        shape = _lookup(abstract, entry.ours).shape
        shape = shape[1:] if entry.layered else shape  # one layer's slice
        hf_shape = entry.hf_shape(shape)
        if entry.vocab_rows:
            hf_shape = (vocab_rows, *hf_shape[1:])
        parts = []
        for name in entry.hf_names(cfg.num_layers):
            w = take(name, hf_shape)
            parts.append(entry.from_hf(_fit_rows(w, cfg.padded_vocab_size) if entry.vocab_rows else w, shape))
        _assign(params, entry.ours, np.ascontiguousarray(np.stack(parts) if entry.layered else parts[0]))
    unused = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if unused:
        raise HFCheckpointError(f"has weights the m3jax model has no place for: {unused}", tensor=unused[0])
    return model, params


class SafetensorsWeights(Mapping[str, np.ndarray]):
    """The tensors of a Hugging Face directory's safetensors files by name, each read (as numpy) when looked up."""

    def __init__(self, files: Mapping[str, Path], source: Path):
        self._files = dict(files)  # tensor name -> its file
        self.source = source  # model.safetensors, or the index of the shards
        self.dtypes: set[str] = set()  # the dtypes of the tensors read so far

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._files[name]
        try:
            with safetensors.safe_open(path, framework="numpy") as f:
                w = f.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a damaged file or a dtype numpy has not: named, whatever it was
            raise HFCheckpointError(f"cannot read tensor {name!r} ({type(e).__name__}: {e})", tensor=name) from e
        self.dtypes.add(str(w.dtype))
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def file_of(self, name: str) -> Path:
        """The file holding tensor `name`; for a tensor it does not have, the file that lists the tensors."""
        return self._files.get(name, self.source)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise HFCheckpointError(f"{path}: missing ({what})")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFCheckpointError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(content, dict):
        raise HFCheckpointError(f"{path}: not a JSON object")
    return content


def _tensor_names(path: Path) -> list[str]:
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - whatever the library raised, the file is named
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def open_hf_weights(directory: str | os.PathLike) -> SafetensorsWeights:
    """The safetensors weights of a Hugging Face directory: the shards its model.safetensors.index.json lists (each
    checked to hold the tensors the index places in it), else its model.safetensors."""
    directory = Path(directory)
    index_path, single = directory / WEIGHTS_INDEX_FILE, directory / WEIGHTS_FILE
    if index_path.exists():
        weight_map = _read_json(index_path, "the index of the weight shards").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index_path}: has no weight_map (tensor name -> shard file)")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            path = directory / file
            if not path.is_file():
                raise HFCheckpointError(f"{index_path}: weight_map places {len(names)} tensors (first "
                                        f"{names[0]!r}) in {file}, which is missing from {directory}")
            missing = sorted(set(names) - set(_tensor_names(path)))
            if missing:
                raise HFCheckpointError(f"{path}: has no tensor {missing[0]!r} ({len(missing)} missing in all), "
                                        f"which {WEIGHTS_INDEX_FILE} places in it")
        return SafetensorsWeights({name: directory / file for name, file in weight_map.items()}, index_path)
    if single.exists():
        return SafetensorsWeights(dict.fromkeys(_tensor_names(single), single), single)
    found = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    hint = (f"; it holds {found}: only safetensors weights are read (model.safetensors, or shards with "
            f"their {WEIGHTS_INDEX_FILE})" if found else "")
    raise HFCheckpointError(f"{directory}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}{hint}")


def load_hf_llama(
    directory: str | os.PathLike, *, vocab_multiple: int = 128, untie_embeddings: bool = False
) -> tuple[dict[str, Any], dict[str, Any], SafetensorsWeights]:
    """`from_hf_llama` of a Hugging Face directory (config.json and safetensors weights): (`config.model` entries,
    float32 parameter tree, the weights read). An `HFCheckpointError` names the file it is about; the directory is
    local (safetensors opens its files by local path)."""
    if is_url(directory):
        raise HFCheckpointError(f"{os.fspath(directory)}: a Hugging Face directory is read from local disk only "
                                "(safetensors opens its weight files by local path); copy it to local disk "
                                f"(`gcloud storage cp -r {os.fspath(directory)} .`) and pass the copy")
    directory = Path(directory)
    if not directory.is_dir():
        raise HFCheckpointError(f"{directory}: not a directory")
    config_path = directory / CONFIG_FILE
    config = _read_json(config_path, "a Hugging Face model directory has its config.json")
    weights = open_hf_weights(directory)
    try:
        model, params = from_hf_llama(weights, config, vocab_multiple=vocab_multiple,
                                      untie_embeddings=untie_embeddings)
    except HFCheckpointError as e:
        where = config_path if e.tensor is None else weights.file_of(e.tensor)
        raise HFCheckpointError(f"{where}: {e}", tensor=e.tensor) from None
    return model, params, weights
