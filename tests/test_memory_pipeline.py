"""The memory-augmented Grain pipeline on the session's knowledge split (conftest.memory_kb) and synthetic
retrieved ids: the loader does not care how the ids were found, so no embedder or index is built here
(tests/test_retrieval.py runs the retrieval tools end to end).

Checked against independent constructions: groups and slots from the layout's definition token by token, the
bank's rows read straight from its zarr array with TensorStore, reference tokens from the knowledge base, and the
records, order and every stage-1 field from the warm-up task's own iterator.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from m3jax import memory_pipeline
from m3jax.data.records import read_metadata
from m3jax.memory.layout import max_groups
from m3jax.memory.writer import read_record
from m3jax.memory_pipeline import CODES_PREFIX, device_memory, make_memory_iterator, memory_iterator
from m3jax.retrieval.build import open_bank
from m3jax.retrieval.retrieve import RetrievedIds
from m3jax.train.tasks import LmTask

BATCH, SLOTS, CHUNK, REF_LEN = 4, 5, 64, 128


def synthetic_ids(directory, data_dir, split, num_refs, references_sha256, seed=0):
    """A complete ids store for `split`: one reference per chunk drawn at random, a tenth of the chunks none, into
    the references whose digest is `references_sha256` (as tools/retrieve.py records it)."""
    meta = read_metadata(data_dir)
    n, groups = meta["splits"][split]["num_records"], max_groups(meta["seq_len"], CHUNK)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_refs, (n, groups, 1)).astype(np.int32)
    ids[rng.random(ids.shape) < 0.1] = -1
    store = RetrievedIds.create(directory, {"num_records": n, "block_records": 8, "num_groups": groups,
                                            "refs_per_chunk": 1, "chunk_size": CHUNK, "num_refs": num_refs,
                                            "seq_len": meta["seq_len"], "split": split,
                                            "references_sha256": references_sha256})
    for i in range(store.num_blocks):
        a, b = store.block_range(i)
        store.write_block(i, ids[a:b])
    return RetrievedIds.open(directory)


@pytest.fixture(scope="module")
def setup(memory_kb, tmp_path_factory):
    from m3jax.data.tokenizer import Tokenizer

    bank = open_bank(memory_kb["bank"], Tokenizer(memory_kb["tokenizer"]))
    ids = synthetic_ids(tmp_path_factory.mktemp("ids") / "retrieval-train", memory_kb["data"], "train", bank.num_refs,
                        read_record(memory_kb["bank"])["references_sha256"])
    return {"bank": bank, "bank_dir": memory_kb["bank"], "ids": ids, "data": memory_kb["data"],
            "sink": memory_kb["sink"], "refs": memory_kb["refs"]}


def iterator(setup, mode="bank", source=None, **kw):
    args = dict(mode=mode, layout="paper", slots=SLOTS, chunk_size=CHUNK, sink_len=len(setup["sink"]),
                ref_len=REF_LEN, global_batch_size=BATCH, seed=3)
    args.update(kw)
    return make_memory_iterator(setup["data"], "train", setup["ids"], source or setup["bank"], **args)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def naive_reads(segment_ids, refs):
    """Per token, the set of references it reads (paper layout), from the definitions, token by token."""
    chunk_of, g, pos = [], -1, 0
    for t, s in enumerate(segment_ids):
        if s == 0:
            chunk_of.append(-1)
            continue
        pos = 0 if t == 0 or segment_ids[t - 1] != s else pos + 1
        if pos % CHUNK == 0:
            g += 1
        chunk_of.append(g)
    seg_of = {c: segment_ids[t] for t, c in enumerate(chunk_of) if c >= 0}
    reads = []
    for c in chunk_of:
        if c < 0:
            reads.append(set())
        else:
            reads.append({int(refs[h, 0]) for h in range(max(0, c - SLOTS + 1), c + 1)
                          if seg_of[h] == seg_of[c] and refs[h, 0] >= 0})
    return reads


def test_bank_batches_hold_the_retrieved_memories(setup):
    store = setup["ids"]
    stored = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": setup["bank_dir"] + "/memory/"}},
                     open=True).result()
    p = len(setup["sink"])
    for batch in take(iterator(setup), 3):
        codes = batch[CODES_PREFIX + "memory"]  # [b, M, Lm, 2, mkv, k, d]
        assert codes.shape[:2] == batch["memory_ids"].shape
        for row in range(BATCH):
            record = int(batch["record"][row])
            ids = batch["memory_ids"][row]
            for m, r in enumerate(ids):  # each unique memory is the bank's row, bit for bit; -1 = zeros
                want = stored[int(r)].read().result() if r >= 0 else np.zeros(codes.shape[2:], codes.dtype)
                np.testing.assert_array_equal(codes[row, m].view(np.uint16), want.view(np.uint16))
                assert batch["memory_valid"][row, m].any() == (r >= 0)
            reads = naive_reads(batch["segment_ids"][row], store[record])
            for t, want in enumerate(reads):
                g = batch["memory_group"][row, t]
                slots = batch["memory_index"][row, g] if g >= 0 else np.array([], int)
                got = ids[slots[slots >= 0]].tolist()
                assert sorted(got) == sorted(want) and len(got) == len(set(got)), (record, t)
            real = batch["segment_ids"][row] > 0
            assert np.all(batch["positions"][row][real] >= p + REF_LEN)


def loader_config(setup, memory_kb, mode="bank"):
    """memory_kb's config reading the synthetic ids in the paper layout: batches of BATCH records, shuffle seed 3."""
    config = memory_kb["config"].copy_and_resolve_references()
    config.data.update(path=setup["data"], global_batch_size=BATCH, shuffle_seed=3, seq_len=256)
    config.retrieval.update(ids_path=str(setup["ids"].directory), mode=mode, layout="paper")
    config.memory.update(per_chunk=SLOTS, chunk_size=CHUNK, ref_len=REF_LEN)
    return config


