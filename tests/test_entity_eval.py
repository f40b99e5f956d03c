"""Held-out entities scored in training (config.eval, m3jax/evals/entities.py): the evaluation line of a continued
run holds their accuracy per arm and the retrieval recall beside the held-out losses, equal to cloze.complete and
exact_match run apart on the run's parameters and bank; online mode encodes the memories with the parameters it
scores; bad settings are named."""

import copy
import json
import re

import jax
import numpy as np
import pytest
from test_memory import random_params

from m3jax import checkpoint as ckpt_lib
from m3jax.config import ConfigError, validate
from m3jax.data import entities
from m3jax.data.records import read_metadata, split_source
from m3jax.data.tokenizer import Tokenizer
from m3jax.evals import cloze
from m3jax.evals.entities import ACCURACY, RECALL, EntityEval, read_items
from m3jax.memory import bank as bank_lib
from m3jax.memory import encode as encode_lib
from m3jax.memory import writer
from m3jax.memory.knowledge import load_references
from m3jax.memory.layout import max_groups
from m3jax.model import ModelConfig
from m3jax.model.params import init_params
from m3jax.retrieval import build
from m3jax.retrieval.embedder import Embedder
from m3jax.retrieval.index import Index, IndexSettings
from m3jax.retrieval.retrieve import RetrievedIds
from m3jax.train import loop
from m3jax.train.tasks import MemoryTask

NUM_ENTITIES, HELDOUT = 8, 4
STEPS = 4  # greedy tokens per prompt


@pytest.fixture(scope="module")
def entity_kb(memory_kb, tmp_path_factory):
    """tools/make_entities.py's files for 8 entities (4 held out), their knowledge base as references of the session
    tokenizer (one each), its bank written by a fresh run's initial parameters (seed 0) with its brute-force index
    at BANK/index, and retrieved ids for memory_kb's train split that read those references (each chunk a fixed
    one: what a run trains on does not matter here)."""
    root = tmp_path_factory.mktemp("entity_eval")
    task = entities.generate(NUM_ENTITIES, HELDOUT / NUM_ENTITIES, seed=5)
    entities.write(root / "entities", task, entities.training_documents(task, 1), 1, 1.0)
    config = copy.deepcopy(memory_kb["config"])
    cfg = ModelConfig.from_config(config.model, config.memory)
    tokenizer = Tokenizer(memory_kb["tokenizer"])
    knowledge = str(root / "entities" / "knowledge.jsonl")
    refs = load_references(knowledge, tokenizer, config.memory.ref_len)
    assert len(refs) == NUM_ENTITIES, "an entity's entry is one reference"
    bank, _ = writer.open_for_writing(
        str(root / "bank"), refs, architecture=bank_lib.architecture(cfg), tokenizer_sha256=tokenizer.sha256,
        checkpoint={"run_id": "fresh", "step": 0}, sink=memory_kb["sink"], codec="bf16", refs_per_shard=64,
        record=writer.writer_record(refs, 1, cfg.dtype))
    writer.write_references(bank, init_params(cfg, seed=0), cfg, refs, memory_kb["sink"], batch_size=8)
    embedder = Embedder.from_config(config.retrieval)
    vectors = embedder.embed(build.reference_texts(bank, tokenizer, np.arange(len(refs))))
    Index.build(vectors, IndexSettings(kind="brute_force"), embedder=embedder.identity,
                bank=build.bank_binding(bank)).save(build.default_index_dir(str(root / "bank")))

    meta = read_metadata(memory_kb["data"])
    num_records, groups = meta["splits"]["train"]["num_records"], max_groups(meta["seq_len"], config.memory.chunk_size)
    ids = RetrievedIds.create(root / "ids", {"num_records": num_records, "seq_len": meta["seq_len"],
                                             "num_refs": len(refs), "block_records": num_records,
                                             "chunk_size": config.memory.chunk_size, "num_groups": groups,
                                             "refs_per_chunk": 1})
    ids.write_block(0, (np.arange(num_records)[:, None, None] + np.arange(groups)[None, :, None]) % len(refs))
    items = [json.loads(line) for line in (root / "entities" / "cloze.jsonl").read_text().splitlines()]
    return {"root": root, "cloze": str(root / "entities" / "cloze.jsonl"), "knowledge": knowledge,
            "bank": str(root / "bank"), "ids": str(root / "ids"), "refs": refs, "tokenizer": tokenizer, "cfg": cfg,
            "embedder": embedder, "vectors": vectors, "heldout": [it for it in items if it["heldout"]]}


