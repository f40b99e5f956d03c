"""The index of a memory bank: every reference's text embedded, then one ScaNN searcher over the vectors.

A reference's text is its tokens (as the bank stores them) decoded by the tokenizer that wrote the bank. Embedding
is sharded over processes and resumable: references are cut into blocks of `block_refs`; process p of n embeds
blocks p, p + n, … and saves each as `INDEX-vectors/block-{i:06d}.npy` (float32 [refs of the block, dim], written
whole: `m3jax.retrieval.blocks`), so a restarted build embeds only the missing blocks. Process 0 then reads all
blocks, builds the searcher (`m3jax.retrieval.index.Index`, brute force or tree + AH by the settings) and saves
it in the index directory, with the embedder's identity; the vector blocks stay beside it (the source of a
rebuild with other settings) and are checked against the embedder and the bank's size on reuse.

Bound to the bank's content. Only a complete bank is embedded (an unwritten row would embed as empty text): an
incomplete one is refused, naming how many rows are missing. Each block's record (`block-{i:06d}.json`) holds the
sha256 of its references' `token_digest`s (m3jax/memory/bank.py: a digest of each row's stored tokens) and of
its own bytes, so a rerun embeds again exactly the blocks whose references' tokens changed (and those missing),
and a damaged block is an error naming it. The index records the bank's binding (`bank_binding`: its size,
ref_len, tokenizer and the sha256 of every row's token digest) so a retriever refuses an index of other texts
(`Index.load(expect_bank=...)`).

The bank, the index and its vectors may each be a local directory or a `gs://` URL.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from m3jax.data.tokenizer import Tokenizer
from m3jax.memory.bank import MemoryBank
from m3jax.paths import absolute, is_url
from m3jax.retrieval.blocks import Blocks, create_meta, read_meta
from m3jax.retrieval.embedder import Embedder
from m3jax.retrieval.index import INDEX_DIR, Index, IndexSettings

VECTORS_META = "vectors.json"
VECTORS_FORMAT = 2  # 2: block records binding each block to its references' token digests


def check_complete(bank: MemoryBank) -> None:
    """Refuses a bank with unwritten rows, naming how many."""
    unwritten = sum(b - a for a, b in bank.unwritten_ranges())
    if unwritten:
        raise ValueError(f"memory bank {bank.path}: {unwritten:,} of {bank.num_refs:,} references are unwritten; "
                         "finish it with tools/write_memory.py")


def open_bank(path, tokenizer: Tokenizer) -> MemoryBank:
    """The complete bank at `path` for reading its references' tokens; it must have been written with
    `tokenizer`. An incomplete bank is refused (`check_complete`)."""
    meta = MemoryBank.read_metadata(path)
    bank = MemoryBank.open(path, expect_architecture=meta["architecture"], expect_tokenizer=tokenizer.sha256,
                           cache_rows=0)
    check_complete(bank)
    return bank


def _digest(token_digests: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(token_digests, "<u8").tobytes()).hexdigest()


def bank_binding(bank: MemoryBank, token_digests: np.ndarray | None = None) -> dict[str, Any]:
    """What an index of `bank` embedded: num_refs, ref_len, the tokenizer and `tokens_sha256`, the sha256 of every
    row's token digest (`token_digests`, else read: 8 bytes per reference). The bank must be complete."""
    check_complete(bank)
    digests = bank.read_token_digests() if token_digests is None else token_digests
    return {"num_refs": bank.num_refs, "ref_len": bank.metadata["ref_len"],
            "tokenizer_sha256": bank.metadata["tokenizer_sha256"], "tokens_sha256": _digest(digests)}


def vectors_dir(index_dir: str) -> str:
    """Where the embedded references of an index are kept: beside it, INDEX-vectors."""
    return index_dir.rstrip("/") + "-vectors"


def default_index_dir(bank_path: str) -> str:
    """BANK/index: in the bank's directory, or under its URL (`gs://bucket/bank/index`)."""
    return f"{bank_path.rstrip('/')}/{INDEX_DIR}" if is_url(bank_path) else os.path.join(bank_path, INDEX_DIR)


def reference_texts(bank: MemoryBank, tokenizer: Tokenizer, ids: np.ndarray) -> list[str]:
    """The text of references `ids` [n]: their stored tokens (−1 padding dropped), decoded."""
    return [tokenizer.decode(row[row >= 0]) for row in bank.read_tokens(np.asarray(ids, np.int64))]


