"""The leakage filter (m3jax/retrieval/overlap.py) against eq. 6 computed naively, on random and real tokens."""

import collections
import itertools

import numpy as np
import pytest

from m3jax.data.corpus import embedded_corpus
from m3jax.data.tokenizer import Tokenizer, train_tokenizer
from m3jax.retrieval.overlap import _window_bounds, leaking, overlap, overlaps

THRESHOLDS = (0.9, 2 / 3)  # training (reference vs training sequence), evaluation (reference vs question)


def naive_overlap(reference, sequence) -> float:
    """Eq. 6 by its definition. For each window start, the textbook LCS DP of the reference against the next
    2|r| tokens: the DP's last row holds LCS(r, s[start:start + l]) for every l ≤ 2|r|, so the max over starts
    and that row is the max over every window of at most 2|r| tokens. The DP is vectorised over window starts:
    dp[i][j] = max(dp[i][j-1], dp[i-1][j], dp[i-1][j-1] + [r_i == w_j]) unrolled in j is a running max."""
    r = np.asarray(reference, np.int64)
    s = np.asarray(sequence, np.int64)
    r, s = r[r >= 0], s[s >= 0]
    if r.size == 0:
        return 0.0
    width = 2 * r.size
    padded = np.concatenate([s, np.full(width, -1)])
    windows = padded[np.arange(max(s.size, 1))[:, None] + np.arange(width)]  # [starts, 2|r|], -1 past the end
    dp = np.zeros((windows.shape[0], width + 1), np.int64)  # dp[start, j] = LCS(r[:i], window[:j])
    for token in r:
        row = np.maximum(dp[:, 1:], dp[:, :-1] + (windows == token))
        dp[:, 1:] = np.maximum.accumulate(row, axis=1)
    return int(dp.max()) / r.size