def entity_config(memory_kb, entity_kb, mode="bank"):
    """A continued run on memory_kb's data reading the entity bank (or, online, its knowledge base), scoring every
    held-out item and every record of the train split (the split with retrieved ids) at each evaluation."""
    c = copy.deepcopy(memory_kb["config"])
    c.data.update(path=memory_kb["data"], tokenizer=memory_kb["tokenizer"], global_batch_size=8, eval_split="train")
    c.memory.update(read=True, bank=entity_kb["bank"], bank_other_checkpoint=True, knowledge=entity_kb["knowledge"])
    c.retrieval.update(mode=mode, ids_path=entity_kb["ids"])
    c.eval.update(cloze=entity_kb["cloze"], cloze_tokens=STEPS, cloze_batch=16)
    if mode == "online":
        c.eval.cloze_index = build.default_index_dir(entity_kb["bank"])
    # test_continued's schedule and batch, so a suite compiles the train and eval steps once for both
    c.train.update(num_steps=6, checkpoint_every=3, eval_every=6, eval_batches=0, log_every=1)
    return c


def independent(entity_kb, params, bank):
    """What the evaluation must report, computed apart: each held-out item's reference by the knowledge base's line
    order (entity i is line i), the retrieved one by a numpy dot product with the references' vectors, and the
    continuations of `cloze.complete` (one device) -> (accuracy per arm, recall@1, continuations)."""
    items, refs = entity_kb["heldout"], entity_kb["refs"]
    prompts, answers = [it["prompt"] for it in items], [it["answer"] for it in items]
    oracle = np.searchsorted(refs.doc_index, [it["entity"] for it in items])
    retrieved = np.argmax(entity_kb["embedder"].embed(prompts) @ entity_kb["vectors"].T, axis=1)
    references = {"retrieved": retrieved, "empty": np.full(len(items), -1), "off": None}
    texts = cloze.complete(params, entity_kb["cfg"], entity_kb["tokenizer"], prompts, references, bank=bank,
                           sink=np.asarray(bank.metadata["sink_tokens"], np.int32), steps=STEPS, batch_size=16)
    accuracy = {ACCURACY[arm]: float(np.mean([cloze.exact_match(t, a) for t, a in zip(got, answers, strict=True)]))
                for arm, got in texts.items()}
    return accuracy, float(np.mean(retrieved == oracle)), texts


def open_bank(entity_kb):
    return bank_lib.MemoryBank.open(entity_kb["bank"], expect_architecture=bank_lib.architecture(entity_kb["cfg"]),
                                    expect_tokenizer=entity_kb["tokenizer"].sha256, allow_other_checkpoint=True)


@pytest.mark.slow
def test_the_evaluation_line_holds_entity_accuracy_beside_the_losses(memory_kb, entity_kb, tmp_path):
    """A bank-mode run with eval.cloze stopped at step 2: metrics.jsonl's eval records at steps 0 and 2 hold the
    held-out losses (over every record: "tokens" = the split's) and the entities' accuracy per arm and recall@1;
    at step 2 they equal cloze.complete + exact_match on the run's checkpoint and bank, the references found
    apart."""
    config = entity_config(memory_kb, entity_kb)
    config.train.stop_at = 2
    summary = loop.train(config, str(tmp_path))
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2]
    names = {"loss", "loss_empty_memory", "loss_memory_off", "tokens", RECALL, *ACCURACY.values()}
    assert all(set(r) == names | {"step", "split"} for r in evals), evals
    source, decode = split_source(memory_kb["data"], "train")
    tokens = sum(int(decode(i, source[i])["loss_weights"].sum()) for i in range(len(source)))
    assert all(r["tokens"] == tokens for r in evals), (tokens, evals)
    assert summary[f"eval/{RECALL}"][2] == evals[-1][RECALL]

    params = jax.device_get(ckpt_lib.load_model(ckpt_lib.resolve_step_dir(tmp_path / "checkpoints")).params)
    accuracy, recall, _ = independent(entity_kb, params, open_bank(entity_kb))
    assert {name: evals[-1][name] for name in accuracy} == accuracy
    assert evals[-1][RECALL] == recall > 0.5, "the prompts find their entities' references"