class VectorBlocks(Blocks):
    """The embedded references of a bank: float32 [num_refs, dim] in blocks (the module docstring)."""

    def __init__(self, directory: str | os.PathLike, *, num_refs: int, block_refs: int, identity: dict[str, Any]):
        super().__init__(directory, num_rows=num_refs, block_rows=block_refs, row_shape=(int(identity["dim"]),),
                         dtype=np.float32, records=True)
        create_meta(self.directory / VECTORS_META, {"format": VECTORS_FORMAT, "num_refs": num_refs,
                                                    "block_refs": block_refs, "embedder": identity},
                    what="vectors of another bank or embedder, or of an older format",
                    remedy=f"delete {self.directory} to embed again")

    def tokens_digest(self, i: int, token_digests: np.ndarray) -> str:
        """What block i's record must say it embedded: the sha256 of its references' token digests (of the whole
        bank's `token_digests`)."""
        a, b = self.block_range(i)
        return _digest(token_digests[a:b])

    def stale_blocks(self, token_digests: np.ndarray, blocks: Iterable[int] | None = None) -> list[int]:
        """The blocks (of `blocks`, default all) to embed: missing, or whose record says they embedded other
        texts than the bank's references hold now (`token_digests`: `MemoryBank.read_token_digests()`)."""
        if len(token_digests) != self.num_rows:
            raise ValueError(f"{self.directory} holds vectors of {self.num_rows:,} references, the bank has "
                             f"{len(token_digests):,}")
        todo = []
        for i in range(self.num_blocks) if blocks is None else blocks:
            record = self.block_record(i)
            if (not self.block_path(i).exists() or record is None
                    or record.get("tokens_sha256") != self.tokens_digest(i, token_digests)):
                todo.append(i)
        return todo

    @classmethod
    def open(cls, directory: str | os.PathLike) -> VectorBlocks:
        """The vector blocks saved in `directory`, as they were embedded."""
        meta = read_meta(absolute(directory) / VECTORS_META,
                         missing_hint="no embedded references (tools/build_index.py)")
        return cls(directory, num_refs=meta["num_refs"], block_refs=meta["block_refs"], identity=meta["embedder"])

    def read_all(self) -> np.ndarray:
        """Every reference's vector [num_refs, dim]; a missing or malformed block is an error naming it."""
        return np.concatenate([self.read_block(i) for i in range(self.num_blocks)])


def embed_references(blocks: VectorBlocks, bank: MemoryBank, tokenizer: Tokenizer, embedder: Embedder, *,
                     process_index: int = 0, process_count: int = 1, log: Callable[[str], None] = print,
                     log_every_s: float = 10.0) -> dict[str, Any]:
    """Embeds this process's stale blocks (of p, p + n, …: missing, or of references whose tokens changed);
    returns {"refs", "blocks", "reused", "seconds", "refs_per_s"}. The bank must be complete."""
    check_complete(bank)
    digests = bank.read_token_digests()
    mine = range(process_index, blocks.num_blocks, process_count)
    todo = blocks.stale_blocks(digests, mine)
    total = sum(b - a for a, b in map(blocks.block_range, todo))
    t0 = last = time.perf_counter()
    done = 0
    for i in todo:
        a, b = blocks.block_range(i)
        blocks.write_block(i, embedder.embed(reference_texts(bank, tokenizer, np.arange(a, b))),
                           {"refs": [a, b], "tokens_sha256": blocks.tokens_digest(i, digests)})
        done += b - a
        if time.perf_counter() - last > log_every_s:
            last = time.perf_counter()
            rate = done / (last - t0)
            log(f"process {process_index}: embedded {done:,}/{total:,} references, {rate:,.1f}/s, "
                f"eta {(total - done) / max(rate, 1e-9):,.0f} s")
    seconds = time.perf_counter() - t0
    return {"refs": done, "blocks": len(todo), "reused": len(mine) - len(todo), "seconds": seconds,
            "refs_per_s": done / seconds if done else 0.0}


def build_index(blocks: VectorBlocks, embedder: Embedder, settings: IndexSettings, index_dir, *,
                bank: MemoryBank, max_k: int = 64) -> Index:
    """The searcher over every block's vectors, saved in `index_dir` (replacing an index there), bound to
    `bank`: every block must have embedded the bank's current texts (else an error naming the first stale one)."""
    check_complete(bank)
    digests = bank.read_token_digests()
    binding = bank_binding(bank, digests)
    stale = blocks.stale_blocks(digests)
    if stale:
        raise ValueError(f"{len(stale)} vector blocks of {blocks.directory} are missing or were embedded from other "
                         f"texts than the bank {bank.path} holds now (first: {blocks.block_path(stale[0]).name}): "
                         "rerun tools/build_index.py")
    vectors = blocks.read_all()
    index = Index.build(vectors, settings, embedder=embedder.identity, max_k=max_k, bank=binding)
    index.save(index_dir)
    return index
