"""The model's hyper-parameters as a frozen (hashable) dataclass built from `config.model` and `config.memory`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# The config.model fields that fix what the parameters are (their shapes and what they compute). Parameters
# are usable only under a config that agrees on every one of them: loading a checkpoint for a job checks them, and
# a memory bank's identity records them (with the memory geometry, `ModelConfig.architecture`).
ARCHITECTURE_FIELDS = ("vocab_size", "vocab_multiple", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                       "head_dim", "mlp_dim", "rope_base", "norm_eps")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    vocab_multiple: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    # The context part of attention: "xla" (the reference), "splash" (TPU), "pallas_gpu" (GPU) or "auto" (resolved
    # when the model is built: `from_config`), see m3jax.model.kernels; attention_interpret runs a Pallas kernel in
    # the interpreter (CPU tests).
    attention: str = "xla"
    attention_interpret: bool = False
    # Memory heads (empty = the plain model): the memory layers, in order (Memory.keys[j] is for layer
    # memory_layers[j]); the KV heads that are memory heads, shared by every memory layer; the longest span of
    # positions one memory group's tokens may cover (Memory3's chunk size); the tokens of a reference after the
    # sink (memory keys sit at positions [p, p + memory_ref_len), the context starts at p + memory_ref_len); the
    # tokens kept per memory per memory KV head.
    memory_layers: tuple[int, ...] = ()
    memory_kv_heads: tuple[int, ...] = ()
    memory_chunk_size: int = 64
    memory_ref_len: int = 128
    memory_k: int = 8

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], memory_cfg: Mapping[str, Any] | None = None, *,
                    platform: str | None = None, attention_fallback: bool = False) -> ModelConfig:
        """From `config.model`, and the memory geometry of `config.memory` when given with `heads` set (ConfigDicts,
        or the dicts saved with a checkpoint). Every job builds its model config this way.

        `attention` is resolved for `platform` (default: this process's backend; `m3jax.model.kernels.resolve`):
        "auto" becomes splash on TPU and xla elsewhere; a kernel of another platform is an error, or with
        `attention_fallback` (evaluating a checkpoint trained elsewhere) the XLA path."""
        from m3jax.model import kernels

        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(model_cfg).items() if k in fields}
        if "attention" in kwargs:
            kwargs["attention"] = kernels.resolve(kwargs["attention"], platform or jax.default_backend(),
                                                  bool(kwargs.get("attention_interpret", False)),
                                                  fallback=attention_fallback)
        if memory_cfg is not None and memory_cfg["heads"]:
            kwargs.update(memory_layers=resolve_memory_layers(memory_cfg["layers"], model_cfg["num_layers"]),
                          memory_kv_heads=resolve_memory_kv_heads(memory_cfg["kv_heads"], model_cfg["num_kv_heads"]),
                          memory_chunk_size=int(memory_cfg["chunk_size"]), memory_ref_len=int(memory_cfg["ref_len"]),
                          memory_k=int(memory_cfg["k"]))
        return cls(**kwargs)

    def architecture(self) -> dict[str, Any]:
        """What determines the parameters and a memory's key/values (JSON-ready): `ARCHITECTURE_FIELDS` and the
        memory geometry. A memory bank records it; a reader with another architecture is refused."""
        if not self.has_memory:
            raise ValueError("the model has no memory heads (config.memory.heads=False): it reads and writes no "
                             "memory")
        arch = {f: getattr(self, f) for f in ARCHITECTURE_FIELDS}
        arch.update(rope_base=float(self.rope_base), norm_eps=float(self.norm_eps),
                    memory_layers=list(self.memory_layers), memory_kv_heads=list(self.memory_kv_heads),
                    k=self.memory_k, ref_len=self.memory_ref_len)
        return arch

    def context_start(self, sink_len: int) -> int:
        """The first context position of a model reading memory: after the sink [0, p) and the memory keys
        [p, p + memory_ref_len) (docs/memory.md)."""
        return sink_len + self.memory_ref_len

    @property
    def has_memory(self) -> bool:
        return bool(self.memory_layers)

    @property
    def padded_vocab_size(self) -> int:
        """The embedding/LM-head rows: vocab_size rounded up to vocab_multiple (60,299 -> 60,416)."""
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def param_counts(self) -> dict[str, int]:
        """Parameter counts.

        `non_embedding` is the paper's convention (Transformer blocks + final norm: 2.4B for memory3_2b);
        `matmul` adds the LM head and is the N of the 6·N FLOPs-per-token rule (the embedding is a gather).
        """
        d, h, kv, hd, f, n = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim,
                              self.num_layers)
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        mlp = 3 * d * f
        norms = 2 * d
        layers = n * (attn + mlp + norms)
        embed = self.padded_vocab_size * d
        head = d * self.padded_vocab_size
        return {
            "embedding": embed,
            "lm_head": head,
            "layers": layers,
            "non_embedding": layers + d,
            "matmul": layers + d + head,
            "total": embed + layers + head + d,
        }


def _index_list(spec, count: int, key: str, what: str) -> tuple[int, ...]:
    if isinstance(spec, str):
        if spec == "all":
            return tuple(range(count))
        if spec == "first_half":
            return tuple(range(max(1, count // 2)))
        try:
            items = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise ValueError(f"config.{key}={spec!r}: expected 'all', 'first_half' or comma-separated "
                             f"{what} indices") from None
    else:
        items = [int(x) for x in spec]
    if not items or sorted(set(items)) != items or items[0] < 0 or items[-1] >= count:
        raise ValueError(f"config.{key}={spec!r}: {what} indices must be distinct, increasing and in [0, {count})")
    return tuple(items)


def resolve_memory_layers(spec, num_layers: int) -> tuple[int, ...]:
    """'first_half' (the default: layers 0 … L/2−1), 'all', or '0,2,5' -> layer indices."""
    return _index_list(spec, num_layers, "memory.layers", "layer")


def resolve_memory_kv_heads(spec, num_kv_heads: int) -> tuple[int, ...]:
    """'all' (the default) or '0,3' -> the KV heads that are memory heads (shared by every memory layer)."""
    return _index_list(spec, num_kv_heads, "memory.kv_heads", "KV-head")
