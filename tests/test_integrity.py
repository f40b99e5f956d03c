"""Integrity across stages, by fault injection: bytes flipped in a bank chunk, a shard index, a flags chunk, a data
shard and metadata files are errors that name what is damaged, never data; the index is bound to the bank's texts.

Bank faults are injected into real banks (MemoryBank.create/write, or the session's knowledge bank written by the
writer) by editing their files: a shard ends with its index, one (offset, nbytes) pair of uint64 per row, then a
crc32c, so the bytes of a row's chunk are found exactly.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_tool
from test_bank import ARCH, make_bank, open_bank, random_rows

from m3jax.data import records
from m3jax.data.packing import LM_FIELDS
from m3jax.memory.bank import BankCorruptionError, MemoryBank

SHARD = 4  # make_bank's refs_per_shard


# ------------------------------------------------------------------------------------------------ helpers
def shard_file(bank_path, array: str, ref: int, refs_per_shard: int = SHARD) -> Path:
    """The file of the shard holding `ref` in `array` (zarr3 default keys: ARRAY/c/SHARD[/0/...])."""
    key = Path(bank_path, array, "c", str(ref // refs_per_shard))
    files = [key] if key.is_file() else [p for p in key.rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0]


def chunk_range(path: Path, row: int, refs_per_shard: int = SHARD) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk `row` of a shard file (its index is at the end, then 4 bytes of crc32c)."""
    data = path.read_bytes()
    index = np.frombuffer(data[-(16 * refs_per_shard + 4):-4], "<u8").reshape(refs_per_shard, 2)
    return int(index[row, 0]), int(index[row, 1])


