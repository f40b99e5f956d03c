"""Throughput of the leakage filter (m3jax/retrieval/overlap.py): (reference, sequence) checks per second.

    python tools/bench/filter_throughput.py [--seq_len=2048 --ref_len=128 --candidates=640 --repeats=3]

Training checks every retrieved candidate of a sequence, about 640 per 2048-token sequence (20 per 64-token chunk),
against that sequence. Token ids are drawn Zipf-like (p ∝ 1 / (rank + 2.7)) over a 32k vocabulary. Each repeat
draws a new sequence and these candidate sets of `candidates` references of `ref_len` tokens:
- unrelated: drawn independently of the sequence (the common case: nothing leaks);
- topical: each token taken from a random position of the sequence with probability `--topical`, otherwise drawn
  (shares the sequence's vocabulary, not its order; passes the first tier of the prefilter);
- mixed: unrelated, except a `--leak_fraction` of stretches copied from the sequence with edits (substitutions,
  deletions, insertions) at a rate uniform in [0, 0.2], so their overlaps straddle 0.9;
- shuffled: stretches of the sequence with their tokens shuffled (the prefilter's worst case: the multiset bound
  passes every one, so each reaches the exact combing).
Timed: `leaking` (the prefilter, then exact combing of what it passes) at the training (0.9) and evaluation (2/3)
thresholds, exact `overlaps` without the prefilter, and the naive per-window LCS DP (`overlap_dp` of
m3jax/retrieval/overlap.py: the textbook table of every window) on `--naive` candidates. Ratios are measured in
the same run: the machine is shared and noisy, compare ratios.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from m3jax.retrieval.overlap import leaking, overlap_dp, overlaps

_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "training sequence length")
_REF_LEN = flags.DEFINE_integer("ref_len", 128, "reference length")
_CANDIDATES = flags.DEFINE_integer("candidates", 640, "references checked against each sequence")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "vocabulary size")
_TOPICAL = flags.DEFINE_float("topical", 0.9, "share of a topical reference's tokens taken from the sequence")
_LEAK_FRACTION = flags.DEFINE_float("leak_fraction", 0.1, "share of planted (edited) copies in the mixed set")
_REPEATS = flags.DEFINE_integer("repeats", 3, "sequences, each with new candidate sets")
_NAIVE = flags.DEFINE_integer("naive", 2, "candidates per set and repeat timed with the naive DP")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")

SETS = ("unrelated", "topical", "mixed", "shuffled")
METHODS = ("leaking 0.9", "leaking 2/3", "overlaps", "naive")


def edited(tokens: np.ndarray, rate: float, vocab: int, rng) -> np.ndarray:
    """`tokens` with edits at `rate`: each token, with probability rate / 3 each, is replaced by a random id,
    deleted, or kept after an inserted random id."""
    out = []
    for token in tokens.tolist():
        u = rng.random()
        if u >= rate:
            out.append(token)
        elif u < rate / 3:
            out.append(int(rng.integers(vocab)))
        elif u >= 2 * rate / 3:
            out += [int(rng.integers(vocab)), token]
    return np.array(out, np.int64)


def candidate_sets(seq: np.ndarray, draw, rng) -> dict[str, np.ndarray]:
    """Each set as retrieval hands it over: [candidates, ref_len] ids, rows padded with −1."""
    m, c = _REF_LEN.value, _CANDIDATES.value
    unrelated = draw((c, m))
    taken = seq[rng.integers(seq.size, size=(c, m))]
    topical = np.where(rng.random((c, m)) < _TOPICAL.value, taken, draw((c, m)))
    starts = rng.integers(seq.size - m + 1, size=c)
    mixed = unrelated.copy()
    for i in rng.choice(c, int(round(_LEAK_FRACTION.value * c)), replace=False):
        copy = edited(seq[starts[i]:starts[i] + m], rng.uniform(0, 0.2), _VOCAB.value, rng)[:m]
        mixed[i] = np.pad(copy, (0, m - copy.size), constant_values=-1)
    shuffled = np.stack([rng.permutation(seq[s:s + m]) for s in starts])
    return {"unrelated": unrelated, "topical": topical, "mixed": mixed, "shuffled": shuffled}


def timed(fn, *args) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main(argv):
    del argv
    rng = np.random.default_rng(_SEED.value)
    p = 1 / (np.arange(_VOCAB.value) + 2.7)
    p /= p.sum()
    draw = lambda shape: rng.choice(_VOCAB.value, size=shape, p=p)
    seconds = {s: dict.fromkeys(METHODS, 0.0) for s in SETS}
    checks = {s: dict.fromkeys(METHODS, 0) for s in SETS}
    leaks = {s: {0.9: 0, 2 / 3: 0} for s in SETS}
    leaking(draw((4, _REF_LEN.value)), draw(_SEQ_LEN.value), 0.9)  # first-call overheads out of the timings
    for _ in range(_REPEATS.value):
        seq = draw(_SEQ_LEN.value)
        for name, refs in candidate_sets(seq, draw, rng).items():
            t, exact = timed(overlaps, refs, seq)
            seconds[name]["overlaps"] += t
            checks[name]["overlaps"] += len(refs)
            for threshold, method in ((0.9, "leaking 0.9"), (2 / 3, "leaking 2/3")):
                t, leak = timed(leaking, refs, seq, threshold)
                assert (leak == (exact > threshold)).all(), (name, threshold)
                seconds[name][method] += t
                checks[name][method] += len(refs)
                leaks[name][threshold] += int(leak.sum())
            sample = refs[:_NAIVE.value]
            t, naive = timed(lambda rs, s: [overlap_dp(r, s) for r in rs], sample, seq)
            assert naive == exact[:len(sample)].tolist(), name
            seconds[name]["naive"] += t
            checks[name]["naive"] += len(sample)

    print(f"{_REPEATS.value} sequences of {_SEQ_LEN.value} tokens, {_CANDIDATES.value} candidates of "
          f"{_REF_LEN.value} tokens per set each; Zipf-like ids over {_VOCAB.value:,}; naive on {_NAIVE.value} "
          f"per set and sequence")
    print(f"{'set':<10} {'leaks@0.9':>9} {'leaks@2/3':>9} " + " ".join(f"{m + ' /s':>14}" for m in METHODS)
          + f" {'0.9/exact':>10} {'2/3/exact':>10} {'exact/naive':>12}")
    for name in SETS:
        rate = {m: checks[name][m] / seconds[name][m] for m in METHODS}
        total = checks[name]["overlaps"]
        print(f"{name:<10} {leaks[name][0.9] / total:>9.1%} {leaks[name][2 / 3] / total:>9.1%} "
              + " ".join(f"{rate[m]:>14,.0f}" for m in METHODS)
              + f" {rate['leaking 0.9'] / rate['overlaps']:>9.1f}x {rate['leaking 2/3'] / rate['overlaps']:>9.1f}x"
              + f" {rate['overlaps'] / rate['naive']:>11.0f}x")


if __name__ == "__main__":
    app.run(main)
