"""Every held-out record scored (train.eval_batches=0): the last global batch is padded with rows that weigh nothing
(and read no memory), for 1 and 2 processes alike, and the held-out loss is the mean over exactly the split's
tokens, equal to the model run on each record alone."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lm_config
from test_continued import continued_config

from m3jax.config import resolve
from m3jax.data import pipeline
from m3jax.data.records import read_metadata, split_source, write_metadata
from m3jax.memory_pipeline import memory_iterator
from m3jax.model import params as params_lib
from m3jax.parallel import make_mesh
from m3jax.train.loop import held_out_loss
from m3jax.train.step import Trainer


def split_rows(data_dir, split):
    """Every record of a split in stored order, read apart from the pipeline: {field: [n, L]}."""
    source, decode = split_source(data_dir, split)
    rows = [decode(i, source[i]) for i in range(len(source))]
    return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


def concat(batches, process_batches=None):
    """Batches -> {field: rows}, in global order: with `process_batches` (the other process's batches), each
    global batch is process 0's rows then process 1's."""
    pairs = list(zip(batches, process_batches or [{}] * len(batches), strict=True))
    return {name: np.concatenate([np.concatenate([a[name], b[name]]) if b else a[name] for a, b in pairs])
            for name in batches[0]}


def test_every_lm_record_is_scored_once_and_padding_weighs_nothing(lm_data):
    """ALL_RECORDS: the split's records in stored order, then all-zero rows up to a whole global batch; 2 processes
    read the same global batches; the loss weights sum to the split's real token count. Other counts keep their
    meaning (complete batches only)."""
    want = split_rows(lm_data, "heldout")
    n, batch = len(want["inputs"]), 16
    assert n % batch, f"{n} records fill whole batches of {batch}: nothing is padded"

    def batches(process_index=0, process_count=1):
        return pipeline.make_eval_batches(lm_data, "heldout", global_batch_size=batch, num_batches=pipeline.ALL_RECORDS,
                                          process_index=process_index, process_count=process_count)

    one = batches()
    assert len(one) == -(-n // batch) and all(b["inputs"].shape[0] == batch for b in one)
    got = concat(one)
    for name, rows in want.items():
        np.testing.assert_array_equal(got[name][:n], rows, err_msg=name)
        assert not got[name][n:].any(), f"padding rows of {name} are not zero"
    assert got["loss_weights"].sum() == want["loss_weights"].sum() > 0
    two = concat(batches(0, 2), batches(1, 2))
    for name in want:
        np.testing.assert_array_equal(two[name], got[name], err_msg=name)
    assert len(pipeline.make_eval_batches(lm_data, "heldout", global_batch_size=batch)) == n // batch


def reference_sums(model, rows, sums_of) -> dict[str, tuple[float, float]]:
    """name -> (Σ nll, Σ weight) over every row, each run alone: `sums_of(model, row) -> {name: (nll, weight)}`."""
    fn = jax.jit(sums_of)
    out: dict[str, np.ndarray] = {}
    for row in rows:
        for name, sums in jax.device_get(fn(model, row)).items():
            out[name] = out.get(name, 0.0) + np.asarray(sums, np.float64)
    return {name: (float(nll), float(weight)) for name, (nll, weight) in out.items()}


def test_held_out_loss_of_every_lm_record_equals_each_record_alone(lm_data):
    """The trainer's held-out loss over every record (8 devices, a padded last batch) is Σ nll / Σ weight of the
    model run on one record at a time, in float64 from the logits; "tokens" is the split's real token count."""
    config = lm_config(lm_data, num_steps=1)
    config.data.global_batch_size = 16
    config.train.eval_batches = 0
    resolve(config)  # the vocabulary from the data
    trainer = Trainer(config, make_mesh(config.mesh))
    batches = trainer.task.eval_batches(0, 1)
    params = trainer.init_state().params
    got = held_out_loss(trainer, batches)(params)

    want = split_rows(lm_data, "heldout")
    model = params_lib.model_from(trainer.model_cfg, jax.device_get(params))

    def sums_of(model, row):
        logits = model(row["inputs"][None], row["positions"][None], row["segment_ids"][None])[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)[:, : trainer.model_cfg.vocab_size], -1)
        nll = -jnp.take_along_axis(logp, row["targets"][:, None], -1)[:, 0]
        weight = row["loss_weights"].astype(jnp.float32)
        return {"loss": (jnp.sum(nll * weight), jnp.sum(weight))}

    rows = [{name: want[name][i] for name in want} for i in range(len(want["inputs"]))]
    nll, weight = reference_sums(model, rows, sums_of)["loss"]
    assert got["tokens"] == weight == want["loss_weights"].sum()
    assert got["loss"] == pytest.approx(nll / weight, rel=1e-5)


