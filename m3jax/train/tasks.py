"""Training tasks: what a batch holds and how the loss comes from it.

A task is what a new stage adds to training. It declares its batch as a *schema* (each field's global shape,
dtype and logical axes), read alike by `Trainer.global_batch`, the jitted step's shardings and the
ahead-of-time compile's abstract batch (`m3jax.train.aot`); it computes the loss of a batch as sums over its
tokens; and it opens its own data: the training iterator (with `get_state`/`set_state` for exact resume) and the
fixed held-out batches.

`LmTask` is next-token prediction on packed documents, the warm-up stage's objective.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m3jax.config import ConfigError
from m3jax.data import pipeline
from m3jax.model import Transformer


@dataclasses.dataclass(frozen=True)
class Field:
    """One array of a global batch: its global shape (batch first), dtype and logical axis names."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]


Schema = dict[str, Field]


def loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float):
    """Weighted sums over tokens: (cross-entropy + z_loss·lse², cross-entropy, weight). All float32."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (lse - target_logit) * weights
    total = nll + z_loss * jnp.square(lse) * weights if z_loss else nll
    return jnp.sum(total), jnp.sum(nll), jnp.sum(weights)


class Task(abc.ABC):
    """An objective and its data. `config` is the run's (resolved) config."""

    name: str

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @abc.abstractmethod
    def schema(self) -> Schema:
        """The global batch, field by field."""

    @abc.abstractmethod
    def loss(self, model: Transformer, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(objective, cross-entropy, weight): float32 sums over the batch's tokens (the step divides by weight)."""

    @abc.abstractmethod
    def train_iterator(self, process_index: int, process_count: int):
        """This process's rows of every training batch, forever; `get_state()`/`set_state()` resume it exactly."""

    @abc.abstractmethod
    def eval_batches(self, process_index: int, process_count: int) -> list[dict[str, np.ndarray]]:
        """This process's rows of the fixed held-out batches ([] when the run has none)."""


class LmTask(Task):
    """Next-token prediction on packed documents (`m3jax.data.pipeline`): the warm-up stage."""

    name = "lm"
    FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")

    def schema(self) -> Schema:
        shape = (int(self.config.data.global_batch_size), int(self.config.data.seq_len))
        return {name: Field(shape, np.int32, ("batch", "seq")) for name in self.FIELDS}

    def loss(self, model, batch):
        logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        return loss_sums(logits, batch["targets"], batch["loss_weights"].astype(jnp.float32),
                         float(self.config.loss.z_loss))

    def train_iterator(self, process_index, process_count):
        d = self.config.data
        return pipeline.make_lm_iterator(
            d.path, d.train_split, global_batch_size=int(d.global_batch_size), seed=int(d.shuffle_seed),
            process_index=process_index, process_count=process_count, worker_count=int(d.worker_count),
            prefetch=int(d.prefetch))

    def eval_batches(self, process_index, process_count):
        c = self.config
        if not c.train.eval_every:
            return []
        return pipeline.make_eval_batches(
            c.data.path, c.data.eval_split, global_batch_size=int(c.data.global_batch_size),
            num_batches=int(c.train.eval_batches), process_index=process_index, process_count=process_count)


def task_for(config: ml_collections.ConfigDict) -> Task:
    """The task a config trains: the LM objective, or, when the run reads memory, the memory task."""
    if config.memory.read:
        raise ConfigError("config.memory.read: no training task reads memory yet (the continued stage is not "
                          "built); train with memory.read=False")
    return LmTask(config)
