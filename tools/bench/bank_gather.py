"""Gather latency of the memory bank, cold vs cached, with checksums verified vs not, and bytes per memory per codec,
measured in one run.

    python tools/bench/bank_gather.py [--refs=4096 --batch=8 --chunks=32 --slots=5 --repeats=5 --dir=DIR]

A local bank of memory3_2b-shaped memories ([22, 2, 8, 8, 80]: 450,560 bytes in bf16) is written per codec,
then a training batch's memories are gathered in the paper's layout: each of `chunks` chunks of each of `batch`
sequences retrieves one reference and reads it and the previous `slots` − 1 chunks' references, so the slot
ids [batch, chunks, slots] repeat every reference up to 5 times (−1 where a chunk has fewer predecessors).
Two forms of the same batch are gathered: `slots`, the slot ids themselves (returns every repeat: 5x the
bytes), and `unique`, each sequence's own retrievals [batch, chunks] (what the training pipeline moves, with a
[batch, chunks, slots] index into them; see docs/memory.md). Both read the same rows. Every repetition draws a new
batch. Timed, best of `--repeats`:
- cold: a fresh bank object (empty LRU) after the bank's files were dropped from the page cache
  (posix_fadvise DONTNEED, checked with fincore; a VM's host may still cache the disk);
- warm: a fresh bank object (empty LRU), files in the page cache;
- cached: the same ids again on the same object: every row an LRU hit (this and the next two: 5 tries per
  repetition);
- memcpy: copying the gathered stored bytes once in numpy (the floor a RAM-resident gather cannot beat);
- decode: `gather` of the cached batch: the LRU gather, host → device transfer, decoding (jnp) on the default
  device.
Verification. Each codec's bank is written twice, as every bank is (every chunk with its crc32c, which TensorStore
checks as it decodes a read) and without checksums (`MemoryBank.create(checksums=False)`, which exists for this
comparison), and every repetition gathers the same batch from both, alternating; the ratio checked / unchecked is
printed per form and kind. Cached gathers read no stored bytes (the LRU holds verified rows), so their ratio is
the noise floor. `verify` (what a resuming writer runs on its written rows) is timed over the whole bank, warm.
Ratios are printed beside the times: the machine is shared and noisy, ratios in one run are what to compare.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from configs import memory3_2b
from m3jax.memory.bank import MemoryBank, architecture, bytes_per_reference
from m3jax.memory.codecs import CODECS
from m3jax.model.config import ModelConfig

_REFS = flags.DEFINE_integer("refs", 4096, "references in the bank")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences per batch")
_CHUNKS = flags.DEFINE_integer("chunks", 32, "chunks per sequence")
_SLOTS = flags.DEFINE_integer("slots", 5, "memories each chunk reads (its own + the previous slots - 1 chunks')")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed repetitions (best is reported), each a new batch")
_REFS_PER_SHARD = flags.DEFINE_integer("refs_per_shard", 64, "references per shard file")
_CODECS = flags.DEFINE_list("codecs", list(CODECS), "codecs to compare")
_DIR = flags.DEFINE_string("dir", None, "where to write the banks (default: a temporary directory, removed after)")


def paper_layout(rng, refs: int, batch: int, chunks: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Slot ids [batch, chunks, slots] (chunk g reads the references of chunks g, g-1, ..., -1 = none) and the
    unique ids [batch, chunks] (each chunk's own retrieval)."""
    own = np.stack([rng.choice(refs, chunks, replace=False) for _ in range(batch)])
    back = np.arange(chunks)[:, None] - np.arange(slots)[None]
    slot_ids = np.where(back >= 0, own[:, np.clip(back, 0, None)], -1)
    return slot_ids, own