def test_held_out_memory_losses_of_every_record_equal_each_record_alone(memory_kb, kb_retrieval):
    """The memory task (bank mode) over every record of a split: padding rows read nothing (no id, no slot, no valid
    key) and weigh nothing, 2 processes read the same rows, and the three held-out losses (with memory, empty
    memory, memory off) are the sums of each record's, read one record at a time by the training iterator."""
    config = continued_config(memory_kb, kb_retrieval, "bank")
    config.memory.bank_other_checkpoint = True
    config.data.eval_split = "train"  # the split with retrieved ids
    config.train.update(eval_every=1, eval_batches=0)
    trainer = Trainer(config, make_mesh(config.mesh))
    task, batch = trainer.task, config.data.global_batch_size
    one = task.eval_batches(0, 1)
    got = concat(one)
    want = split_rows(memory_kb["data"], "train")
    n = len(want["inputs"])
    assert n % batch and len(got["inputs"]) == -(-n // batch) * batch, (n, batch)
    np.testing.assert_array_equal(got["inputs"][:n], want["inputs"])
    pad = slice(n, None)
    assert not got["loss_weights"][pad].any() and not got["memory_valid"][pad].any()
    for name in ("memory_index", "memory_ids", "memory_group"):
        assert (got[name][pad] == -1).all(), name
    two = concat(task.eval_batches(0, 2), task.eval_batches(1, 2))
    for name in got:
        np.testing.assert_array_equal(two[name], got[name], err_msg=name)

    params = trainer.init_state().params
    losses = held_out_loss(trainer, one)(params)
    alone = copy.deepcopy(config)
    alone.data.global_batch_size = 1
    rows = list(memory_iterator(alone, "train", task.source(), len(task.sink_tokens()), num_epochs=1,
                                shuffle=False))
    assert len(rows) == n
    model = params_lib.model_from(trainer.model_cfg, jax.device_get(params))
    sums = reference_sums(model, rows, task.eval_sums)
    assert sorted(sums) == ["loss", "loss_empty_memory", "loss_memory_off"]
    for name, (nll, weight) in sums.items():
        assert losses["tokens"] == weight == want["loss_weights"].sum()
        assert losses[name] == pytest.approx(nll / weight, rel=1e-5), name
    assert len({losses["loss"], losses["loss_empty_memory"], losses["loss_memory_off"]}) == 3


def test_a_held_out_split_under_one_batch_is_scored_when_every_record_is(lm_data, tmp_path):
    """resolve: 10 held-out records and batches of 16 give no held-out loss with train.eval_batches=6 (said, with
    the remedy) and one padded batch with eval_batches=0."""
    meta = read_metadata(lm_data)
    write_metadata(tmp_path, {**meta, "splits": {**meta["splits"], "heldout": {**meta["splits"]["heldout"],
                                                                                "num_records": 10}}})
    said = []
    for eval_batches, eval_every in ((6, 0), (0, 50)):
        config = lm_config(str(tmp_path), num_steps=100, eval_every=50)
        config.train.eval_batches = eval_batches
        resolve(config, log=said.append)
        assert (config.train.eval_every, config.train.eval_batches) == (eval_every, eval_batches)
    assert said == [f"config.train.eval_every: held-out split 'heldout' of the data {tmp_path} holds 10 records, "
                    "less than one global batch of 16: no held-out loss in this run (train.eval_batches=0 would "
                    "score every record)"]
