"""The memory bank (TensorStore), its codecs, and the budget tool."""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from configs import memory3_2b
from m3jax.memory import codecs
from m3jax.memory.bank import (
    BankMismatchError,
    MemoryBank,
    architecture,
    architecture_hash,
    bytes_per_reference,
    tokenizer_hash,
)
from m3jax.model.config import ModelConfig
from m3jax.train.flops import write_flops_per_reference

K, REF_LEN = 4, 16
CFG = ModelConfig(vocab_size=300, num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
                  memory_layers=(0, 1), memory_kv_heads=(0, 1), memory_k=K, memory_ref_len=REF_LEN)
ARCH = architecture(CFG)
ROW = (2, 2, 2, K, 16)  # [mem_layers, 2, kv_heads, k, head_dim]
CKPT = {"run_id": "warmup", "step": 1000}


def make_bank(path, num_refs=12, codec="bf16", **kw):
    kw = {"tokenizer_sha256": "tok", "checkpoint": CKPT, "sink_tokens": [1, 7, 9], "refs_per_shard": 4, **kw}
    return MemoryBank.create(path, num_refs=num_refs, architecture=ARCH, codec=codec, **kw)


def random_rows(rng, n):
    """Key/values spanning many magnitudes (bf16-exact), positions in [3, 3 + REF_LEN) with -1 padding, tokens."""
    kv = (rng.normal(size=(n, *ROW)) * 10.0 ** rng.integers(-3, 4, size=(n, *ROW[:-1], 1))).astype(jnp.bfloat16)
    positions = rng.integers(3, 3 + REF_LEN, size=(n, 2, 2, K)).astype(np.int32)
    positions[0, :, :, -1] = -1
    tokens = rng.integers(0, 300, size=(n, REF_LEN - 3))
    return kv, positions, tokens


def open_bank(path, **kw):
    return MemoryBank.open(path, expect_architecture=ARCH, expect_tokenizer="tok", **kw)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_round_trip_bf16_bit_exact(tmp_path, where):
    path = str(tmp_path / "bank") if where == "local" else f"memory://{tmp_path.name}/bank"
    rng = np.random.default_rng(0)
    kv, positions, tokens = random_rows(rng, 10)
    bank = make_bank(path, num_refs=10)
    bank.write(0, kv[:4], positions[:4], tokens[:4])  # one whole shard, then a partial one and the short last one
    bank.write(4, kv[4:], positions[4:], tokens[4:])
    reread = open_bank(path, expect_checkpoint=CKPT, expect_sink_tokens=[1, 7, 9])
    order = rng.permutation(10)
    got, got_positions = reread.gather(order)
    assert got.dtype == jnp.bfloat16 and got.shape == (10, *ROW)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), kv[order].view(np.uint16))
    np.testing.assert_array_equal(got_positions, positions[order])
    np.testing.assert_array_equal(reread.read_tokens(order)[:, :REF_LEN - 3], tokens[order])
    assert (reread.read_tokens(order)[:, REF_LEN - 3:] == -1).all()
    assert reread.metadata["architecture_hash"] == architecture_hash(CFG)
    assert reread.metadata["checkpoint"] == CKPT and reread.metadata["codec"] == "bf16"
    if where == "local":  # sizes are what bytes_per_reference predicts (+ JSON metadata and 4-byte shard CRCs)
        disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        predicted = 10 * sum(bytes_per_reference("bf16", ARCH).values())
        assert predicted <= disk <= predicted + 8192, (disk, predicted)