def warmup_differences(config, setup, num_batches):
    """Where the first `num_batches` batches of the config's memory loader differ from the warm-up task's (LmTask:
    the stage-1 iterator of the same data and seed): every field the warm-up batch has, every row; positions shifted
    past the sink and the memory span."""
    shift = {"positions": len(setup["sink"]) + config.memory.ref_len}
    warmup = LmTask(config).train_iterator(0, 1)
    memory = memory_iterator(config, "train", setup["bank"], len(setup["sink"]))
    out = []
    for step in range(num_batches):
        want, got = next(warmup), next(memory)
        for name, value in want.items():
            if name not in got or got[name].shape != value.shape:
                out.append(f"batch {step}: {name} missing or of another shape")
            elif (rows := np.flatnonzero((got[name] != value + shift.get(name, 0)).any(-1))).size:
                out.append(f"batch {step}: {name} differs in rows {rows.tolist()}")
    return out


def test_loader_batches_are_the_warmup_batches(setup, memory_kb, monkeypatch):
    """The config's memory loader yields the warm-up task's batches of the same config, every field of every row,
    into the second (reshuffled) epoch: the stage-1 order, inputs, targets, loss weights, segments and positions.
    The comparison catches a loader that shuffles with another seed or drops loss_weights."""
    config = loader_config(setup, memory_kb)
    epoch = setup["ids"].num_records // BATCH
    assert not (diffs := warmup_differences(config, setup, epoch + 2)), diffs[:10]

    global_records, add_slots = memory_pipeline.global_records, memory_pipeline._add_slots
    monkeypatch.setattr(memory_pipeline, "global_records", lambda data, split, batch, seed, *args, **kw:
                        global_records(data, split, batch, seed + 1, *args, **kw))
    assert any("inputs differs" in d for d in warmup_differences(config, setup, 1))
    monkeypatch.undo()
    monkeypatch.setattr(memory_pipeline, "_add_slots", lambda record, **kw:
                        {k: v for k, v in add_slots(record, **kw).items() if k != "loss_weights"})
    assert warmup_differences(config, setup, 1) == ["batch 0: loss_weights missing or of another shape"]


