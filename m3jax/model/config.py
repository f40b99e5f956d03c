"""The model's hyper-parameters as a frozen (hashable) dataclass built from `config.model`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


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

    @classmethod
    def from_config(cls, model_cfg) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in model_cfg.items() if k in fields})

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