def test_int8_error_bound_and_device_decode():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, *ROW)).astype(np.float32) * 10.0 ** rng.integers(-4, 5, size=(64, *ROW[:-1], 1))
    x[0, 0, 0, 0, 0] = 0.0  # an all-zero vector
    x[1, 0, 0, 0, 0, 3] = 1e4  # one outlier dominating its vector
    codec = codecs.get_codec("int8")
    codes = codec.encode(x)
    q, s = codes["memory"], codes["scale"]
    assert q.dtype == np.int8 and s.dtype == jnp.bfloat16 and s.shape == x.shape[:-1]
    assert np.abs(q.astype(np.int32)).max() <= 127
    numpy_dequant = q.astype(np.float32) * s.astype(np.float32)[..., None]
    absmax = np.abs(x).max(-1, keepdims=True).astype(np.float64)
    bound = absmax / 254 * (1 + 2.0**-8) * (1 + 2.0**-15)  # derived in m3jax/memory/codecs.py
    err = np.abs(x.astype(np.float64) - numpy_dequant)
    assert (err <= bound).all()
    assert (err[absmax[..., 0] > 0].max(-1) / absmax[absmax[..., 0] > 0]).max() > 0.95 / 254  # the bound is tight
    np.testing.assert_array_equal(numpy_dequant[0, 0, 0, 0, 0], 0.0)
    on_device = jax.jit(lambda c: codec.decode(c, jnp.float32))(jax.device_put(codes))
    np.testing.assert_array_equal(np.asarray(on_device), numpy_dequant)
    device_codes = codec.encode(jnp.asarray(x))  # encoding on device gives the same codes
    for name in codes:
        np.testing.assert_array_equal(np.asarray(device_codes[name]), codes[name])
    assert codec.bytes_per_memory(ROW) == 32 * 16 + 32 * 2  # 32 vectors: a code per element, a bf16 scale each
    with pytest.raises(ValueError, match="unknown memory codec 'pq'.*bf16, int8"):
        codecs.get_codec("pq")


def test_int8_bank_decodes_on_device(tmp_path):
    rng = np.random.default_rng(2)
    kv, positions, tokens = random_rows(rng, 6)
    bank = make_bank(f"memory://{tmp_path.name}/int8", num_refs=6, codec="int8", cache_rows=4)
    bank.write(0, kv, positions, tokens)
    codes = codecs.get_codec("int8").encode(kv)
    expect = codes["memory"].astype(np.float32) * codes["scale"].astype(np.float32)[..., None]
    got, got_positions = bank.gather(np.array([5, 0, -1, 5]), dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got)[[0, 1, 3]], expect[[5, 0, 5]])
    np.testing.assert_array_equal(np.asarray(got[2]), 0.0)
    np.testing.assert_array_equal(got_positions[[0, 1]], positions[[5, 0]])
    stored, _ = bank.gather_codes(np.array([5]))
    assert stored["memory"].dtype == np.int8 and set(stored) == {"memory", "scale"}


def test_mismatches_refused(tmp_path, caplog):
    path = str(tmp_path / "bank")
    make_bank(path)
    other = architecture(ModelConfig(**{**CFG.__dict__, "num_layers": 6}))
    named = re.escape(str(tmp_path / "bank")) + r".*architecture.num_layers: bank 4, expected 6"
    with pytest.raises(BankMismatchError, match=named):  # the bank, the field, both values
        MemoryBank.open(path, expect_architecture=other, expect_tokenizer="tok")
    with pytest.raises(BankMismatchError, match=r"architecture.k: bank 4, expected 8"):
        MemoryBank.open(path, expect_architecture=architecture(ModelConfig(**{**CFG.__dict__, "memory_k": 8})),
                        expect_tokenizer="tok")
    with pytest.raises(BankMismatchError, match=r"tokenizer_sha256: bank 'tok', expected 'other'.*another tokenizer"):
        MemoryBank.open(path, expect_architecture=ARCH, expect_tokenizer="other")
    with pytest.raises(BankMismatchError, match=r"sink_tokens: bank \[1, 7, 9\], expected \[1, 7\]"):
        open_bank(path, expect_sink_tokens=[1, 7])
    later = {"run_id": "warmup", "step": 1500}
    with pytest.raises(BankMismatchError, match=r"checkpoint: bank \{'run_id': 'warmup', 'step': 1000\}, expected "
                                                r"\{'run_id': 'warmup', 'step': 1500\}.*allow_other_checkpoint"):
        open_bank(path, expect_checkpoint=later)
    with caplog.at_level(logging.WARNING):
        open_bank(path, expect_checkpoint=later, allow_other_checkpoint=True)
    assert "500 steps older" in caplog.text
    with pytest.raises(ValueError, match="no memory heads"):
        architecture(ModelConfig(**{**CFG.__dict__, "memory_layers": (), "memory_kv_heads": ()}))