def flip(path: Path, offset: int, mask: int = 0x40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def flip_in_row(bank_path, array: str, ref: int, refs_per_shard: int = SHARD) -> Path:
    """Flips a byte in the middle of `ref`'s data in `array` (not its checksum, not the shard index)."""
    path = shard_file(bank_path, array, ref, refs_per_shard)
    offset, nbytes = chunk_range(path, ref % refs_per_shard, refs_per_shard)
    flip(path, offset + (nbytes - 4) // 2)
    return path


def bits(x):
    return np.asarray(x).view(np.uint16)


@pytest.fixture
def written_bank(tmp_path):
    path = str(tmp_path / "bank")
    rows = random_rows(np.random.default_rng(0), 12)
    make_bank(path).write(0, *rows)
    return path, rows


# ------------------------------------------------------------------------------------------------ the bank
def test_flipped_byte_in_a_chunk_names_the_bank_array_and_reference(written_bank):
    path, (kv, positions, tokens) = written_bank
    damaged = flip_in_row(path, "memory", 5)
    bank = open_bank(path)
    named = rf"memory bank .*{re.escape(os.path.basename(path))}.*array 'memory', reference 5\b.*damaged"
    with pytest.raises(BankCorruptionError, match=named) as error:
        bank.gather(np.array([[4, 5], [6, -1]]))
    assert str(damaged) in str(error.value)  # the shard file
    assert bank.cache_info()["rows"] == 0  # nothing of the failed read was kept
    neighbours = np.array([4, 6, 7, 0, 11])  # the rest of its shard and of the bank read as written
    got, got_positions = bank.gather(neighbours)
    np.testing.assert_array_equal(bits(got), bits(kv[neighbours]))
    np.testing.assert_array_equal(got_positions, positions[neighbours])
    np.testing.assert_array_equal(bank.read_tokens([5])[0, :tokens.shape[1]], tokens[5])  # its other arrays are fine
    with pytest.raises(BankCorruptionError, match=r"reference 5\b"):
        bank.gather_codes(np.array([5]))
    np.testing.assert_array_equal(bank.verify(), [5])
    np.testing.assert_array_equal(bank.verify(0, 4), [])
    bank.write(5, kv[5:6], positions[5:6], tokens[5:6])  # written again (a partial shard): whole again
    np.testing.assert_array_equal(bits(open_bank(path).gather([5])[0]), bits(kv[5:6]))
    assert bank.verify().size == 0


def test_flipped_tokens_and_positions_are_named_too(written_bank):
    path, (kv, positions, tokens) = written_bank
    flip_in_row(path, "tokens", 9)
    flip_in_row(path, "positions", 2)
    bank = open_bank(path)
    with pytest.raises(BankCorruptionError, match=r"array 'tokens', reference 9\b"):
        bank.read_tokens(np.array([8, 9, 10]))
    with pytest.raises(BankCorruptionError, match=r"array 'positions', reference 2\b"):
        bank.gather([2, 3])
    np.testing.assert_array_equal(bits(bank.gather([9])[0]), bits(kv[9:10]))
    np.testing.assert_array_equal(bank.verify(), [2, 9])
    with pytest.raises(BankCorruptionError, match=r"array 'tokens', reference 9\b"):  # what the index embeds
        bank.read_tokens(np.arange(12))


def test_damaged_shard_index_missing_shard_and_flags(written_bank, caplog):
    path, (kv, positions, tokens) = written_bank
    index_file = shard_file(path, "memory", 8)
    flip(index_file, index_file.stat().st_size - 10)  # inside the shard index: every row of the shard
    bank = open_bank(path)
    with pytest.raises(BankCorruptionError, match=r"array 'memory', references 8, 9, 10, 11\b"):
        bank.gather([11, 8, 9, 10])
    np.testing.assert_array_equal(bank.verify(), [8, 9, 10, 11])
    shard_file(path, "positions", 0).unlink()  # a deleted file under written rows: missing, not fill values
    with pytest.raises(BankCorruptionError, match=r"array 'positions', reference 1\b.*missing"):
        open_bank(path).gather([1])
    flags = shard_file(path, "written", 4)  # plain bytes: the flags of refs [4, 8)
    flip(flags, 1, 0x40)  # 0x41: damaged, so unwritten
    flip(flags, 2, 0x01)  # 1 -> 0: unwritten
    with caplog.at_level(logging.WARNING):
        assert open_bank(path).unwritten_ranges() == [(5, 7)]
    assert "written flags of reference 5 are damaged" in caplog.text
    for ref in (5, 6):
        with pytest.raises(ValueError, match=rf"reference {ref} is not written"):
            open_bank(path).gather([ref])
    bank = make_bank(path, exist_ok=True)  # a writer resuming: rewrites what verify and unwritten_ranges name
    todo = sorted(set(bank.verify().tolist()) | {i for a, b in bank.unwritten_ranges() for i in range(a, b)})
    assert todo == [0, 1, 2, 3, 5, 6, 8, 9, 10, 11]
    for start in range(0, 12, SHARD):
        bank.write(start, kv[start:start + SHARD], positions[start:start + SHARD], tokens[start:start + SHARD])
    got, got_positions = open_bank(path).gather(np.arange(12))
    np.testing.assert_array_equal(bits(got), bits(kv))
    np.testing.assert_array_equal(got_positions, positions)


def test_a_flag_set_over_rows_never_written_is_an_error(tmp_path):
    path = str(tmp_path / "bank")
    kv, positions, tokens = random_rows(np.random.default_rng(2), 12)
    make_bank(path).write(0, kv[:8], positions[:8], tokens[:8])
    shutil.copy(shard_file(path, "written", 0), Path(path, "written", "c", "2"))  # refs [8, 12) claim written
    bank = open_bank(path)
    assert bank.unwritten_ranges() == []
    with pytest.raises(BankCorruptionError, match=r"array 'memory', reference 9\b.*missing"):
        bank.gather([9])
    with pytest.raises(BankCorruptionError, match=r"array 'tokens', reference 9\b.*missing"):
        bank.read_tokens([9])
    np.testing.assert_array_equal(bank.verify(), [8, 9, 10, 11])


def test_damaged_or_old_metadata_is_named(written_bank):
    path, _ = written_bank
    meta_path = Path(path, "zarr.json")
    group = json.loads(meta_path.read_text())
    group["attributes"]["m3jax_bank"]["format"] = 1
    meta_path.write_text(json.dumps(group))
    with pytest.raises(ValueError, match=r"memory bank .* is of format 1; this code reads format 2 .*write it again"):
        open_bank(path)
    meta_path.write_bytes(b"\xff" + meta_path.read_bytes()[1:])
    with pytest.raises(BankCorruptionError, match=r"its metadata file zarr.json is damaged"):
        open_bank(path)
    Path(path, "memory", "zarr.json").write_text("{not json")
    group["attributes"]["m3jax_bank"]["format"] = 2
    meta_path.write_text(json.dumps(group))
    with pytest.raises(BankCorruptionError, match=r"array 'memory' cannot be opened"):
        open_bank(path)


def test_bank_without_checksums_is_a_bench_option_with_exact_sizes(tmp_path):
    from m3jax.memory.bank import bytes_per_reference

    sizes = {}
    for checksums in (True, False):
        path = tmp_path / f"bank{checksums}"
        make_bank(str(path), checksums=checksums).write(0, *random_rows(np.random.default_rng(1), 12))
        sizes[checksums] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")
    per_ref = {c: sum(bytes_per_reference("bf16", ARCH, checksums=c).values()) for c in (True, False)}
    assert per_ref[True] - per_ref[False] == 4 * 3  # a crc32c per row of memory, positions and tokens
    shards = 3
    for c in (True, False):  # + per shard: the index crc of 3 arrays, and token_digest's crc when on
        assert sizes[c] == 12 * per_ref[c] + shards * (3 * 4 + (4 if c else 0)), (c, sizes[c], per_ref[c])


# ------------------------------------------------------------------------------------------------ data shards
def write_data(data_dir, num_records=24, seq_len=32, num_shards=2):
    rows = [{name: np.full(seq_len, i * (k + 1), np.int32) + np.arange(seq_len, dtype=np.int32)
             for k, name in enumerate(LM_FIELDS)} for i in range(num_records)]
    records.write_split(iter(rows), data_dir, "train", num_shards)
    records.write_metadata(data_dir, {
        "format_version": records.FORMAT_VERSION, "fields": records.field_specs({n: (seq_len,) for n in LM_FIELDS}),
        "seq_len": seq_len, "vocab_size": 100, "bos_id": 2, "eos_id": 3, "pad_id": 0, "tokenizer_path": "none",
        "tokenizer_sha256": "0" * 64,
        "splits": {"train": {"num_records": num_records, "num_tokens": 0,
                             "shards": records.shard_names("train", num_shards)}}})
    source, decode = records.split_source(data_dir, "train")
    return [decode(i, source[i]) for i in range(len(source))]


def test_flipped_bytes_in_a_data_shard_are_never_read_as_tokens(tmp_path):
    want = write_data(tmp_path)
    shard = tmp_path / records.shard_names("train", 2)[1]
    clean = shard.read_bytes()
    nonzero = np.flatnonzero(np.frombuffer(clean, np.uint8))  # records and index, then padding to 64 KiB blocks,
    gap = int(np.flatnonzero(np.diff(nonzero) > 1024)[0])  # then the postscript: the flips cover both parts
    offsets = [*range(0, int(nonzero[gap]) + 64, 17), *range(int(nonzero[gap + 1]) - 16, int(nonzero[-1]) + 64, 4)]
    errors = same = 0
    for offset in offsets:
        flip(shard, offset, 0x08)
        try:
            source, decode = records.split_source(tmp_path, "train")
            got = [decode(i, source[i]) for i in range(len(source))]
        except ValueError as e:  # DataShardError, or the codec's check of a first record
            assert str(shard) in str(e), e
            errors += 1
        else:
            for g, w in zip(got, want, strict=True):
                for name in LM_FIELDS:
                    np.testing.assert_array_equal(g[name], w[name], err_msg=f"flip at {offset} read silently")
            same += 1
        shard.write_bytes(clean)
    print(f"{len(offsets)} flips: {errors} errors naming the shard, {same} read the original records")
    assert errors > 100 and same > 10, (errors, same)


def test_damaged_shard_is_named_through_the_pipeline(tmp_path):
    from m3jax.data import pipeline

    write_data(tmp_path)
    shard = tmp_path / records.shard_names("train", 2)[1]
    offset = next(o for o in range(200, 4000, 7) if _breaks_a_later_record(tmp_path, shard, o))
    flip(shard, offset, 0x08)
    records.split_source(tmp_path, "train")  # opens: the damage is in a later record
    it = pipeline.make_lm_iterator(tmp_path, "train", global_batch_size=4, seed=0, num_epochs=1)
    with pytest.raises(records.DataShardError, match=re.escape(str(shard)) + r" is damaged \(its record \d+"):
        list(it)
    metadata = tmp_path / records.METADATA_FILE
    metadata.write_bytes(metadata.read_bytes().replace(b'"seq_len"', b'"seq\xff_len"'))
    with pytest.raises(ValueError, match=r"metadata.json is not valid JSON"):
        records.read_metadata(tmp_path)


def _breaks_a_later_record(data_dir, shard, offset) -> bool:
    clean = shard.read_bytes()
    flip(shard, offset, 0x08)
    try:
        source, _ = records.split_source(data_dir, "train")
        for i in range(len(source)):
            source[i]
    except records.DataShardError as e:
        return "its record" in str(e)
    except ValueError:
        return False
    finally:
        shard.write_bytes(clean)
    return False


# ------------------------------------------------------------------------------------------------ writer, index
def copy_bank(memory_kb, tmp_path) -> str:
    bank = tmp_path / "bank"
    shutil.copytree(memory_kb["bank"], bank, ignore=shutil.ignore_patterns("index", "index-vectors"))
    return str(bank)


def test_resumed_writer_rewrites_damaged_rows(memory_kb, tmp_path):
    """The writer's resume verifies its written rows: a damaged one is encoded again, and the bank equals the
    original file for file."""
    from m3jax.memory import bank as bank_lib
    from m3jax.memory import writer
    from m3jax.model.config import ModelConfig
    from m3jax.model.params import init_params

    path = copy_bank(memory_kb, tmp_path)
    arrays = ("memory", "positions", "tokens", "token_digest", "written")
    original = {p.relative_to(path): p.read_bytes() for a in arrays for p in Path(path, a).rglob("*") if p.is_file()}
    flip_in_row(path, "memory", 70, refs_per_shard=64)
    config, refs, sink = memory_kb["config"], memory_kb["refs"], memory_kb["sink"]
    cfg = ModelConfig.from_config(config.model, config.memory)
    from m3jax.data.tokenizer import Tokenizer

    bank, writable = writer.open_for_writing(
        path, refs, architecture=bank_lib.architecture(cfg), tokenizer_sha256=Tokenizer(memory_kb["tokenizer"]).sha256,
        checkpoint={"run_id": "fresh", "step": 0}, sink=sink, codec="bf16", refs_per_shard=64,
        record=writer.writer_record(refs, 1, cfg.dtype))
    assert writable
    summary = writer.write_references(bank, init_params(cfg, seed=0), cfg, refs, sink, batch_size=64)
    assert summary["refs"] == 1
    again = {p.relative_to(path): p.read_bytes() for a in arrays for p in Path(path, a).rglob("*") if p.is_file()}
    assert again == original


def test_build_index_refuses_an_incomplete_bank(memory_kb, tmp_path):
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.retrieval import build

    source = MemoryBank.open(memory_kb["bank"], expect_architecture=MemoryBank.read_metadata(memory_kb["bank"])[
        "architecture"], expect_tokenizer=Tokenizer(memory_kb["tokenizer"]).sha256)
    meta = source.metadata
    n = source.num_refs
    partial = MemoryBank.create(str(tmp_path / "partial"), num_refs=n, architecture=meta["architecture"],
                                tokenizer_sha256=meta["tokenizer_sha256"], checkpoint=meta["checkpoint"],
                                sink_tokens=meta["sink_tokens"], refs_per_shard=64)
    kv, positions = source.gather(np.arange(64), dtype=jnp.float32)
    partial.write(0, kv, positions, source.read_tokens(np.arange(64)))
    message = f"{n - 64:,} of {n:,} references are unwritten; finish it with tools/write_memory.py"
    with pytest.raises(ValueError, match=re.escape(message)):
        build.open_bank(str(tmp_path / "partial"), Tokenizer(memory_kb["tokenizer"]))
    run = run_tool(memory_kb["root"], "build_index", "--config=tests/lm_test_config.py",
                   f"--bank={tmp_path / 'partial'}", f"--tokenizer={memory_kb['tokenizer']}", "--block_refs=64")
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "partial" / "index-vectors").exists()


def test_rewritten_rows_are_embedded_again_and_the_index_is_bound_to_the_bank(memory_kb, kb_retrieval, tmp_path):
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.retrieval import build
    from m3jax.retrieval.embedder import Embedder
    from m3jax.retrieval.index import Index, IndexMismatchError, IndexSettings

    tokenizer = Tokenizer(memory_kb["tokenizer"])
    path = copy_bank(memory_kb, tmp_path)
    index_dir = str(tmp_path / "index")
    vectors = Path(build.vectors_dir(index_dir))
    shutil.copytree(build.vectors_dir(kb_retrieval["index"]), vectors)
    before = {p.name: p.read_bytes() for p in vectors.glob("block-*.npy")}
    original = build.open_bank(memory_kb["bank"], tokenizer)
    bank = build.open_bank(path, tokenizer)
    n, last = bank.num_refs, (bank.num_refs - 1) // 64
    assert last >= 1
    changed = np.arange(last * 64, min(last * 64 + 3, n))  # rows of the last block, with other tokens
    kv, positions = bank.gather(changed, dtype=jnp.float32)
    new_tokens = bank.read_tokens(changed[::-1])  # the texts of these rows, in reverse order
    assert (new_tokens != bank.read_tokens(changed)).any()
    bank.write(int(changed[0]), kv, positions, new_tokens)

    embedder = Embedder.load(memory_kb["config"].retrieval.embedder)
    blocks = build.VectorBlocks(vectors, num_refs=n, block_refs=64, identity=embedder.identity)
    assert blocks.stale_blocks(bank.read_token_digests()) == [last]
    s = build.embed_references(blocks, bank, tokenizer, embedder, log=lambda _: None)
    assert (s["blocks"], s["reused"], s["refs"]) == (1, last, n - last * 64)
    after = {p.name: p.read_bytes() for p in vectors.glob("block-*.npy")}
    assert [k for k in before if after[k] != before[k]] == [f"block-{last:06d}.npy"]
    old, new = (np.load(d / f"block-{last:06d}.npy") for d in (Path(build.vectors_dir(kb_retrieval["index"])),
                                                               vectors))
    rows = changed - last * 64
    np.testing.assert_allclose(new[rows], old[rows[::-1]], atol=1e-4)  # the moved texts' vectors
    assert not np.allclose(new[rows], old[rows], atol=1e-3)

    index = build.build_index(blocks, embedder, IndexSettings(), index_dir, bank=bank)
    assert index.bank == build.bank_binding(bank) != build.bank_binding(original)
    Index.load(index_dir, expect_embedder=embedder.identity, expect_bank=build.bank_binding(bank))
    with pytest.raises(IndexMismatchError, match=r"embedded other texts than the bank holds: tokens_sha256"):
        Index.load(index_dir, expect_bank=build.bank_binding(original))
    with pytest.raises(IndexMismatchError, match=r"embedded other texts"):
        Index.load(kb_retrieval["index"], expect_bank=build.bank_binding(bank))
    Index.load(kb_retrieval["index"], expect_bank=build.bank_binding(original))

    flip(vectors / "block-000000.npy", 200, 0x01)  # a damaged vector block is named, never indexed
    with pytest.raises(ValueError, match=r"block-000000.npy is damaged"):
        build.build_index(blocks, embedder, IndexSettings(), index_dir, bank=bank)
