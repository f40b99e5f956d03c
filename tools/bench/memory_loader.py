"""Memory-augmented loader throughput vs the train step's consumption, and the paper-scale bytes per step.

    python tools/bench/memory_loader.py [--seq=2048 --batch=8 --records=512 --batches=20 --prefetch=2 --step]

One run, side by side, on synthetic data of the ~100M bench config's shape (train_step_mfu.py: 8 layers x 1024,
16 KV heads of 64; memory on the first 4 layers, all 16 KV heads, k = 8): packed records of `--seq` tokens
(random documents of 100-3000 tokens), their 128-token references with a bf16 bank of random memories for them,
and random retrieved ids in the paper layout (one reference per 64-token chunk, -1 for a tenth of them). Timed:
batches per second after the first (warm-up) batch, each loader with `--prefetch` read threads:
- lm:     the stage-1 iterator (records only), the baseline;
- online: + the slots and the reference tokens of each record's unique memories;
- bank:   + the bank's codes of each record's unique memories (bank LRU off: every batch reads from files).
`--step` also times the ~100M plain train step at the same batch on this machine (compile excluded), so the
ratio loader batches/s ÷ step/s says how many times over the loader keeps up with the step.

Then, computed from memory3_2b's shapes: the bytes a 4M-token step (2,048 sequences of 2,048) moves per host for
its memories in bank mode (unique memories per sequence as in the synthetic layout) and in online mode, for a
few host counts, and the time a host needs for them at the bank read rate this run measured.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import memory3_2b
from m3jax.data import records
from m3jax.data.packing import LM_FIELDS, pack_documents
from m3jax.data.pipeline import make_lm_iterator
from m3jax.memory import layout
from m3jax.memory.bank import MemoryBank, architecture, bytes_per_reference
from m3jax.memory.knowledge import cut_references
from m3jax.memory_pipeline import make_memory_iterator
from m3jax.model.config import ModelConfig
from m3jax.parallel import make_mesh
from m3jax.retrieval.retrieve import RetrievedIds

_SEQ = flags.DEFINE_integer("seq", 2048, "tokens per record")
_BATCH = flags.DEFINE_integer("batch", 8, "records per batch")
_RECORDS = flags.DEFINE_integer("records", 512, "records in the synthetic split")
_BATCHES = flags.DEFINE_integer("batches", 20, "timed batches per loader (after one warm-up batch)")
_PREFETCH = flags.DEFINE_integer("prefetch", 2, "read threads / batches ahead of each loader")
_STEP = flags.DEFINE_bool("step", True, "also time the ~100M train step at this batch")
_DIR = flags.DEFINE_string("dir", "", "where to write the synthetic data and bank (default: a temp dir)")

CHUNK, SLOTS, K, REF_LEN, SINK = 64, 5, 8, 128, 4
TOKENS_PER_STEP, PAPER_SEQ = 4 * 1024 * 1024, 2048


def bench_model_config(memory: bool) -> ModelConfig:
    kw = dict(vocab_size=32000, num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=16, head_dim=64,
              mlp_dim=2816, dtype="float32")
    if memory:
        kw.update(memory_layers=(0, 1, 2, 3), memory_kv_heads=tuple(range(16)), memory_chunk_size=CHUNK,
                  memory_k=K, memory_ref_len=REF_LEN)
    return ModelConfig(**kw)


def write_data(root: str, rng) -> tuple[str, list]:
    """Packed records of random documents, and the documents' tokens (the knowledge base of online mode)."""
    docs, total = [], 0
    while total < _RECORDS.value * _SEQ.value:
        docs.append(rng.integers(3, 32000, int(rng.integers(100, 3000))).tolist())
        total += len(docs[-1]) + 2
    data = os.path.join(root, "data")
    n = records.write_split(pack_documents(docs, _SEQ.value, 1, 2), data, "train", 4)
    records.write_metadata(data, {
        "format_version": records.FORMAT_VERSION,
        "fields": records.field_specs({name: (_SEQ.value,) for name in LM_FIELDS}),
        "seq_len": _SEQ.value, "vocab_size": 32000, "bos_id": 1, "eos_id": 2, "pad_id": 0,
        "tokenizer_path": "synthetic", "tokenizer_sha256": "synthetic",
        "splits": {"train": {"num_records": n, "shards": records.shard_names("train", 4)}}})
    return data, docs


def write_bank(root: str, arch: dict, num_refs: int, rng) -> MemoryBank:
    shard = 64
    bank = MemoryBank.create(os.path.join(root, "bank"), num_refs=num_refs, architecture=arch, codec="bf16",
                             refs_per_shard=shard, tokenizer_sha256="synthetic",
                             checkpoint={"run_id": "synthetic", "step": 0}, sink_tokens=list(range(SINK)))
    kv = rng.normal(size=(shard, *bank.row_shape)).astype(jnp.bfloat16)
    layers, _, heads, k, _ = bank.row_shape
    positions = np.broadcast_to(SINK + np.arange(k, dtype=np.int32), (shard, layers, heads, k))
    tokens = np.zeros((shard, REF_LEN), np.int32)
    for start in range(0, num_refs, shard):
        n = min(shard, num_refs - start)
        bank.write(start, kv[:n], positions[:n], tokens[:n])
    return MemoryBank.open(bank.path, expect_architecture=arch, expect_tokenizer="synthetic", cache_rows=0)


