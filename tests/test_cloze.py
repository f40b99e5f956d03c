"""Cloze evaluation with memory (m3jax/evals/cloze.py, also importable as m3jax.infer.cloze): batched greedy
generation equals a naive loop of full forwards, on one device and on a mesh; each arm reads the memory it names;
exact-match scoring; retrieval against a naive search; bad inputs named."""

import jax
import numpy as np
import pytest
from test_memory import random_params

from m3jax import parallel
from m3jax.data import entities
from m3jax.data.tokenizer import Tokenizer
from m3jax.evals import cloze
from m3jax.infer import cloze as infer_cloze
from m3jax.memory import bank as bank_lib
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib
from m3jax.model.memory import Memory, valid_keys
from m3jax.retrieval.embedder import Embedder
from m3jax.retrieval.index import Index, IndexSettings
from m3jax.retrieval.query import QueryRetriever

STEPS = 5


@pytest.fixture(scope="module")
def setup(memory_kb):
    """memory_kb's bank and tokenizer, a model of its architecture with random parameters (std 0.15: memory moves
    the logits), and entity cloze prompts of different lengths."""
    config = memory_kb["config"]
    cfg = ModelConfig.from_config(config.model, config.memory)
    bank = bank_lib.MemoryBank.open(memory_kb["bank"], expect_architecture=bank_lib.architecture(cfg),
                                    expect_tokenizer=bank_lib.tokenizer_hash(memory_kb["tokenizer"]),
                                    allow_other_checkpoint=True)
    items = entities.cloze_items(entities.generate(3, 0.0, seed=1))[::4]  # 8 items, several prompt lengths
    return {"config": config, "cfg": cfg, "params": random_params(cfg, 11), "bank": bank, "sink": memory_kb["sink"],
            "tokenizer": Tokenizer(memory_kb["tokenizer"]), "prompts": [it["prompt"] for it in items]}


def naive_greedy(cfg, params, prompts, steps, memory=None, start=0):
    """No padding on the left, no cache: a full forward of every prompt (right-padded, causal, so the padding is
    never seen) per generated token, argmax of the logits at each row's last token."""
    model = jax.jit(lambda tokens, positions, segment_ids, memory: params_lib.model_from(cfg, params)(
        tokens, positions, segment_ids, None if memory is None else np.zeros(tokens.shape, np.int32), memory))
    rows = [list(p) for p in prompts]
    width = max(map(len, rows)) + steps
    for _ in range(steps):
        tokens = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        real = (np.arange(width)[None] < np.asarray([len(r) for r in rows])[:, None]).astype(np.int32)
        positions = np.broadcast_to(start + np.arange(width, dtype=np.int32), tokens.shape)
        logits = np.asarray(model(tokens, positions, real, memory))
        for i, r in enumerate(rows):
            r.append(int(np.argmax(logits[i, len(r) - 1])))
    return [r[len(p):] for r, p in zip(rows, prompts, strict=True)]


def test_batched_greedy_generation_equals_naive_full_forwards(setup):
    """Left-padded prompts of different lengths, with each row's own memory (oracle arm) and without memory
    ("off": a zero-length sink, the plain model): the cached, batched generation equals a per-prompt loop of full
    forwards (memory read through `Transformer.__call__`; "off" through the model without a Memory at positions
    0…). The memory changes the completions, so the check is not one of two equal models."""
    cfg, params, bank, sink, tok = (setup[k] for k in ("cfg", "params", "bank", "sink", "tokenizer"))
    prompts = [[tok.bos_id, *ids] for ids in tok.encode_batch(setup["prompts"])]
    assert len({len(p) for p in prompts}) > 2, "prompts of several lengths exercise the padding"
    tokens, lengths = cloze.left_pad(prompts, max(map(len, prompts)))
    ids = np.arange(len(prompts)) % bank.num_refs

    with_memory = cloze.greedy_generate(params, cfg, tokens, lengths,
                                        cloze.single_slot_memory(bank, ids, sink, cfg.compute_dtype), STEPS)
    plain = cloze.greedy_generate(params, cfg, tokens, lengths, cloze.no_memory(cfg, len(prompts)), STEPS)
    kv, positions = bank.gather(ids[:, None], dtype=cfg.compute_dtype)
    memory = Memory.from_rows(kv, np.zeros((len(ids), 1, 1), np.int32), valid_keys(positions), sink)
    want = naive_greedy(cfg, params, prompts, STEPS, memory, start=cfg.context_start(len(sink)))
    assert with_memory.tolist() == want, "generation with memory differs from the naive loop"
    assert plain.tolist() == naive_greedy(cfg, params, prompts, STEPS), "generation without memory differs"
    assert (with_memory != plain).any(), "memory changed no generated token: the comparison proves little"

    # Where a training run's parameters live: 8 devices, parameters sharded over fsdp, the prompts' activations
    # over data x fsdp by the logical rules; the tokens come back replicated.
    config = setup["config"].mesh.copy_and_resolve_references()
    config.update(data=-1, fsdp=2)
    mesh = parallel.make_mesh(config)
    sharded = jax.device_put(params, params_lib.param_shardings(cfg, mesh, parallel.DEFAULT_LOGICAL_AXIS_RULES))
    on_mesh = cloze.greedy_generate(sharded, cfg, tokens, lengths,
                                    cloze.single_slot_memory(bank, ids, sink, cfg.compute_dtype), STEPS, mesh=mesh,
                                    rules=parallel.DEFAULT_LOGICAL_AXIS_RULES)
    assert on_mesh.tolist() == want, "generation on a mesh differs from the naive loop"


