"""Search latency and recall of the reference index, brute force vs tree + AH, measured in one run.

    python tools/bench/search_latency.py [--sizes=100000,1000000 --dim=384 --queries=1024 --single=64 --k=5
                                          --bf_queries=1024 --sweep=0.05,0.1,0.2,0.33]

For each size n, `synthetic_embeddings` (m3jax/retrieval/index.py: clustered unit vectors calibrated on real
all-MiniLM-L6-v2 reference embeddings) gives n vectors and `--queries` queries (half noisy copies of indexed
vectors, half fresh draws). Both index kinds are built with the config's defaults (configs/base.py's
`retrieval` section, resolved for n; `--num_leaves`, `--leaves_to_search`, `--reorder` override them), then
timed, best of `--repeats`:
- build: `Index.build` (tree_ah: k-means tree and AH codebooks trained on a sample, then every vector hashed);
- batched: one `search` of all queries, reported per query;
- single: `--single` searches of one query each, per query (what an interactive lookup pays);
- save / load of the tree_ah index (load checks every file's sha256), once.
Recall@k of tree_ah is measured against brute force (exact) on the same queries. At large n brute force can be
measured on the first `--bf_queries` queries only (recall then uses those). `--sweep` re-searches the tree_ah
index with `leaves_to_search` = each fraction of `num_leaves` (no rebuild) and prints recall and latency for each,
to choose the default. The machine is shared and noisy: compare the speed-up ratios of one run, not absolute times.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

from m3jax.config import base_config
from m3jax.retrieval.index import Index, IndexSettings, synthetic_embeddings

_SIZES = flags.DEFINE_list("sizes", ["100000", "1000000"], "numbers of indexed vectors")
_DIM = flags.DEFINE_integer("dim", 384, "embedding dimension (all-MiniLM-L6-v2: 384)")
_QUERIES = flags.DEFINE_integer("queries", 1024, "queries searched in one batch")
_SINGLE = flags.DEFINE_integer("single", 64, "queries searched one at a time")
_BF_QUERIES = flags.DEFINE_integer("bf_queries", 1024, "queries brute force searches (batched) at each size")
_K = flags.DEFINE_integer("k", 5, "neighbours per query (recall@k)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repetitions of each search (best is reported)")
_NUM_LEAVES = flags.DEFINE_integer("num_leaves", None, "override retrieval.num_leaves")
_LEAVES_TO_SEARCH = flags.DEFINE_integer("leaves_to_search", None, "override retrieval.leaves_to_search")
_REORDER = flags.DEFINE_integer("reorder", None, "override retrieval.reorder")
_SWEEP = flags.DEFINE_list("sweep", [], "fractions of num_leaves to search, measured on the same tree_ah index")
_SEED = flags.DEFINE_integer("seed", 0, "data seed")


def best_of(fn, repeats: int) -> tuple[float, object]:
    """The fastest of `repeats` calls (seconds) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row of `exact` found in the same row of `ids`."""
    return float(np.mean([np.isin(e, i).mean() for i, e in zip(ids, exact, strict=True)]))


def measure(index: Index, queries: np.ndarray, single: int, **overrides) -> dict:
    k, repeats = _K.value, _REPEATS.value
    batched_s, (ids, _) = best_of(lambda: index.search(queries, k, **overrides), repeats)
    single_s, _ = best_of(lambda: [index.search(q[None], k, **overrides) for q in queries[:single]], repeats)
    return {"ids": ids, "batched_ms": batched_s / len(queries) * 1e3, "single_ms": single_s / max(single, 1) * 1e3}


def main(argv):
    del argv
    r = base_config().retrieval
    overrides = {"num_leaves": _NUM_LEAVES.value, "leaves_to_search": _LEAVES_TO_SEARCH.value,
                 "reorder": _REORDER.value}
    defaults = IndexSettings.from_config(r)
    tree = dataclasses.replace(defaults, kind="tree_ah", **{key: v for key, v in overrides.items() if v is not None})
    print(f"dim {_DIM.value}, k {_K.value}, {_QUERIES.value} batched queries, {_SINGLE.value} single; "
          f"best of {_REPEATS.value}; {os.cpu_count()} CPUs; tree_ah settings {tree}")
    rows = []
    for n in map(int, _SIZES.value):
        rng = np.random.default_rng(_SEED.value)
        t0 = time.perf_counter()
        vectors, queries = synthetic_embeddings(rng, n, _QUERIES.value, _DIM.value)
        print(f"\nn = {n:,}: data in {time.perf_counter() - t0:.1f} s", flush=True)
        built, build_s = {}, {}
        for kind, settings in (("brute_force", IndexSettings(kind="brute_force")), ("tree_ah", tree)):
            t0 = time.perf_counter()
            built[kind] = Index.build(vectors, settings, embedder={"name": "synthetic", "dim": _DIM.value},
                                      max_k=max(_K.value, r.candidates))
            build_s[kind] = time.perf_counter() - t0
            print(f"  {kind} built in {build_s[kind]:.1f} s: {built[kind].settings}", flush=True)
        del vectors
        bf_queries = queries[:_BF_QUERIES.value]
        bf = measure(built["brute_force"], bf_queries, _SINGLE.value)
        ah = measure(built["tree_ah"], queries, _SINGLE.value)
        exact = bf["ids"]
        row = {"n": n, "bf": bf, "ah": ah, "recall": recall(ah["ids"][:len(exact)], exact),
               "build_bf_s": build_s["brute_force"], "build_ah_s": build_s["tree_ah"],
               "bf_queries": len(bf_queries), "sweep": []}
        for fraction in map(float, _SWEEP.value):
            leaves = max(1, round(fraction * built["tree_ah"].settings["num_leaves"]))
            m = measure(built["tree_ah"], queries, _SINGLE.value, leaves_to_search=leaves)
            row["sweep"].append((leaves, recall(m["ids"][:len(exact)], exact), m))
        tmp = tempfile.mkdtemp(prefix="search_latency_")
        try:
            t0 = time.perf_counter()
            built["tree_ah"].save(os.path.join(tmp, "index"))
            row["save_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            Index.load(os.path.join(tmp, "index"))
            row["load_s"] = time.perf_counter() - t0
        finally:
            shutil.rmtree(tmp)
        rows.append(row)
        print(f"  recall@{_K.value} {row['recall']:.4f}; batched ms/query bf {bf['batched_ms']:.3f} "
              f"ah {ah['batched_ms']:.3f}", flush=True)
        del built

    k = _K.value
    print(f"\n{'n':>10} {'build bf s':>10} {'build ah s':>10} {'bf q':>5} {'batched bf ms':>13} {'batched ah ms':>13} "
          f"{'speed-up':>8} {'single bf ms':>12} {'single ah ms':>12} {'speed-up':>8} {f'recall@{k}':>9} "
          f"{'ah save s':>9} {'ah load s':>9}")
    for w in rows:
        bf, ah = w["bf"], w["ah"]
        print(f"{w['n']:>10,} {w['build_bf_s']:>10.1f} {w['build_ah_s']:>10.1f} {w['bf_queries']:>5} "
              f"{bf['batched_ms']:>13.3f} {ah['batched_ms']:>13.3f} {bf['batched_ms'] / ah['batched_ms']:>7.1f}x "
              f"{bf['single_ms']:>12.3f} {ah['single_ms']:>12.3f} {bf['single_ms'] / ah['single_ms']:>7.1f}x "
              f"{w['recall']:>9.4f} {w['save_s']:>9.1f} {w['load_s']:>9.1f}")
    if _SWEEP.value:
        print(f"\nleaves_to_search sweep (tree_ah, same index): recall@{k}, batched / single ms per query")
        for w in rows:
            print(f"  n = {w['n']:,} (num_leaves {tree.resolve(w['n'])['num_leaves']}): " + "; ".join(
                f"{leaves}: {rec:.4f}, {m['batched_ms']:.3f} / {m['single_ms']:.3f}"
                for leaves, rec, m in w["sweep"]))


if __name__ == "__main__":
    app.run(main)
