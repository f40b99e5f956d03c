"""Training tasks: what a batch holds and how the loss comes from it.

A task is what a new stage adds to training. It declares its batch as a *schema* (each field's global shape,
dtype and logical axes), read alike by `Trainer.global_batch`, the jitted step's shardings and the
ahead-of-time compile's abstract batch (`m3jax.train.aot`); it computes the loss of a batch as sums over its
tokens; and it opens its own data: the training iterator (with `get_state`/`set_state` for exact resume) and the
fixed held-out batches.

`LmTask` is next-token prediction on packed documents, the warm-up stage's objective. `MemoryTask` is the same
objective with every chunk reading its retrieved memories (Memory3's continued stage; `memory.read=True`).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from m3jax import checkpoint as ckpt_lib
from m3jax import memory_pipeline
from m3jax.config import ConfigError
from m3jax.data import pipeline
from m3jax.data.records import read_metadata
from m3jax.data.tokenizer import Tokenizer
from m3jax.memory import bank as bank_lib
from m3jax.memory import knowledge as knowledge_lib
from m3jax.memory import layout as layout_lib
from m3jax.memory.codecs import get_codec
from m3jax.memory.encode import encode_with
from m3jax.model import ModelConfig, Transformer
from m3jax.model.memory import Memory


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
    return token_loss_sums(lse, target_logit, weights, z_loss)


def model_loss_sums(model: Transformer, hidden: jax.Array, batch: dict[str, jax.Array],
                    config: ml_collections.ConfigDict):
    """`loss_sums` of the model's last hidden states against the batch's targets, the LM head in chunks of
    `config.loss.chunk_size` positions (`Transformer.token_losses`)."""
    lse, target_logit = model.token_losses(hidden, batch["targets"], int(config.loss.chunk_size))
    return token_loss_sums(lse, target_logit, batch["loss_weights"].astype(jnp.float32), float(config.loss.z_loss))


def token_loss_sums(lse: jax.Array, target_logit: jax.Array, weights: jax.Array, z_loss: float):
    """`loss_sums` from each token's log-sum-exp and target logit."""
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

    def eval_sums(self, model: Transformer, batch: dict[str, jax.Array]) -> dict[str, tuple[jax.Array, jax.Array]]:
        """Held-out metrics of a batch: name -> (cross-entropy sum, weight). "loss" is the task's own; a task may
        add variants of it, evaluated side by side on the same batches and parameters."""
        _, nll, weight = self.loss(model, batch)
        return {"loss": (nll, weight)}

    @abc.abstractmethod
    def train_iterator(self, process_index: int, process_count: int):
        """This process's rows of every training batch, forever; `get_state()`/`set_state()` resume it exactly."""

    @abc.abstractmethod
    def eval_batches(self, process_index: int, process_count: int) -> list[dict[str, np.ndarray]]:
        """This process's rows of the fixed held-out batches ([] when the run has none): `train.eval_batches`
        global batches of `data.eval_split`, or every record of it (0, the last batch padded with rows of loss
        weight 0)."""


class LmTask(Task):
    """Next-token prediction on packed documents (`m3jax.data.pipeline`): the warm-up stage."""

    name = "lm"
    FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")

    def schema(self) -> Schema:
        shape = (int(self.config.data.global_batch_size), int(self.config.data.seq_len))
        return {name: Field(shape, np.int32, ("batch", "seq")) for name in self.FIELDS}

    def loss(self, model, batch):
        hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
        return model_loss_sums(model, hidden, batch, self.config)

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