def test_create_resume_and_process_ranges(tmp_path):
    path = str(tmp_path / "bank")
    bank = make_bank(path, num_refs=14)
    with pytest.raises(FileExistsError, match="exist_ok=True resumes"):
        make_bank(path, num_refs=14)
    with pytest.raises(BankMismatchError, match="num_refs: bank 14, requested 16"):
        make_bank(path, num_refs=16, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:  # every process of a multi-process writer creates at once: one bank
        racing = list(pool.map(lambda _: make_bank(f"memory://{tmp_path.name}/race", exist_ok=True), range(4)))
    assert all(b.metadata == racing[0].metadata for b in racing)
    rng = np.random.default_rng(3)
    kv, positions, tokens = random_rows(rng, 14)
    bank.write(0, kv[:4], positions[:4], tokens[:4])
    bank.write(8, kv[8:11], positions[8:11], tokens[8:11])
    resumed = make_bank(path, num_refs=14, exist_ok=True)  # a restarted writer with the same arguments
    assert resumed.unwritten_ranges() == [(4, 8), (11, 14)]
    assert resumed.unwritten_ranges(6, 12) == [(6, 8), (11, 12)]
    with pytest.raises(ValueError, match=r"reference 5 is not written"):
        resumed.gather(np.array([0, 5, 9]))
    with pytest.raises(IndexError, match="reference id 14 outside"):
        resumed.gather(np.array([14]))
    ranges = [resumed.process_range(i, 3) for i in range(3)]
    assert ranges == [(0, 4), (4, 8), (8, 14)]  # whole shards of 4, disjoint, covering the bank
    for start, stop in ranges:
        for a, b in resumed.unwritten_ranges(start, stop):
            resumed.write(a, kv[a:b], positions[a:b], tokens[a:b])
    assert resumed.unwritten_ranges() == []
    got, _ = open_bank(path).gather(np.arange(14))
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), kv.view(np.uint16))
    with pytest.raises(ValueError, match="non-finite"):
        resumed.write(0, np.full((1, *ROW), np.nan, np.float32), positions[:1], tokens[:1])
    with pytest.raises(ValueError, match=r"positions has shape \(1, 2, 2, 3\)"):
        resumed.write(0, kv[:1], positions[:1, ..., :3], tokens[:1])


def test_gather_order_repeats_empty_slots_and_cache(tmp_path):
    rng = np.random.default_rng(4)
    kv, positions, tokens = random_rows(rng, 8)
    make_bank(f"memory://{tmp_path.name}/g", num_refs=8).write(0, kv, positions, tokens)
    bank = open_bank(f"memory://{tmp_path.name}/g", cache_rows=3)
    ids = np.array([[3, -1, 3, 0], [-1, -1, 6, 3]])  # any shape; repeats; -1 = empty
    got, got_positions = bank.gather(ids, dtype=jnp.float32)
    assert got.shape == (2, 4, *ROW) and got_positions.shape == (2, 4, 2, 2, K)
    for index in np.ndindex(ids.shape):
        i = ids[index]
        np.testing.assert_array_equal(np.asarray(got[index]), kv[i].astype(np.float32) if i >= 0 else 0.0)
        np.testing.assert_array_equal(got_positions[index], positions[i] if i >= 0 else -1)
    assert bank.cache_info() == {"hits": 0, "misses": 3, "rows": 3, "capacity": 3}  # per distinct id
    bank.gather(np.array([6, 0, 6]))
    assert bank.cache_info() == {"hits": 2, "misses": 3, "rows": 3, "capacity": 3}
    bank.gather(np.array([1, 2]))  # evicts the least recently used: 3, then 0
    bank.gather(np.array([6]))
    assert bank.cache_info()["hits"] == 3
    again, _ = bank.gather(np.array([3, 1, 2, 0]))  # 3 and 0 were evicted: read again, same bits
    assert bank.cache_info() == {"hits": 5, "misses": 7, "rows": 3, "capacity": 3}
    np.testing.assert_array_equal(np.asarray(again).view(np.uint16), kv[[3, 1, 2, 0]].view(np.uint16))
    new = random_rows(rng, 1)
    bank.write(1, *new)  # a rewrite drops the cached row
    np.testing.assert_array_equal(np.asarray(bank.gather([1])[0]).view(np.uint16), new[0].view(np.uint16))