def write_ids(root: str, data: str, num_refs: int, rng) -> RetrievedIds:
    n = records.read_metadata(data)["splits"]["train"]["num_records"]
    groups = layout.max_groups(_SEQ.value, CHUNK)
    store = RetrievedIds.create(os.path.join(root, "ids"), {
        "num_records": n, "block_records": 256, "num_groups": groups, "refs_per_chunk": 1, "chunk_size": CHUNK,
        "num_refs": num_refs})
    for i in range(store.num_blocks):
        a, b = store.block_range(i)
        ids = rng.integers(0, num_refs, (b - a, groups, 1))
        store.write_block(i, np.where(rng.random(ids.shape) < 0.1, -1, ids))
    return store


def read_bytes(arch: dict) -> int:
    """Bytes a bank-mode loader reads per memory: the bf16 codes and the kept tokens' positions."""
    sizes = bytes_per_reference("bf16", arch)
    return sizes["memory"] + sizes["positions"]


def rate(it, batches: int) -> tuple[float, dict]:
    batch = next(it)  # warm-up: threads started, files opened
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    return batches / (time.perf_counter() - t0), batch


def step_rate(batch: dict) -> float:
    from m3jax.config import base_config
    from m3jax.train.step import Trainer

    c = base_config()
    c.model.update(vocab_size=32000, num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=16, head_dim=64,
                   mlp_dim=2816, dtype="float32")
    c.data.seq_len, c.data.global_batch_size = _SEQ.value, _BATCH.value
    c.mesh.update(data=1, fsdp=1, tensor=1)
    trainer = Trainer(c, make_mesh(c.mesh, jax.devices()[:1]))
    state = trainer.init_state()
    lm = {k: batch[k] for k in LM_FIELDS}
    state, _ = trainer.train_step(state, trainer.global_batch(lm))  # compile
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(2):
        state, metrics = trainer.train_step(state, trainer.global_batch(lm))
    jax.block_until_ready(metrics)
    return 2 / (time.perf_counter() - t0)


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    root = _DIR.value or tempfile.mkdtemp(prefix="memory_loader_")
    arch = architecture(bench_model_config(memory=True))
    data, docs = write_data(root, rng)
    refs = cut_references([(str(i), d) for i, d in enumerate(docs)], REF_LEN)
    bank = write_bank(root, arch, len(refs), rng)
    ids = write_ids(root, data, len(refs), rng)
    print(f"device: {jax.devices()[0].device_kind}; records of {_SEQ.value} tokens, batch {_BATCH.value}, "
          f"{len(refs):,} memories of {read_bytes(arch):,} bytes read each (bf16 + positions, "
          f"~100M bench shape), prefetch {_PREFETCH.value}, under {root}")

    common = dict(global_batch_size=_BATCH.value, seed=0, prefetch=_PREFETCH.value)
    memory = dict(layout="paper", slots=SLOTS, chunk_size=CHUNK, sink_len=SINK, ref_len=REF_LEN, **common)
    results = {"lm": rate(make_lm_iterator(data, "train", **common), _BATCHES.value)}
    results["online"] = rate(make_memory_iterator(data, "train", ids, refs, mode="online", **memory),
                             _BATCHES.value)
    results["bank"] = rate(make_memory_iterator(data, "train", ids, bank, mode="bank", **memory), _BATCHES.value)

    step = step_rate(results["lm"][1]) if _STEP.value else None
    print(f"\n{'loader':<8} {'batches/s':>10} {'MB/batch':>9} {'x lm':>6}" + (f" {'x step':>8}" if step else ""))
    for name, (r, batch) in results.items():
        mb = sum(np.asarray(v).nbytes for v in batch.values()) / 1e6
        line = f"{name:<8} {r:>10.2f} {mb:>9.2f} {r / results['lm'][0]:>6.2f}"
        print(line + (f" {r / step:>8.1f}" if step else ""))
    if step:
        print(f"train step (~100M, batch {_BATCH.value} x {_SEQ.value}, float32): {step:.3f} steps/s")
    bank_batch = results["bank"][1]
    unique = float(np.mean((bank_batch["memory_ids"] >= 0).sum(1)))
    bank_bytes_s = results["bank"][0] * _BATCH.value * unique * read_bytes(arch)

    c = memory3_2b.get_config()
    c.memory.heads = True  # its memory geometry (config.memory), whatever the stage
    arch2b = architecture(ModelConfig.from_config(c.model, c.memory))
    per_memory = read_bytes(arch2b)
    seqs = TOKENS_PER_STEP // PAPER_SEQ
    per_seq = unique * PAPER_SEQ / _SEQ.value  # unique memories per 2048-token sequence in this layout
    print(f"\nmemory3_2b, {TOKENS_PER_STEP:,}-token steps ({seqs:,} sequences of {PAPER_SEQ}), "
          f"{per_seq:.1f} unique memories per sequence (paper layout, as above), {per_memory:,} bytes read per memory:")
    print(f"{'hosts':>6} {'bank GB/host/step':>18} {'online MB/host/step':>20} {'bank read s/step at this rate':>30}")
    for hosts in (8, 16, 32, 64):
        bank_b = seqs * per_seq * per_memory / hosts
        online_b = seqs * per_seq * (REF_LEN + 1) * 4 / hosts
        print(f"{hosts:>6} {bank_b / 1e9:>18.2f} {online_b / 1e6:>20.2f} {bank_b / bank_bytes_s:>30.2f}")
    print(f"(bank read rate measured here: {bank_bytes_s / 1e6:,.0f} MB/s of memories)")


if __name__ == "__main__":
    app.run(main)