def test_deterministic_and_exact_resume(setup):
    first = take(iterator(setup), 5)
    for a, b in zip(first, take(iterator(setup), 5), strict=True):
        assert_batches_equal(a, b)
    it = iterator(setup)
    take(it, 2)
    state = it.get_state()
    resumed = iterator(setup)
    resumed.set_state(state)
    for a, b in zip(first[2:], take(resumed, 3), strict=True):
        assert_batches_equal(a, b)
    other = take(iterator(setup, seed=4), 1)[0]
    assert not np.array_equal(other["record"], first[0]["record"])


def test_processes_read_their_rows_of_the_global_batch(setup):
    whole = take(iterator(setup), 2)
    halves = [take(iterator(setup, process_index=i, process_count=2), 2) for i in range(2)]
    for s in range(2):
        for k in whole[s]:
            np.testing.assert_array_equal(np.concatenate([halves[0][s][k], halves[1][s][k]]), whole[s][k])


def test_online_batches_hold_the_reference_tokens(setup):
    refs = setup["refs"]
    for bank_batch, batch in zip(take(iterator(setup), 2), take(iterator(setup, "online", refs), 2), strict=True):
        np.testing.assert_array_equal(batch["memory_ids"], bank_batch["memory_ids"])
        np.testing.assert_array_equal(batch["memory_index"], bank_batch["memory_index"])
        for row, m in itertools.product(range(BATCH), range(batch["memory_ids"].shape[1])):
            r = batch["memory_ids"][row, m]
            toks = batch["memory_tokens"][row, m]
            if r < 0:
                assert batch["memory_lengths"][row, m] == 0 and np.all(toks == -1)
            else:
                n = batch["memory_lengths"][row, m]
                start = refs.starts[r]
                assert toks[:n].tolist() == refs.tokens[start:start + n].tolist() and np.all(toks[n:] == -1)


def test_device_memory_feeds_the_model(setup, memory_kb):
    from m3jax.model import params as params_lib
    from m3jax.model.config import ModelConfig
    from m3jax.model.memory import Memory
    from m3jax.model.params import init_params

    bank, config = setup["bank"], memory_kb["config"]
    batch = take(iterator(setup), 1)[0]
    memory = device_memory(batch, bank.metadata["codec"], setup["sink"], jnp.float32)
    kv, _ = bank.gather(batch["memory_ids"], jnp.float32)  # [b, M, Lm, 2, mkv, k, d]
    np.testing.assert_array_equal(memory.keys, jnp.moveaxis(kv[:, :, :, 0], 2, 0))
    np.testing.assert_array_equal(memory.values, jnp.moveaxis(kv[:, :, :, 1], 2, 0))

    cfg = ModelConfig.from_config(config.model, config.memory)
    params = init_params(cfg, seed=0)

    def logits(mem):
        return params_lib.model_from(cfg, params)(batch["inputs"], batch["positions"], batch["segment_ids"],
                                                 batch["memory_group"], mem)

    with_memory = jax.jit(logits)(memory)
    empty = Memory.empty(setup["sink"], batch=BATCH, groups=batch["memory_index"].shape[1], slots=SLOTS,
                         memory_layers=len(cfg.memory_layers), kv_heads=len(cfg.memory_kv_heads), k=config.memory.k,
                         head_dim=cfg.head_dim)
    without = jax.jit(logits)(empty)
    assert np.isfinite(np.asarray(with_memory)).all()
    assert not np.allclose(with_memory, without, atol=1e-4)  # the memories are read