def memory_task(config):
    task = MemoryTask(config)
    return task, task.tokenizer(), task.source(), task.sink_tokens()


def test_bank_and_online_modes_score_what_they_read(memory_kb, entity_kb):
    """Parameters under which memory moves the answers (random, std 0.15). Bank mode: every arm's continuations
    equal cloze.complete's on the same bank, and so do the accuracies and recall. Online mode: the retrieved arm
    reads the references encoded by the parameters scored (each item's alone, by the writer's encoder), and its
    empty-memory and memory-off arms equal bank mode's."""
    cfg = entity_kb["cfg"]
    params = random_params(cfg, 4)
    config = entity_config(memory_kb, entity_kb)
    _, tokenizer, bank, sink = memory_task(config)
    scored = EntityEval(config, cfg, tokenizer, bank, sink)
    accuracy, recall, texts = independent(entity_kb, params, bank)
    got = scored.completions(params)
    assert got == texts
    assert scored(params) == {**accuracy, RECALL: recall}
    assert got["retrieved"] != got["empty"], "memory changed no answer: the comparison proves little"

    online = entity_config(memory_kb, entity_kb, "online")
    _, tokenizer, refs, sink = memory_task(online)
    scored_online = EntityEval(online, cfg, tokenizer, refs, sink)
    got_online = scored_online.completions(params)
    assert got_online["empty"] == got["empty"] and got_online["off"] == got["off"]
    np.testing.assert_array_equal(scored_online.retrieved, scored.retrieved)
    tokens, lengths = refs.rows(scored.retrieved)
    kv, positions = encode_lib.encode_references(params, cfg, tokens, lengths, sink)
    memory = cloze.slot_memory(kv[:, None], positions[:, None], np.ones(len(tokens), bool), sink)
    want = cloze.greedy_generate(params, cfg, scored.tokens, scored.lengths, memory, STEPS)
    assert got_online["retrieved"] == [tokenizer.decode(g) for g in want]


def test_items_are_the_held_out_ones_or_a_fixed_sample(entity_kb):
    heldout = entity_kb["heldout"]
    assert len(heldout) == HELDOUT * len(entities.ATTRIBUTES)
    assert read_items(entity_kb["cloze"], 0) == heldout == read_items(entity_kb["cloze"], len(heldout) + 1)
    sample = read_items(entity_kb["cloze"], 5)
    assert len(sample) == 5 and sample == read_items(entity_kb["cloze"], 5)
    assert sample == [it for it in heldout if it in sample], "a sample keeps the file's order"


def test_bad_entity_settings_are_named(memory_kb, entity_kb, tmp_path):
    """A missing cloze file stops the run before it starts, naming the key and the file; settings that cannot
    work are named by validate; entities that no reference of the bank states are named."""
    config = entity_config(memory_kb, entity_kb)
    config.eval.cloze = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=re.escape(f"config.eval.cloze: no file {tmp_path / 'missing.jsonl'}")):
        loop.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()

    for key, value, named in (("memory.read", False, "config.eval.cloze: .*memory.read=True"),
                              ("train.eval_every", 0, "config.eval.cloze: .*train.eval_every=0"),
                              ("eval.cloze_batch", 0, "config.eval.cloze_batch: must be positive"),
                              ("eval.cloze_items", -1, "config.eval.cloze_items: must be >= 0")):
        config = entity_config(memory_kb, entity_kb)
        section, name = key.split(".")
        config[section][name] = value
        with pytest.raises(ConfigError, match=named):
            validate(config)
    config = entity_config(memory_kb, entity_kb, "online")
    config.eval.cloze_index = ""
    with pytest.raises(ConfigError, match="config.eval.cloze_index: online mode"):
        validate(config)

    config = entity_config(memory_kb, entity_kb)
    config.memory.bank = memory_kb["bank"]  # the embedded corpus's references: no entity in them
    _, tokenizer, bank, sink = memory_task(config)
    with pytest.raises(ConfigError, match=r"config.eval.cloze: no reference of the bank \S+ states entity '\w+ \w+'"):
        EntityEval(config, entity_kb["cfg"], tokenizer, bank, sink)