def test_arms_read_the_memories_they_name(setup):
    """oracle = the items' own references; shuffled = another entity's, the same partner for every item of an
    entity; empty = no slot (sink kept); off = no memory. The Memory of an id holds exactly the bank's decoded row."""
    cfg, bank, sink = setup["cfg"], setup["bank"], setup["sink"]
    oracle = np.repeat(np.arange(6), 3)  # 6 entities x 3 attributes
    refs = cloze.arm_references(cloze.ARMS, oracle, retrieved=oracle[::-1], seed=3)
    np.testing.assert_array_equal(refs["oracle"], oracle)
    np.testing.assert_array_equal(refs["retrieved"], oracle[::-1])
    assert refs["off"] is None and (refs["empty"] == -1).all()
    shuffled = refs["shuffled"]
    assert (shuffled != oracle).all() and sorted(set(shuffled.tolist())) == list(range(6))
    assert all(len(set(shuffled[oracle == e].tolist())) == 1 for e in range(6))
    np.testing.assert_array_equal(shuffled, cloze.arm_references(["shuffled"], oracle, seed=3)["shuffled"])

    ids = np.asarray([2, -1, 5])
    memory = cloze.single_slot_memory(bank, ids, sink, np.float32)
    kv, positions = bank.gather(np.asarray([2, 5]), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(memory.keys)[:, [0, 2], 0], np.moveaxis(np.asarray(kv[:, :, 0]), 1, 0))
    np.testing.assert_array_equal(np.asarray(memory.values)[:, [0, 2], 0],
                                  np.moveaxis(np.asarray(kv[:, :, 1]), 1, 0))
    np.testing.assert_array_equal(np.asarray(memory.index)[:, 0, 0], [0, -1, 0])
    np.testing.assert_array_equal(np.asarray(memory.valid)[[0, 2], 0], valid_keys(positions))
    assert not np.asarray(memory.valid)[1].any()
    np.testing.assert_array_equal(memory.sink_tokens, sink)
    off = cloze.no_memory(cfg, 3)
    assert off.sink_len == 0 and (np.asarray(off.index) == -1).all()


def test_complete_and_score_per_arm(setup):
    """`complete` gives each arm's continuation of `<s> + prompt`, equal to generating the prompts one batch at a
    time; an item is scored by the first word of its continuation; `summarize` splits accuracy and recall@1."""
    cfg, params, bank, sink, tok = (setup[k] for k in ("cfg", "params", "bank", "sink", "tokenizer"))
    prompts = setup["prompts"][:5]
    oracle = np.asarray([0, 1, 1, 2, 3])
    refs = cloze.arm_references(["oracle", "off"], oracle)
    got = cloze.complete(params, cfg, tok, prompts, refs, bank=bank, sink=sink, steps=STEPS, batch_size=2)
    encoded = [[tok.bos_id, *ids] for ids in tok.encode_batch(prompts)]
    tokens, lengths = cloze.left_pad(encoded, max(map(len, encoded)))
    alone = cloze.greedy_generate(params, cfg, tokens, lengths,
                                  cloze.single_slot_memory(bank, oracle, sink, cfg.compute_dtype), STEPS)
    assert got["oracle"] == [tok.decode(g) for g in alone]
    assert len(got["off"]) == len(prompts)

    assert cloze.first_word("  1850. He was") == "1850" and cloze.first_word("\n") == ""
    assert cloze.exact_match(" Brakel, then", "Brakel") and not cloze.exact_match(" Brakeltown", "Brakel")
    assert not cloze.exact_match(" brakel", "Brakel")  # exact: case counts

    correct = {"oracle": np.asarray([1, 1, 0, 1, 0], bool), "off": np.asarray([0, 0, 0, 1, 0], bool)}
    attributes = ["a", "b", "a", "b", "a"]
    heldout = np.asarray([True, True, False, False, False])
    s = cloze.summarize(correct, attributes, heldout, oracle, retrieved=np.asarray([0, 2, 1, 2, 0]))
    assert s["heldout"]["accuracy"] == {"oracle": 1.0, "off": 0.0}
    assert s["train"]["accuracy"]["oracle"] == pytest.approx(1 / 3)
    assert s["train"]["by_attribute"]["off"] == {"a": 0.0, "b": 1.0}
    assert s["heldout"]["recall_at_1"] == 0.5 and s["train"]["recall_at_1"] == pytest.approx(2 / 3)