class MemoryTask(LmTask):
    """Next-token prediction where every 64-token chunk reads the memories retrieved for it (the continued stage).

    The batch is the warm-up's (same records, same order) plus the memory inputs of `m3jax.memory_pipeline`:
    each row's groups and slots, its M = G·R unique reference ids (G = `layout.max_groups(seq_len, chunk_size)`
    groups, R = `retrieval.refs_per_chunk`), and the memories of those ids, once per row, never once per chunk.
    `retrieval.mode` chooses where they come from:

    - "bank": the codes stored in `memory.bank` (tools/write_memory.py), gathered by the loader and decoded on
      device in the compute dtype. The bank must have been written by the checkpoint the run starts from
      (`init_from`); `memory.bank_other_checkpoint=True` reads one written by another (its age is logged).
      Memories of a bank do not change while the memory layers train: at step s they are s steps old.
    - "online": the references' tokens (`memory.knowledge`, tokenized by `data.tokenizer`), encoded in the step by
      the parameters being trained, through the memory layers only, one forward per unique reference. With
      `memory.encode_grad=True` (default) the loss is differentiated through the encoding too, so the writing
      side trains with the reading side, at the cost of the encoder's backward pass and of its activations;
      False makes the encoding a constant of the step (stop_gradient), as a bank's memories are. A sparse
      writer (k < the reference's tokens) learns what to keep only through that gradient
      (tests/test_memory_learning.py).

    The schema depends on the config alone (the dry run and the TPU fit check lower a memory step without data);
    the bank or knowledge base is opened when the data is.
    """

    name = "memory"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model_cfg = ModelConfig.from_config(config.model, config.memory)
        self.mode = str(config.retrieval.mode)
        if not self.model_cfg.has_memory:
            raise ConfigError("config.memory.heads: a run that reads memory needs a model with memory heads")
        self._source = None
        self._sink: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------- shapes
    def geometry(self) -> tuple[int, int, int]:
        """(G memory groups, S slots per group, M unique memories) of one row."""
        c = self.config
        groups = layout_lib.max_groups(int(c.data.seq_len), int(c.memory.chunk_size))
        return groups, int(c.memory.per_chunk), groups * int(c.retrieval.refs_per_chunk)

    def schema(self) -> Schema:
        schema = super().schema()
        b, t = int(self.config.data.global_batch_size), int(self.config.data.seq_len)
        groups, slots, m = self.geometry()
        cfg = self.model_cfg
        schema["memory_group"] = Field((b, t), np.int32, ("batch", "seq"))
        schema["memory_index"] = Field((b, groups, slots), np.int32, ("batch", None, None))
        schema["memory_ids"] = Field((b, m), np.int32, ("batch", None))
        if self.mode == "bank":
            row = bank_lib.row_shape(bank_lib.architecture(cfg))
            for name, (shape, dtype) in get_codec(self.config.memory.bank_codec).arrays(row).items():
                schema[memory_pipeline.CODES_PREFIX + name] = Field(
                    (b, m, *shape), jnp.dtype(dtype), ("batch", *([None] * (len(shape) + 1))))
            schema["memory_valid"] = Field((b, m, cfg.memory_k), np.bool_, ("batch", None, None))
        else:
            schema["memory_tokens"] = Field((b, m, cfg.memory_ref_len), np.int32, ("batch", None, None))
            schema["memory_lengths"] = Field((b, m), np.int32, ("batch", None))
        return schema

    # ------------------------------------------------------------------------------------------- loss
    def memory(self, model: Transformer, batch: dict[str, jax.Array]) -> Memory:
        """The batch's memories as the model reads them (decoded from the bank, or encoded by `model`)."""
        cfg, sink = self.model_cfg, jnp.asarray(self.sink_tokens(), jnp.int32)
        if self.mode == "bank":
            return memory_pipeline.device_memory(batch, self.config.memory.bank_codec, sink, dtype=cfg.dtype)
        tokens, lengths = batch["memory_tokens"], batch["memory_lengths"]
        b, m, ref_len = tokens.shape
        kv, positions = encode_with(model, tokens.reshape(b * m, ref_len), lengths.reshape(b * m), sink,
                                    k=cfg.memory_k, ref_len=ref_len)
        if not self.config.memory.encode_grad:
            kv = jax.lax.stop_gradient(kv)
        rows = kv[:, 0].reshape(b, m, *kv.shape[2:])  # [b, M, Lm, 2, mkv, k, d]
        valid = (positions[:, 0, 0, 0] >= 0).reshape(b, m, -1)  # a short reference pads every layer and head alike
        return Memory.from_rows(rows, batch["memory_index"], valid, sink)

    def loss(self, model, batch):
        hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], batch["memory_group"],
                              self.memory(model, batch))
        return model_loss_sums(model, hidden, batch, self.config)

    def eval_sums(self, model, batch):
        """The loss with memory, and on the same batches and weights: with every memory slot empty (the sink and
        positions kept: what the memories themselves add) and with memory off (the plain model, positions from 0:
        what the memory-reading model does without its memory input)."""
        out = {"loss": self.loss(model, batch)[1:]}
        empty = {**batch, "memory_index": jnp.full_like(batch["memory_index"], -1)}
        out["loss_empty_memory"] = self.loss(model, empty)[1:]
        start = self.model_cfg.context_start(len(self.sink_tokens()))
        hidden = model.hidden(batch["inputs"], batch["positions"] - start, batch["segment_ids"])
        out["loss_memory_off"] = model_loss_sums(model, hidden, batch, self.config)[1:]
        return out

    # ------------------------------------------------------------------------------------------- data
    def sink_tokens(self) -> np.ndarray:
        """The sink's token ids: the bank's (bank mode) or the tokenizer's (online); opens the source once."""
        if self._sink is None:
            self.source()
        return self._sink

    def stand_in_sink(self, length: int = 4) -> None:
        """Lowering without data (the dry run, the TPU fit check): a sink of `length` zeros instead of the source's
        ("<s>Reference:" is 3-5 tokens in the project's tokenizers), so no bank or knowledge base is opened. The
        step's shapes differ from a real run's by a few key positions."""
        self._sink = np.zeros(length, np.int32)

    def source(self):
        """The `MemoryBank` (bank mode) or `References` (online mode) the batches' ids index, opened once."""
        if self._source is None:
            self._source, self._sink = (self._open_bank() if self.mode == "bank" else self._open_knowledge())
        return self._source

    def _data_tokenizer_sha256(self) -> str:
        return read_metadata(self.config.data.path)["tokenizer_sha256"]

    def tokenizer(self) -> Tokenizer:
        """The tokenizer that wrote the data: `data.tokenizer`, else the one the data's metadata names."""
        c = self.config
        meta = read_metadata(c.data.path)
        tokenizer = Tokenizer(c.data.tokenizer or meta["tokenizer_path"])
        if tokenizer.sha256 != meta["tokenizer_sha256"]:
            raise ConfigError(f"config.data.tokenizer: {tokenizer.path} is not the tokenizer that wrote "
                              f"data.path={c.data.path} (sha256 {tokenizer.sha256[:12]}… vs "
                              f"{meta['tokenizer_sha256'][:12]}…)")
        return tokenizer

    def _open_bank(self):
        c = self.config
        if not c.memory.bank:
            raise ConfigError("config.memory.bank: retrieval.mode='bank' reads a memory bank; give its directory "
                              "(tools/write_memory.py --bank) or use retrieval.mode='online'")
        expect = None
        if c.init_from:
            expect = ckpt_lib.checkpoint_identity(ckpt_lib.resolve_step_dir(c.init_from))
        elif not c.memory.bank_other_checkpoint:
            raise ConfigError("config.init_from: a bank-mode run must start from the checkpoint that wrote "
                              f"memory.bank={c.memory.bank!r}; set init_from, or memory.bank_other_checkpoint=True")
        bank = bank_lib.MemoryBank.open(
            c.memory.bank, expect_architecture=bank_lib.architecture(self.model_cfg),
            expect_tokenizer=self._data_tokenizer_sha256(), expect_checkpoint=expect,
            allow_other_checkpoint=bool(c.memory.bank_other_checkpoint))
        if bank.metadata["codec"] != c.memory.bank_codec:
            raise ConfigError(f"config.memory.bank_codec: {c.memory.bank_codec!r}, but bank {bank.path} stores "
                              f"{bank.metadata['codec']!r}")
        written = bank.metadata["checkpoint"]
        logging.info("memory bank %s: %d references written by checkpoint %s step %d; its memories age one step "
                     "per training step", bank.path, bank.num_refs, written["run_id"], written["step"])
        return bank, np.asarray(bank.metadata["sink_tokens"], np.int32)

    def _open_knowledge(self):
        c = self.config
        for key in ("memory.knowledge", "data.tokenizer"):
            section, name = key.split(".")
            if not c[section][name]:
                raise ConfigError(f"config.{key}: retrieval.mode='online' encodes the knowledge base's references "
                                  "in every step; it needs memory.knowledge and data.tokenizer")
        tokenizer = self.tokenizer()
        refs = knowledge_lib.load_references(c.memory.knowledge, tokenizer, int(c.memory.ref_len))
        return refs, knowledge_lib.sink_tokens(tokenizer, c.memory.sink_text)

    def train_iterator(self, process_index, process_count):
        return memory_pipeline.memory_iterator(self.config, self.config.data.train_split, self.source(),
                                               len(self.sink_tokens()), process_index=process_index,
                                               process_count=process_count)

    def eval_batches(self, process_index, process_count):
        c = self.config
        if not c.train.eval_every:
            return []
        return memory_pipeline.memory_eval_batches(
            c, c.data.eval_split, self.source(), len(self.sink_tokens()), num_batches=int(c.train.eval_batches),
            process_index=process_index, process_count=process_count)


def task_for(config: ml_collections.ConfigDict) -> Task:
    """The task a config trains: the LM objective, or, when the run reads memory, the memory task."""
    return MemoryTask(config) if config.memory.read else LmTask(config)
