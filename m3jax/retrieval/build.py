"""The index of a memory bank: every reference's text embedded, then one ScaNN searcher over the vectors.

A reference's text is its tokens (as the bank stores them) decoded by the tokenizer that wrote the bank. Embedding
is sharded over processes and resumable: references are cut into blocks of `block_refs`; process p of n embeds
blocks p, p + n, … and saves each as `INDEX-vectors/block-{i:06d}.npy` (float32 [refs of the block, dim], written
to a temporary name then renamed), so a restarted build embeds only the missing blocks. Process 0 then reads all
blocks, builds the searcher (`m3jax.retrieval.index.Index`, brute force or tree + AH by the settings) and saves
it in the index directory, with the embedder's identity; the vector blocks stay beside it (the source of a
rebuild with other settings) and are checked against the embedder and the bank's size on reuse.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from m3jax.data.tokenizer import Tokenizer
from m3jax.memory.bank import MemoryBank
from m3jax.retrieval.blocks import Blocks, create_meta, read_meta
from m3jax.retrieval.embedder import Embedder
from m3jax.retrieval.index import INDEX_DIR, Index, IndexSettings

VECTORS_META = "vectors.json"


def open_bank(path, tokenizer: Tokenizer) -> MemoryBank:
    """The bank at `path` for reading its references' tokens; it must have been written with `tokenizer`."""
    meta = MemoryBank.read_metadata(path)
    return MemoryBank.open(path, expect_architecture=meta["architecture"], expect_tokenizer=tokenizer.sha256,
                           cache_rows=0)


def vectors_dir(index_dir: str) -> str:
    """Where the embedded references of an index are kept: beside it, INDEX-vectors."""
    return index_dir.rstrip("/") + "-vectors"


def default_index_dir(bank_path: str) -> str:
    """BANK/index for a bank on a local path; a bank at a URL needs an explicit index directory."""
    if "://" in bank_path:
        raise ValueError(f"the bank {bank_path} is not a local directory: give the index directory explicitly")
    return os.path.join(bank_path, INDEX_DIR)


def reference_texts(bank: MemoryBank, tokenizer: Tokenizer, ids: np.ndarray) -> list[str]:
    """The text of references `ids` [n]: their stored tokens (−1 padding dropped), decoded."""
    return [tokenizer.decode(row[row >= 0]) for row in bank.read_tokens(np.asarray(ids, np.int64))]


class VectorBlocks(Blocks):
    """The embedded references of a bank: float32 [num_refs, dim] in blocks (the module docstring)."""

    def __init__(self, directory: str | os.PathLike, *, num_refs: int, block_refs: int, identity: dict[str, Any]):
        super().__init__(directory, num_rows=num_refs, block_rows=block_refs, row_shape=(int(identity["dim"]),),
                         dtype=np.float32)
        create_meta(self.directory / VECTORS_META, {"num_refs": num_refs, "block_refs": block_refs,
                                                    "embedder": identity},
                    what="vectors of another bank or embedder", remedy=f"delete {self.directory} to embed again")

    @classmethod
    def open(cls, directory: str | os.PathLike) -> VectorBlocks:
        """The vector blocks saved in `directory`, as they were embedded."""
        meta = read_meta(Path(directory) / VECTORS_META, missing_hint="no embedded references (tools/build_index.py)")
        return cls(directory, num_refs=meta["num_refs"], block_refs=meta["block_refs"], identity=meta["embedder"])

    def read_all(self) -> np.ndarray:
        """Every reference's vector [num_refs, dim]; a missing or malformed block is an error naming it."""
        return np.concatenate([self.read_block(i) for i in range(self.num_blocks)])


def embed_references(blocks: VectorBlocks, bank: MemoryBank, tokenizer: Tokenizer, embedder: Embedder, *,
                     process_index: int = 0, process_count: int = 1, log: Callable[[str], None] = print,
                     log_every_s: float = 10.0) -> dict[str, Any]:
    """Embeds this process's missing blocks (p, p + n, …); returns {"refs", "seconds", "refs_per_s"}."""
    todo = blocks.process_blocks(process_index, process_count)
    total = sum(b - a for a, b in map(blocks.block_range, todo))
    t0 = last = time.perf_counter()
    done = 0
    for i in todo:
        a, b = blocks.block_range(i)
        blocks.write_block(i, embedder.embed(reference_texts(bank, tokenizer, np.arange(a, b))))
        done += b - a
        if time.perf_counter() - last > log_every_s:
            last = time.perf_counter()
            rate = done / (last - t0)
            log(f"process {process_index}: embedded {done:,}/{total:,} references, {rate:,.1f}/s, "
                f"eta {(total - done) / max(rate, 1e-9):,.0f} s")
    seconds = time.perf_counter() - t0
    return {"refs": done, "seconds": seconds, "refs_per_s": done / seconds if done else 0.0}


def build_index(blocks: VectorBlocks, embedder: Embedder, settings: IndexSettings, index_dir, *,
                max_k: int = 64) -> Index:
    """The searcher over every block's vectors, saved in `index_dir` (replacing an index there)."""
    vectors = blocks.read_all()
    index = Index.build(vectors, settings, embedder=embedder.identity, max_k=max_k)
    index.save(index_dir)
    return index