def test_tokenizer_hash(tmp_path):
    model = tmp_path / "spm.model"
    model.write_bytes(b"not really a model")
    assert tokenizer_hash(model) == hashlib.sha256(b"not really a model").hexdigest()


def memory_budget(*flags):
    """tools/memory_budget.py --config=configs/memory3_2b.py --json `flags`, parsed."""
    out = subprocess.run(
        [sys.executable, "tools/memory_budget.py", "--config=configs/memory3_2b.py", "--json", *flags], cwd=REPO,
        capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_memory_budget_tool_memory3_2b():
    """memory3_2b: 450,560 bytes per memory in bf16; the paper: a sparse bank of 1.1e8 references is 45.9 TB,
    writing a reference ~0.308 TFLOPs, a read 1.44e-4 TFLOPs per use, RAG >= 0.624 TFLOPs."""
    b = memory_budget("--num_refs=110000000", "--processes=16")
    assert b["config"]["row_shape"] == [22, 2, 8, 8, 80]
    bf16, int8 = b["codecs"]["bf16"], b["codecs"]["int8"]
    assert bf16["bytes_per_memory"] == 22 * 2 * 8 * 8 * 80 * 2 == 450_560
    assert int8["bytes_per_memory"] == 22 * 2 * 8 * 8 * (80 + 2) == 230_912
    assert bf16["bank_memory_bytes"] / 2**40 == pytest.approx(45.9, rel=0.03)  # the paper's "TB" are TiB
    assert bf16["bank_memory_bytes"] < bf16["bank_bytes_on_disk"] < 1.02 * bf16["bank_memory_bytes"]
    assert b["flops"]["write_per_reference"] == pytest.approx(0.308e12, rel=0.02)
    assert b["flops"]["read_per_use"] == pytest.approx(1.44e8, rel=0.01)
    assert b["flops"]["rag_per_reference"] == pytest.approx(0.624e12, rel=0.01)
    # 2048 sequences of 32 chunks over 16 hosts, one unique memory per chunk, with positions.
    assert bf16["step_bytes_per_host"] == 128 * 32 * (450_560 + 22 * 8 * 8 * 4)


def test_memory_budget_tool_follows_its_flags():
    """Each flag reaches its numbers (the defaults above would hide a flag the tool ignored): a step of 64 x 1000
    tokens (16 chunks) over 4 processes at 2.5 memories per chunk moves 640 int8 memories with their positions per
    host, and a 3-token sink adds its tokens to the write FLOPs."""
    b = memory_budget("--num_refs=1000", "--codecs=int8", "--global_batch=64", "--seq=1000", "--processes=4",
                      "--memories_per_chunk=2.5", "--sink_len=3")
    assert list(b["codecs"]) == ["int8"]
    int8 = b["codecs"]["int8"]
    assert int8["bank_memory_bytes"] == 1000 * 230_912
    assert b["step"]["memories_per_host"] == 64 / 4 * 16 * 2.5 == 640
    assert int8["step_bytes_per_host"] == 640 * (230_912 + 22 * 8 * 8 * 4)
    config = memory3_2b.get_config()
    cfg = ModelConfig.from_config(config.model, config.memory)
    assert b["flops"]["write_per_reference"] == pytest.approx(write_flops_per_reference(cfg, 3), rel=1e-12)
    assert b["flops"]["write_per_reference"] > write_flops_per_reference(cfg, 0) * (1 + 1e-3)