def test_the_config_sets_up_the_same_loader(setup, memory_kb):
    """memory_iterator reads the data, ids path, mode, layout and memory geometry from a run's config."""
    config = loader_config(setup, memory_kb, mode="online")
    got = take(memory_iterator(config, "train", setup["refs"], len(setup["sink"])), 2)
    want = take(iterator(setup, "online", setup["refs"]), 2)
    for a, b in zip(got, want, strict=True):
        assert_batches_equal(a, b)
    config.retrieval.ids_path = ""  # default: DATA/retrieval-train, which this data directory does not hold
    with pytest.raises(FileNotFoundError, match="retrieval-train"):
        memory_iterator(config, "train", setup["refs"], len(setup["sink"]))


def test_ids_of_other_references_are_refused(setup, tmp_path):
    """Retrieved ids record the references they index into; a bank or knowledge base of other references (as many
    of them) is refused in both modes."""
    other = synthetic_ids(tmp_path / "other", setup["data"], "train", setup["bank"].num_refs, "f" * 64)
    for mode, source in (("bank", setup["bank"]), ("online", setup["refs"])):
        with pytest.raises(ValueError, match="index the references of another knowledge base"):
            make_memory_iterator(setup["data"], "train", other, source, mode=mode, layout="paper", slots=SLOTS,
                                 chunk_size=CHUNK, sink_len=3, ref_len=REF_LEN, global_batch_size=BATCH, seed=0)


def test_mismatches_are_named(setup, memory_kb):
    with pytest.raises(ValueError, match="chunks of 64 tokens"):
        iterator(setup, chunk_size=32)
    with pytest.raises(ValueError, match="mode must be one of"):
        iterator(setup, mode="cache")
    with pytest.raises(TypeError, match="online mode reads References"):
        iterator(setup, "online", setup["bank"])
    assert read_metadata(setup["data"])["splits"]["heldout"]["num_records"] > 0  # the fixture's ids hold 2 docs out
    with pytest.raises(ValueError, match="cover"):
        make_memory_iterator(setup["data"], "heldout", setup["ids"], setup["bank"], mode="bank", layout="paper",
                             slots=SLOTS, chunk_size=CHUNK, sink_len=3, ref_len=REF_LEN, global_batch_size=2, seed=0)


def test_shuffled_memory_control_reads_a_fixed_random_reference_per_retrieved_one(setup):
    """memory.shuffle_references: each retrieved id r becomes π(r) for one seeded permutation π of the bank's
    references (a permutation: distinct ids stay distinct, so slots and counts are the retrieved layout's); the
    records, their order and the slot structure are unchanged, and the codes are those of π(r)."""
    n = setup["bank"].num_refs
    pi = memory_pipeline.shuffled_references(n, 3)
    assert sorted(pi.tolist()) == list(range(n)) and (pi != np.arange(n)).mean() > 0.9
    np.testing.assert_array_equal(pi, memory_pipeline.shuffled_references(n, 3))  # fixed by the seed
    assert not np.array_equal(pi, memory_pipeline.shuffled_references(n, 4))
    for plain, control in zip(take(iterator(setup), 2), take(iterator(setup, shuffle_references=True), 2),
                              strict=True):
        for name in ("record", "inputs", "targets", "positions", "memory_group"):
            np.testing.assert_array_equal(plain[name], control[name], err_msg=name)
        for row in range(BATCH):  # each group reads π of what it reads without the control, nothing else
            for g, (a, b) in enumerate(zip(plain["memory_index"][row], control["memory_index"][row], strict=True)):
                reads = {int(pi[plain["memory_ids"][row][s]]) for s in a if s >= 0}
                assert {int(control["memory_ids"][row][s]) for s in b if s >= 0} == reads, (row, g)
                assert (b >= 0).sum() == (a >= 0).sum()
        codes, _ = setup["bank"].gather_codes(control["memory_ids"])
        np.testing.assert_array_equal(control[CODES_PREFIX + "memory"].view(np.uint16),
                                      codes["memory"].view(np.uint16))
