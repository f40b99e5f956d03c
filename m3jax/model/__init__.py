"""The Flax NNX decoder: pure math, no I/O."""

from m3jax.model.config import ModelConfig
from m3jax.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
