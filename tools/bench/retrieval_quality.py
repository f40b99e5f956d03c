"""Retrieval quality on a real bank: does a 64-token piece of a reference find that reference? Measured in one run.

    python tools/bench/retrieval_quality.py --config=configs/demo.py --bank=runs/demo/bank \
        --tokenizer=runs/demo/tokenizer/spm.model [--queries=300 --index=BANK/index]

Queries: `--queries` references of full length (ref_len tokens), drawn at random; from each, a random window of
64 tokens (a chunk's size), decoded to text and embedded with the index's embedder. Printed side by side:
- recall@1/5/20 of the source reference with the bank's saved index (tools/build_index.py);
- the same queries against a tree + AH index built here from the same saved vectors (the settings `auto` uses
  above `retrieval.brute_force_max`), and its recall@5 against exact search;
- random unit query vectors (the floor: about k / references);
- the time per query of embedding and of search.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (its retrieval section).")
_BANK = flags.DEFINE_string("bank", None, "The memory bank directory.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The SentencePiece model that wrote the bank.")
_INDEX = flags.DEFINE_string("index", "", "The index directory (default BANK/index).")
_QUERIES = flags.DEFINE_integer("queries", 300, "references queried")
_SEED = flags.DEFINE_integer("seed", 0, "which references and windows")
KS = (1, 5, 20)
CHUNK = 64


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([t in row[:k] for t, row in zip(truth, found, strict=True)]))


def main(argv):
    del argv
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.retrieval import build
    from m3jax.retrieval.embedder import Embedder
    from m3jax.retrieval.index import Index, IndexSettings

    r = _CONFIG.value.retrieval
    tok = Tokenizer(_TOKENIZER.value)
    bank = build.open_bank(_BANK.value, tok)
    index_dir = _INDEX.value or build.default_index_dir(_BANK.value)
    embedder = Embedder.from_config(r)
    index = Index.load(index_dir, expect_embedder=embedder.identity)
    rng = np.random.default_rng(_SEED.value)
    tokens = bank.read_tokens(np.arange(bank.num_refs))
    full = np.flatnonzero((tokens >= 0).all(axis=1))
    ids = rng.choice(full, min(_QUERIES.value, full.size), replace=False)
    starts = rng.integers(0, tokens.shape[1] - CHUNK + 1, ids.size)
    texts = [tok.decode(tokens[i, s:s + CHUNK]) for i, s in zip(ids, starts, strict=True)]
    embedder.embed(texts[:8])  # compile
    t0 = time.perf_counter()
    queries = embedder.embed(texts)
    embed_ms = (time.perf_counter() - t0) / len(texts) * 1e3

    t0 = time.perf_counter()
    exact, _ = index.search(queries, max(KS))
    search_ms = (time.perf_counter() - t0) / len(texts) * 1e3
    vectors = build.VectorBlocks.open(build.vectors_dir(index_dir)).read_all()
    tree_settings = dataclasses.replace(IndexSettings.from_config(r), kind="tree_ah")
    tree = Index.build(vectors, tree_settings, embedder=embedder.identity)
    t0 = time.perf_counter()
    approx, _ = tree.search(queries, max(KS))
    tree_ms = (time.perf_counter() - t0) / len(texts) * 1e3
    noise = rng.normal(size=queries.shape).astype(np.float32)
    noise_found, _ = index.search(noise / np.linalg.norm(noise, axis=1, keepdims=True), max(KS))

    print(f"bank {bank.path}: {bank.num_refs:,} references; {ids.size} queries of {CHUNK} tokens; embedder "
          f"{embedder.identity['name']}; index {index.settings['kind']}; tree {tree.settings}")
    print(f"{'search':<22} " + " ".join(f"{'recall@' + str(k):>10}" for k in KS) + f" {'ms/query':>9}")
    for name, found, ms in ((f"index ({index.settings['kind']})", exact, search_ms), ("tree + AH", approx, tree_ms),
                            ("random queries", noise_found, float("nan"))):
        print(f"{name:<22} " + " ".join(f"{recall(found, ids, k):>10.3f}" for k in KS) + f" {ms:>9.2f}")
    overlap5 = np.mean([len(set(a[:5]) & set(b[:5])) / 5 for a, b in zip(approx, exact, strict=True)])
    print(f"tree + AH top-5 vs the saved index's top-5: {overlap5:.3f}; embedding {embed_ms:.1f} ms per query")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "bank", "tokenizer"])
    app.run(main)