def textbook_overlap(reference, sequence) -> float:
    """Pure Python: every window of 1..2|r| tokens, each with the textbook LCS table."""
    r, s = list(reference), list(sequence)

    def lcs(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, j in itertools.product(range(len(a)), range(len(b))):
            table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    windows = [s[i:j] for i in range(len(s)) for j in range(i + 1, min(i + 2 * len(r), len(s)) + 1)]
    return max((lcs(r, w) for w in windows), default=0) / len(r) if r else 0.0


def edited(tokens, rate, vocab, rng) -> np.ndarray:
    """`tokens` with each token substituted, deleted or preceded by an insertion with probability `rate`."""
    out = []
    for t in tokens:
        u = rng.random()
        if u < rate / 3:
            out.append(int(rng.integers(vocab)))
        elif u < 2 * rate / 3:
            continue
        elif u < rate:
            out.extend([int(rng.integers(vocab)), int(t)])
        else:
            out.append(int(t))
    return np.array(out, np.int64)


def random_cases(seed: int = 0):
    """(references, sequence) sets: small and large alphabets, |r| 1..128, |s| shorter and longer than 2|r|,
    references planted in the sequence with edits at rates that put the overlaps around 0.9 and 2/3, and
    shuffled stretches of the sequence (the multiset bound passes them, their order does not)."""
    rng = np.random.default_rng(seed)
    cases = []
    for vocab in (2, 3, 5, 20, 1000):
        for n in (1, 7, 40, 150, 300):
            seq = rng.integers(vocab, size=n)
            refs = [rng.integers(vocab, size=int(m)) for m in rng.integers(1, 129, size=3)]
            refs += [rng.integers(vocab, size=m) for m in (1, 2, max(n // 3, 1))]
            for rate in (0.0, 0.05, 0.1, 0.2, 0.35):
                m = int(rng.integers(1, min(n, 128) + 1))
                start = int(rng.integers(n - m + 1))
                refs.append(edited(seq[start:start + m], rate, vocab, rng))
            refs.append(rng.permutation(seq[start:start + m]))
            refs.append(np.concatenate([seq[start:start + m // 2], rng.permutation(seq[start + m // 2:start + m])]))
            cases.append(([r for r in refs if r.size], seq))
    return cases


def multiset_bound(r, s) -> float:
    """Σ_t min(#t in r, #t in w), maximised over the windows of min(2|r|, |s|) tokens, over |r|."""
    width = min(2 * len(r), len(s))
    cr = collections.Counter(r.tolist())
    return max(sum((cr & collections.Counter(s[i:i + width].tolist())).values())
               for i in range(len(s) - width + 1)) / len(r)


def test_naive_is_the_definition():
    rng = np.random.default_rng(1)
    r, s = list(b"ABCBDAB"), list(b"BDCABA")  # CLRS's example: LCS 4, and s is one window (|s| < 2|r|)
    assert naive_overlap(r, s) == textbook_overlap(r, s) == 4 / 7
    for _ in range(60):
        r, s = rng.integers(3, size=int(rng.integers(0, 6))), rng.integers(3, size=int(rng.integers(0, 14)))
        assert naive_overlap(r, s) == textbook_overlap(r.tolist(), s.tolist())


def test_overlaps_equal_naive():
    for refs, seq in random_cases():
        expect = [naive_overlap(r, seq) for r in refs]
        np.testing.assert_array_equal(overlaps(refs, seq), expect)
        assert overlap(refs[-1], seq) == expect[-1]


def test_leaking_equals_exact_decision():
    passed_on = {t: 0 for t in THRESHOLDS}  # references the bound passes to the exact combing
    for refs, seq in random_cases(seed=2):
        exact = overlaps(refs, seq)
        bound = np.array([multiset_bound(r, seq) for r in refs])
        assert (bound >= exact).all()
        for t in THRESHOLDS:
            np.testing.assert_array_equal(leaking(refs, seq, t), exact > t)
            passed_on[t] += int(((bound > t) & (exact <= t)).sum())
    assert min(passed_on.values()) > 10, passed_on


def test_window_bounds_are_multiset_intersections():
    rng = np.random.default_rng(3)
    for vocab in (2, 4, 50):
        text = rng.integers(vocab, size=120).astype(np.int16)
        refs = [rng.integers(vocab, size=int(m)) for m in rng.integers(1, 70, size=6)]
        in_ref = np.stack([np.bincount(r, minlength=vocab) for r in refs])
        window = np.array([min(2 * r.size, text.size) for r in refs])
        bounds = _window_bounds(in_ref, text, window)
        for r, w, got in zip(refs, window, bounds, strict=True):
            cr = collections.Counter(r.tolist())
            expect = [sum((cr & collections.Counter(text[i:i + w].tolist())).values())
                      for i in range(text.size - w + 1)]
            np.testing.assert_array_equal(got[:text.size - w + 1], expect)


def test_edge_cases():
    s = np.array([5, 6, 7, 5, 6])
    assert overlap(np.array([], np.int32), s) == 0.0
    assert overlap(np.array([-1, -1]), s) == 0.0
    assert overlap([6], s) == 1.0 and overlap([9], s) == 0.0
    assert overlap([5, 6], np.array([], np.int64)) == 0.0
    assert overlap([7, 5, 6, 9, 9, 9, 9], [7, 5, 6]) == naive_overlap([7, 5, 6, 9, 9, 9, 9], [7, 5, 6]) == 3 / 7
    assert overlap(np.array([5, -1, 7, -1], np.int8), np.array([5, 9, 7], np.uint16)) == 1.0
    assert overlap(np.array([5, 7], np.uint64), np.array([-1, 5, -3, 7], np.int16)) == 1.0
    assert overlap([5, 7], [5, 1, 1, 7]) == 1.0 and overlap([5, 7], [5, 1, 1, 1, 7]) == 0.5  # windows of 2|r| = 4
    padded = np.array([[5, 7, -1, -1], [-1, 6, -1, 5], [-1, -1, -1, -1]], np.int32)
    np.testing.assert_array_equal(overlaps(padded, s), overlaps([[5, 7], [6, 5], []], s))
    np.testing.assert_array_equal(overlaps(padded, s), [1.0, 1.0, 0.0])
    assert overlaps([], s).shape == (0,) and leaking([], s, 0.9).shape == (0,)
    np.testing.assert_array_equal(leaking(padded, s, 1.0), [False, False, False])
    np.testing.assert_array_equal(leaking(padded, s, 0.9), [True, True, False])
    assert leaking([[1, 2, 3]], [], 0.5).tolist() == [False]
    # On the threshold is not above it.
    assert overlap([1, 2, 3], [1, 2, 9]) == 2 / 3 and leaking([[1, 2, 3]], [1, 2, 9], 2 / 3).tolist() == [False]
    ten = np.arange(10)
    assert overlap(ten, np.r_[ten[:9], 99]) == 0.9 and leaking([ten], np.r_[ten[:9], 99], 0.9).tolist() == [False]
    assert leaking([ten], np.r_[ten[:9], 99], 0.8999).tolist() == [True]


def test_large_ids():
    """Ids past the lookup table are renumbered by binary search instead: same values."""
    for refs, seq in random_cases(seed=5)[::4]:
        shifted = [r + 2**40 for r in refs]
        np.testing.assert_array_equal(overlaps(shifted, seq + 2**40), overlaps(refs, seq))
        np.testing.assert_array_equal(leaking(shifted, seq + 2**40, 0.9), leaking(refs, seq, 0.9))


def test_long_sequence():
    """Over 2**15 distinct tokens and seaweed labels: the int32 paths."""
    rng = np.random.default_rng(6)
    seq = rng.permutation(10**6)[:40_000]
    substituted = np.r_[seq[39_000:39_010], 10**6, seq[39_011:39_020], 10**6 + 1]  # 19 of 21 in order
    refs = [substituted, seq[5:12], rng.integers(10**6, size=9)]
    got = overlaps(refs, seq)
    np.testing.assert_array_equal(got, [naive_overlap(r, seq) for r in refs])
    np.testing.assert_array_equal(got, [19 / 21, 1.0, 0.0])
    for t in THRESHOLDS:
        np.testing.assert_array_equal(leaking(refs, seq, t), got > t)


def test_bad_input():
    s = np.arange(10)
    for call, name in [(lambda: overlap([1, 2], s[None]), "sequence"),
                       (lambda: overlap([1.0, 2.0], s), "reference"),
                       (lambda: overlap(np.ones((2, 2), int), s), "reference"),
                       (lambda: overlaps([[1], [0.5]], s), r"references\[1\]"),
                       (lambda: overlaps(np.ones(3, int), s), "references"),
                       (lambda: leaking([[1]], s.astype(float), 0.9), "sequence"),
                       (lambda: leaking([[1]], s, 0.0), "max_overlap"),
                       (lambda: leaking([[1]], s, 1.5), "max_overlap"),
                       (lambda: leaking([[1]], s, float("nan")), "max_overlap")]:
        with pytest.raises(ValueError, match=name):
            call()


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """Token ids of real text: the embedded CPython-docs corpus under a 1000-token sentencepiece model."""
    docs = [d.text for d in embedded_corpus()[:80]]
    tok = Tokenizer(train_tokenizer(docs, str(tmp_path_factory.mktemp("spm") / "spm"), vocab_size=1000))
    ids = [np.array(tok.encode(d), np.int32) for d in docs]
    return [d for d in ids if d.size >= 2400]


def test_real_tokens(documents):
    rng = np.random.default_rng(4)
    assert len(documents) >= 4
    for doc, other in zip(documents[:4], documents[1:5], strict=True):
        seq = doc[:300]
        refs = [seq[100:228],  # inside the sequence: overlap 1
                seq[10:74],
                edited(seq[150:278], 0.05, 1000, rng),
                edited(seq[20:120], 0.2, 1000, rng),
                doc[240:368],  # straddles the sequence's end
                doc[1000:1128],  # the same document, elsewhere
                other[500:628]]  # another document
        got = overlaps(refs, seq)
        np.testing.assert_array_equal(got, [naive_overlap(r, seq) for r in refs])
        assert got[0] == got[1] == 1.0
        for t in THRESHOLDS:
            np.testing.assert_array_equal(leaking(refs, seq, t), got > t)
        # Training-sized: a 2048-token sequence and retrieved-like candidates (no naive at this size).
        seq = doc[:2048]
        starts = rng.integers(0, doc.size - 128, size=12)
        refs = [doc[s:s + 128] for s in starts] + [edited(doc[s:s + 128], 0.08, 1000, rng) for s in starts[:6]]
        refs += [other[s:s + 128] for s in rng.integers(0, other.size - 128, size=6)]
        got = overlaps(refs, seq)
        assert (got[:12][starts <= 2048 - 128] == 1.0).all()
        for t in THRESHOLDS:
            np.testing.assert_array_equal(leaking(refs, seq, t), got > t)