def naive_overlap(reference, sequence) -> float:
    """Eq. 6 by brute force: the longest common subsequence of `reference` with any window of `sequence` of at most
    2|r| tokens (every start, the longest window there), over |r|."""
    r, s = list(reference), list(sequence)
    best = 0
    for start in range(max(1, len(s) - 2 * len(r) + 1)):  # a later start's window is inside an earlier one
        window = s[start:start + 2 * len(r)]
        table = [[0] * (len(window) + 1) for _ in range(len(r) + 1)]
        for i, a in enumerate(r):
            for j, b in enumerate(window):
                table[i + 1][j + 1] = table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
        best = max(best, table[-1][-1])
    return best / len(r)


def test_questions_read_the_naive_filtered_top_references(setup):
    """QueryRetriever = the references whose embeddings have the largest dot products with the question's (numpy),
    minus those whose eq.-6 overlap with the question exceeds 2/3 (a brute-force LCS), through the real Embedder
    and a ScaNN index of the bank's reference texts. A question that is a whole reference does not read it."""
    bank, tok = setup["bank"], setup["tokenizer"]
    ids = np.arange(min(8, bank.num_refs))
    tokens = [t[t >= 0] for t in bank.read_tokens(ids)]
    texts = [tok.decode(t) for t in tokens]
    embedder = Embedder.load("all-MiniLM-L6-v2", max_len=128, batch_size=8)
    vectors = embedder.embed(texts)
    index = Index.build(vectors, IndexSettings(kind="brute_force"), embedder=embedder.identity, max_k=8)
    queries = [" ".join(t.split()[5:25]) for t in texts] + texts[:3]  # passages, then whole references
    retriever = QueryRetriever(embedder.embed, index.search, bank.read_tokens, tok.encode, refs=2, candidates=4,
                               max_overlap=2 / 3)
    got = retriever(queries)

    order = np.argsort(-(embedder.embed(queries) @ vectors.T), axis=1)[:, :4]
    for q, text in enumerate(queries):
        kept = [int(i) for i in order[q] if naive_overlap(tokens[i], tok.encode(text)) <= 2 / 3][:2]
        np.testing.assert_array_equal(got[q], kept + [-1] * (2 - len(kept)), err_msg=text)
    passages = got[: len(texts), 0]
    assert (passages == ids).mean() >= 0.5, passages  # passages find their own reference: the search is not arbitrary
    for q in range(3):  # a whole reference as the question: its own reference is filtered out
        assert ids[q] not in got[len(texts) + q], got[len(texts) + q]
    assert retriever.stats["dropped_overlap"] >= 3

    against = [tokens[0]] * len(queries)  # filtered against another sequence: reference 0 is never read
    assert not (retriever(queries, against=against) == 0).any()
    with pytest.raises(ValueError, match=f"1 sequences to filter against for {len(queries)} queries"):
        retriever(queries, against=against[:1])
    with pytest.raises(ValueError, match="max_overlap must be in"):
        QueryRetriever(embedder.embed, index.search, bank.read_tokens, tok.encode, refs=1, candidates=4,
                       max_overlap=1.5)


def test_bad_inputs_are_named(setup):
    cfg, params, bank, sink, tok = (setup[k] for k in ("cfg", "params", "bank", "sink", "tokenizer"))
    oracle = np.arange(3)
    with pytest.raises(ValueError, match=r"unknown cloze arms \['recalled'\]"):
        cloze.arm_references(["oracle", "recalled"], oracle)
    with pytest.raises(ValueError, match="'retrieved' arm needs the retrieved ids"):
        cloze.arm_references(["retrieved"], oracle)
    with pytest.raises(ValueError, match="differ in shape"):
        cloze.arm_references(["retrieved"], oracle, retrieved=oracle[:2])
    with pytest.raises(ValueError, match="at least 2 distinct references"):
        cloze.shuffled_references(np.zeros(4, np.int64), seed=0)
    refs = cloze.arm_references(["oracle"], oracle)
    with pytest.raises(ValueError, match="need the bank and its sink"):
        cloze.complete(params, cfg, tok, ["a", "b", "c"], refs)
    with pytest.raises(ValueError, match=r"arm 'oracle': 3 reference ids for 2 prompts"):
        cloze.complete(params, cfg, tok, ["a", "b"], refs, bank=bank, sink=sink)
    with pytest.raises(ValueError, match=r"cloze prompt 1 .* must fit one memory group \(< chunk_size=64\)"):
        cloze.complete(params, cfg, tok, ["a", "word " * 80, "c"], refs, bank=bank, sink=sink)
    with pytest.raises(ValueError, match="no cloze prompts"):
        cloze.complete(params, cfg, tok, [], refs, bank=bank, sink=sink)
    with pytest.raises(ValueError, match="steps must be positive"):
        cloze.greedy_generate(params, cfg, np.ones((1, 2), np.int32), np.asarray([2]), cloze.no_memory(cfg, 1), 0)
    with pytest.raises(ValueError, match=r"prompt lengths must be in \[1, 2\]"):
        cloze.left_pad([[1, 2, 3]], 2)


def test_the_infer_room_names_the_evals_functions():
    """tools import cloze from m3jax.infer: every name there is the evals room's own object."""
    assert infer_cloze.__all__ and all(getattr(infer_cloze, n) is getattr(cloze, n) for n in infer_cloze.__all__)