def drop_page_cache(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


FORMS = ("slots", "unique")
KINDS = ("cold", "warm", "cached", "memcpy", "decode")
VARIANTS = ("checked", "unchecked")  # chunks with their crc32c (every bank), and without (the comparison)
_INNER = 5  # tries of cached, memcpy and decode per repetition


def write_bank(path: str, codec: str, arch: dict, rng, checksums: bool) -> tuple[MemoryBank, float]:
    refs, shard = _REFS.value, _REFS_PER_SHARD.value
    meta = {"tokenizer_sha256": "bench", "checkpoint": {"run_id": "bench", "step": 0}, "sink_tokens": [1]}
    bank = MemoryBank.create(path, num_refs=refs, architecture=arch, codec=codec, refs_per_shard=shard,
                             checksums=checksums, **meta)
    kv = rng.normal(size=(shard, *bank.row_shape)).astype(jnp.bfloat16)  # one shard's worth, written everywhere
    layers, _, heads, k, _ = bank.row_shape
    positions = np.broadcast_to(np.arange(k, dtype=np.int32), (shard, layers, heads, k))
    tokens = np.zeros((shard, arch["ref_len"]), np.int32)
    t0 = time.perf_counter()
    for start in range(0, refs, shard):
        n = min(shard, refs - start)
        bank.write(start, kv[:n], positions[:n], tokens[:n])
    return bank, time.perf_counter() - t0


def bench_codec(codec: str, root: str, arch: dict, rng) -> dict:
    refs = _REFS.value
    paths = {v: os.path.join(root, f"{codec}-{v}") for v in VARIANTS}
    written = {v: write_bank(paths[v], codec, arch, rng, checksums=v == "checked") for v in VARIANTS}
    bank = written["checked"][0]

    def fresh(v):
        return MemoryBank.open(paths[v], expect_architecture=arch, expect_tokenizer="bench", cache_rows=refs)

    times = {v: {form: {kind: [] for kind in KINDS} for form in FORMS} for v in VARIANTS}
    stats = {}
    for r in range(_REPEATS.value):
        slot_ids, own = paper_layout(rng, refs, _BATCH.value, _CHUNKS.value, _SLOTS.value)
        for form, ids in zip(FORMS, (slot_ids, own), strict=True):
            order = VARIANTS if r % 2 else VARIANTS[::-1]  # alternate which goes first
            live = {}
            for v in order:
                t = times[v][form]
                drop_page_cache(paths[v])
                t["cold"].append(timed(lambda v=v, ids=ids: fresh(v).gather_codes(ids)))
                live[v] = b = fresh(v)
                t["warm"].append(timed(lambda b=b, ids=ids: b.gather_codes(ids)))
                b.gather(ids)  # compiles the decode for this shape
            for _ in range(_INNER):  # the in-RAM kinds are short: more tries, the two banks in turn, against noise
                for v in order:
                    t, b = times[v][form], live[v]
                    codes, positions_out = b.gather_codes(ids)
                    t["cached"].append(timed(lambda b=b, ids=ids: b.gather_codes(ids)))
                    t["memcpy"].append(timed(lambda c=codes, p=positions_out: [x.copy() for x in (*c.values(), p)]))
                    t["decode"].append(timed(lambda b=b, ids=ids: b.gather(ids)[0]))
            b = live["checked"]
            stats[form] = {"rows_out": int(ids.size), "rows_read": int(np.unique(ids[ids >= 0]).size),
                           "bytes_out": sum(x.nbytes for x in (*codes.values(), positions_out)),
                           "cache": b.cache_info()}
    verify_s = {}
    for v in VARIANTS:
        b = fresh(v)
        b.verify()  # the files into the page cache
        verify_s[v] = min(timed(b.verify) for _ in range(2))
    bytes_per_ref = sum(bytes_per_reference(codec, arch).values())
    return {"bytes_per_memory": bank.codec.bytes_per_memory(bank.row_shape),
            "write_refs_per_s": {v: refs / w[1] for v, w in written.items()},
            "verify": {"refs_per_s": refs / verify_s["checked"], "mb_per_s": refs * bytes_per_ref / verify_s["checked"]
                       / 1e6, "ratio": verify_s["checked"] / verify_s["unchecked"]},
            "forms": {form: {**stats[form], "best_s": {k: min(x) for k, x in times["checked"][form].items()},
                             "unchecked_s": {k: min(x) for k, x in times["unchecked"][form].items()},
                             "median_ratio": {k: np.median(x) / np.median(times["unchecked"][form][k])
                                              for k, x in times["checked"][form].items()}}
                      for form in FORMS}}


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # every open of the unchecked banks warns that they have no checksums
    c = memory3_2b.get_config()
    c.memory.heads = True  # its memory geometry (config.memory), whatever the stage
    arch = architecture(ModelConfig.from_config(c.model, c.memory))
    root = _DIR.value or tempfile.mkdtemp(prefix="bank_gather_")
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind}; bank: {_REFS.value} refs of memory3_2b shape, "
          f"{_REFS_PER_SHARD.value} refs per shard, under {root}")
    print(f"batch: {_BATCH.value} x {_CHUNKS.value} chunks x {_SLOTS.value} slots (paper layout); "
          f"best of {_REPEATS.value}")
    results = {}
    try:
        for codec in _CODECS.value:
            results[codec] = r = bench_codec(codec, os.path.join(root, "banks"), arch, rng)
            w = r["write_refs_per_s"]
            print(f"\n{codec}: {r['bytes_per_memory']:,} bytes/memory; write {w['checked']:,.0f} refs/s "
                  f"({w['checked'] / w['unchecked']:.2f}x the rate without checksums)")
            print(f"  {'form':<7} {'rows read':>9} {'rows out':>8} {'MB out':>7} "
                  + " ".join(f"{kind + ' ms':>10}" for kind in KINDS) + "   cold/cached warm/cached cached/memcpy")
            for form, f in r["forms"].items():
                t = {kind: v * 1e3 for kind, v in f["best_s"].items()}
                print(f"  {form:<7} {f['rows_read']:>9} {f['rows_out']:>8} {f['bytes_out'] / 1e6:>7.1f} "
                      + " ".join(f"{t[kind]:>10.1f}" for kind in KINDS)
                      + f"   {t['cold'] / t['cached']:>10.1f}x {t['warm'] / t['cached']:>11.1f}x "
                        f"{t['cached'] / t['memcpy']:>12.1f}x")
            print(f"  LRU after the last cached gather: {r['forms']['unique']['cache']}")
            print("  checksums verified / not (same batches), time ratio of the best (of the medians):")
            for form, f in r["forms"].items():
                print(f"  {form:<7} " + " ".join(f"{kind} {f['best_s'][kind] / f['unchecked_s'][kind]:.2f}x "
                                                 f"({f['median_ratio'][kind]:.2f}x)"
                                                 for kind in ("cold", "warm", "cached", "decode")))
            v = r["verify"]
            print(f"  verify (the whole bank, warm): {v['refs_per_s']:,.0f} refs/s, {v['mb_per_s']:,.0f} MB/s; "
                  f"{v['ratio']:.2f}x the time of reading it without checksums")
    finally:
        if _DIR.value is None:
            shutil.rmtree(root, ignore_errors=True)
    if {"bf16", "int8"} <= set(results):
        bf, i8 = results["bf16"]["forms"]["unique"]["best_s"], results["int8"]["forms"]["unique"]["best_s"]
        ratio = results["bf16"]["bytes_per_memory"] / results["int8"]["bytes_per_memory"]
        print(f"\nint8 vs bf16: {ratio:.2f}x fewer bytes per memory; unique-form gathers "
              + ", ".join(f"{kind} {bf[kind] / i8[kind]:.2f}x" for kind in ("cold", "warm", "cached", "decode"))
              + " faster")


if __name__ == "__main__":
    app.run(main)
