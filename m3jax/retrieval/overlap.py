"""The leakage filter of Memory3 (Yang et al., arXiv 2407.01178, eq. 6): how much of a reference a text contains.

On token ids, with LCS the longest common subsequence,

    overlap(r, s) = max over windows w of s of at most 2|r| consecutive tokens of LCS(r, w) / |r|.

Training drops a retrieved reference whose overlap with the training sequence is above 0.9; evaluation drops one
whose overlap with the question is above 2/3. LCS only grows with the window, so the windows of exactly
L = min(2|r|, |s|) tokens suffice. Negative ids are padding and are dropped first; an empty reference has
overlap 0.

Exact values (`overlap`, `overlaps`) come from seaweed combing, the semi-local LCS of Tiskin ("Semi-local string
comparison: algorithmic techniques and applications", 2008). In the |r| x |s| grid of cells (i, j), one seaweed
enters at each cell of the left and of the top edge and leaves at the bottom or the right edge. In a cell whose
tokens match, the two seaweeds entering it turn: the one from the left leaves downwards. In any other cell they
cross, unless they have crossed before. Then LCS(r, s[i:j]) = (j − i) − #{seaweeds from top column k to bottom
column l with i ≤ k ≤ l < j}. A seaweed from k to l with l − k < L takes one off each window of L tokens that
starts in [l − L + 1, k], so one combing, |r| · |s| cell steps, gives the LCS of every window. The cells of an
anti-diagonal are independent, so the combing is |r| + |s| − 1 numpy steps over [cells of the diagonal,
references]: all the references checked against one sequence are combed together.

Decisions (`leaking`) are filtered first. The multiset intersection Σ_t min(#t in r, #t in w) bounds LCS(r, w)
from above, so a window whose bound is at most max_overlap · |r| cannot leak. Each tier runs only on what the
previous one passed:
1. the number of r's tokens that occur in s at all, which bounds every window's bound: O(|r|) per reference;
2. the bound of every window, O(|s|) per reference: position p of s counts in a window iff the window holds p
   but not q, the (#s[p] in r)-th previous occurrence of s[p] (q = p if s[p] is not in r). The pairs (q, p)
   that are less than L apart take one off each window holding both, the count that seaweeds k → l take off
   the LCS, and both are done by the same two prefix sums;
3. the exact combing of r against each stretch of s covered by windows that passed tier 2.
The decision equals `overlaps(...) > max_overlap`: the bound is compared in the same float64 as the exact value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_REF_PAD = -1  # never matches: a padding slot or a reference token that is not in the sequence
_TEXT_PAD = -2  # never matches: a text slot past the sequence's end
_LOOKUP_IDS = 1 << 20  # ids below this are renumbered through a lookup table, larger ones by binary search
_BLOCK_CELLS = 1 << 17  # elements of the [rows, n] or [rows, reference tokens] arrays of one block of rows
_FAR = 1 << 30  # a position further than any window from every position


def overlap(reference: np.ndarray, sequence: np.ndarray) -> float:
    """The exact eq. 6 overlap of one reference with one sequence (1-D integer token ids)."""
    return float(overlaps([_ids(reference, "reference")], sequence)[0])


def overlaps(references: Sequence[np.ndarray] | np.ndarray, sequence: np.ndarray) -> np.ndarray:
    """Exact overlaps [m] (float64) of m references with one sequence.

    `references` is a sequence of 1-D integer arrays or a 2-D integer array whose rows may be padded with −1.
    """
    refs, lengths = _pack(references)
    seq = _ids(sequence, "sequence")
    refs, text, _ = _compact(refs, seq)
    window = np.minimum(2 * lengths, text.size)
    out = np.zeros(lengths.size)
    rows = np.flatnonzero(window > 0)  # an empty reference or sequence has overlap 0
    best = _max_window_lcs(refs[rows], lengths[rows], text[None], window[rows], text.size - window[rows] + 1)
    out[rows] = best / lengths[rows]
    return out


def leaking(references: Sequence[np.ndarray] | np.ndarray, sequence: np.ndarray, max_overlap: float) -> np.ndarray:
    """Which references leak [m] (bool): overlap(reference, sequence) > max_overlap, filtered by the multiset
    bounds before any exact combing. Equal to `overlaps(references, sequence) > max_overlap`."""
    if not 0 < max_overlap <= 1:
        raise ValueError(f"max_overlap must be in (0, 1], got {max_overlap}")
    refs, lengths = _pack(references)
    seq = _ids(sequence, "sequence")
    refs, text, num_tokens = _compact(refs, seq)
    need = _min_leaking_lcs(lengths, max_overlap)  # [m] the least LCS whose overlap is above max_overlap
    out = np.zeros(lengths.size, bool)
    rows = np.flatnonzero((refs >= 0).sum(1) >= need)  # tier 1: the reference's tokens found in the sequence
    if rows.size == 0:
        return out
    in_ref = _histograms(refs[rows], num_tokens)  # [rows, tokens of the sequence]
    window = np.minimum(2 * lengths[rows], text.size)
    bound = _window_bounds(in_ref, text, window)  # [rows, window starts] tier 2
    passed = bound >= need[rows, None]
    hit, start = np.nonzero(passed)  # sorted by row, then window start
    if hit.size == 0:
        return out
    # Tier 3 jobs: runs of passed windows of one row, split where the gap exceeds the window.
    new = np.ones(hit.size, bool)
    new[1:] = (hit[1:] != hit[:-1]) | (start[1:] - start[:-1] > window[hit[1:]])
    first = np.flatnonzero(new)
    job_row, job_start = hit[first], start[first]
    n_windows = start[np.append(first[1:], hit.size) - 1] - job_start + 1
    job_window = window[job_row]
    span = n_windows + job_window - 1
    padded = np.concatenate([text, np.full(span.max(), _TEXT_PAD, text.dtype)])
    texts = padded[job_start[:, None] + np.arange(span.max())]  # [jobs, longest span]
    ref_row = rows[job_row]
    best = _max_window_lcs(refs[ref_row], lengths[ref_row], texts, job_window, n_windows)
    out[ref_row[best >= need[ref_row]]] = True
    return out


def _ids(x: np.ndarray, name: str) -> np.ndarray:
    """1-D integer token ids without their padding (negative ids), as int64."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D token ids, got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {x.dtype}")
    x = x.astype(np.int64)
    return x[x >= 0]


def _pack(references: Sequence[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """References as [m, longest] int64 rows, left-aligned and padded with −1, and their lengths [m]."""
    if isinstance(references, np.ndarray):
        if references.ndim != 2 or (references.size and not np.issubdtype(references.dtype, np.integer)):
            raise ValueError(f"references must be a 2-D integer array or a sequence of 1-D arrays, got "
                             f"shape {references.shape} dtype {references.dtype}")
        keep = references >= 0
        lengths = keep.sum(1)
        packed = references.astype(np.int64)
        if (keep[:, 1:] & ~keep[:, :-1]).any():  # padding before a token: move each row's tokens left
            packed = np.take_along_axis(packed, np.argsort(~keep, axis=1, kind="stable"), 1)
        packed[np.arange(packed.shape[1]) >= lengths[:, None]] = _REF_PAD
    else:
        rows = [_ids(r, f"references[{i}]") for i, r in enumerate(references)]
        lengths = np.array([r.size for r in rows], np.int64)
        packed = np.full((len(rows), int(lengths.max(initial=0))), _REF_PAD, np.int64)
        for i, r in enumerate(rows):
            packed[i, :r.size] = r
    return packed, lengths.astype(np.int64)


def _compact(refs: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids renumbered 0..u − 1 by the sequence's u distinct tokens: the references [m, longest] (−1 for
    padding and tokens not in the sequence), the sequence [n], and u."""
    tokens, text = np.unique(seq, return_inverse=True)
    dtype = np.int16 if tokens.size < 2**15 else np.int32
    if tokens.size and tokens[-1] >= _LOOKUP_IDS:
        at = np.minimum(np.searchsorted(tokens, refs), tokens.size - 1)
        found = np.where(tokens[at] == refs, at, _REF_PAD)
    else:
        past = int(tokens[-1]) + 1 if tokens.size else 0
        table = np.full(past + 1, _REF_PAD, dtype)  # its last entry takes padding (−1) and ids past the sequence's
        table[tokens] = np.arange(tokens.size)
        found = table[np.minimum(refs, past)]
    return found.astype(dtype), text.astype(dtype), tokens.size


def _min_leaking_lcs(lengths: np.ndarray, max_overlap: float) -> np.ndarray:
    """The least integer x with x / length > max_overlap in float64, per length (length + 1 for none, 1 for an
    empty reference, which never leaks)."""
    safe = np.maximum(lengths, 1)
    x = np.maximum(np.floor(safe * max_overlap).astype(np.int64) - 1, 0)  # at most one below the answer
    for _ in range(3):
        x = np.where(x / safe > max_overlap, x, x + 1)
    return np.where(lengths > 0, x, 1)


def _histograms(refs: np.ndarray, num_tokens: int) -> np.ndarray:
    """How often each of the sequence's distinct tokens occurs in each reference: [m, num_tokens]."""
    m = refs.shape[0]
    slot = np.where(refs >= 0, refs, num_tokens) + (num_tokens + 1) * np.arange(m)[:, None]
    counts = np.bincount(slot.ravel(), minlength=m * (num_tokens + 1)).reshape(m, num_tokens + 1)
    return counts[:, :num_tokens].astype(np.int32)


def _window_bounds(in_ref: np.ndarray, text: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Multiset-intersection bound of every window: [rows, n − min(window) + 1], entry i = Σ_t min(#t in
    reference, #t in text[i:i + window]), 0 past a row's last window.

    Position p counts in window i iff it lies in the window and its k-th previous occurrence q does not, where
    k = #text[p] in the reference (q = p if k = 0): the bound is `_window_values` of the pairs (q, p). Both ends
    of a pair are found by lookup, p from q as q's k-th next occurrence (the same token, so the same k)."""
    n = text.size
    p = np.arange(n, dtype=np.int32)
    reach = max(int(in_ref.max(initial=0)), 1)
    rank = np.empty(n, np.int32)
    rank[np.argsort(text, kind="stable")] = p
    # Each token's positions in order, between blocks of `reach` far-away sentinels: the k-th previous
    # occurrence of p is before[slot[p] − k], the k-th next after[slot[p] + k].
    slot = rank + (text.astype(np.int32) + 1) * reach
    before = np.full(n + (in_ref.shape[1] + 1) * reach, -_FAR, np.int32)
    before[slot] = p
    after = np.where(before == -_FAR, _FAR, before)
    out = np.zeros((in_ref.shape[0], n - int(window.min()) + 1), np.int32)
    rows = max(1, _BLOCK_CELLS // n)
    for b in range(0, in_ref.shape[0], rows):
        k, w = in_ref[b:b + rows, text], window[b:b + rows]  # [rows, n], [rows]
        by_end = p - before[slot - k] < w[:, None]  # [rows, n] marks p of the pairs (q, p) less than w apart
        by_start = after[slot + k] - p < w[:, None]  # [rows, n] marks q
        values = _window_values(by_end, by_start, w, n - w + 1)
        out[b:b + rows, :values.shape[1]] = values
    return out


def _max_window_lcs(refs: np.ndarray, lengths: np.ndarray, texts: np.ndarray, window: np.ndarray,
                    n_windows: np.ndarray) -> np.ndarray:
    """Best window LCS [rows]: max over i < n_windows of LCS(refs[r, :lengths[r]], texts[r, i:i + window[r]]).

    refs [rows, longest] with −1 for padding; texts [rows or 1, n] (one text shared by every row). Rows are
    combed in blocks of similar reference and text length, each block trimmed to its longest."""
    best = np.zeros(lengths.size, np.int64)
    if lengths.size == 0:
        return best
    span = window + n_windows - 1
    order = np.lexsort((span, window))
    block = max(1, _BLOCK_CELLS // int(lengths.max()))
    for b in range(0, order.size, block):
        rows = order[b:b + block]
        longest, width = int(lengths[rows].max()), int(span[rows].max())
        top = _comb(refs[rows, :longest], texts[rows if texts.shape[0] > 1 else [0], :width])  # [rows, width]
        # LCS(ref, text[i:i + window]) = window − #{seaweeds k → l with i ≤ k ≤ l < i + window}
        by_end = (top >= 0) & (np.arange(width) - top < window[rows, None])
        by_start = np.zeros((rows.size, width + 1), bool)  # column k + 1 marks the seaweed from k; 0 the rest
        by_start[np.arange(rows.size)[:, None], (top + 1) * by_end] = by_end
        best[rows] = _window_values(by_end, by_start[:, 1:], window[rows], n_windows[rows]).max(1)
    return best


def _comb(refs: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Seaweed combing of refs [rows, m] against texts [rows or 1, n]: for each bottom column l, the top column
    where the seaweed leaving it entered, or −1 if it entered on the left. [rows, n]

    Seaweeds are labelled in order along the left edge bottom-up, then the top edge left to right (left row i:
    m − 1 − i, top column j: m + j). Two seaweeds meeting in a cell have crossed before iff the one from the left
    has the larger label. The grid is swept by anti-diagonals d = i + j; the vertical seaweeds are kept with the
    columns reversed, so a diagonal's cells are contiguous slices of both [m, rows] and [n, rows]."""
    rows, m = refs.shape
    n = texts.shape[1]
    label = np.int16 if m + n < 2**15 else np.int32
    a = np.ascontiguousarray(refs.T)  # [m, rows]
    b = np.ascontiguousarray(texts[:, ::-1].T)  # [n, rows or 1], b[n - 1 - j] = texts[:, j]
    left = np.repeat(np.arange(m - 1, -1, -1, dtype=label)[:, None], rows, 1)  # [m, rows] leaving row i rightwards
    down = np.repeat(np.arange(m + n - 1, m - 1, -1, dtype=label)[:, None], rows, 1)  # [n, rows] reversed columns
    new_left, match = np.empty_like(left), np.empty((m, rows), bool)
    for d in range(m + n - 1):
        lo, hi = max(0, d - n + 1), min(m, d + 1)  # rows i of the diagonal; its column j = d − i
        at = n - 1 - d  # reversed column of (i, d − i) is at + i
        h, v, t, s = left[lo:hi], down[at + lo:at + hi], new_left[:hi - lo], match[:hi - lo]
        np.equal(a[lo:hi], b[at + lo:at + hi], out=s)
        np.minimum(h, v, out=t)  # crossed before: they turn, the smaller label goes right; not: they cross
        np.copyto(t, v, where=s)  # a match: they turn
        v += h
        v -= t  # the other one goes down
        h[...] = t
    return down[::-1].T.astype(np.int32) - m


def _window_values(by_end: np.ndarray, by_start: np.ndarray, window: np.ndarray,
                   n_windows: np.ndarray) -> np.ndarray:
    """window − #{pairs (s, e) with i ≤ s ≤ e < i + window} for every window start i < n_windows: [rows, max
    n_windows] int32, 0 past a row's last window.

    The pairs of a row are given twice, as bool [rows, n] marks at their ends e (by_end) and at their starts s
    (by_start); a column ends at most one pair and starts at most one, and only pairs with e − s < window are
    marked. For those, s < i implies e < i + window, so the count is #{e ≤ i + window − 1} − #{s < i}: two prefix
    sums. Rows are taken in groups of one window length, so each group reads slices."""
    rows, n = by_end.shape
    col = np.arange(n)
    ends = np.cumsum(by_end, axis=1, dtype=np.int32)
    starts = np.zeros((rows, n + 1), np.int32)  # starts[:, i] = #{s < i}
    np.cumsum(by_start, axis=1, out=starts[:, 1:])
    out = np.zeros((rows, int(n_windows.max(initial=0))), np.int32)
    for w in np.unique(window):
        group = np.flatnonzero(window == w)
        last = int(n_windows[group].max())
        values = w - ends[group, w - 1:w - 1 + last] + starts[group, :last]  # [group, last]
        out[group, :last] = values * (col[:last] < n_windows[group, None])
    return out


def overlap_dp(reference: np.ndarray, sequence: np.ndarray) -> float:
    """The eq. 6 overlap by its definition, with the textbook LCS dynamic programme: a slow, independent reference
    for `overlap` (equal to it on every input), for checks and for timing the combing against.

    Token ids are cleaned as in `overlap` (negative ids dropped; an empty reference or sequence has overlap 0).
    Each window of exactly L = min(2|r|, |s|) tokens gets the quadratic table of LCS(r[:i], w[:j]) (windows of L
    tokens suffice: LCS only grows with the window), filled cell by cell,

        T[i][j] = max(T[i-1][j], T[i][j-1], T[i-1][j-1] + [r_i == w_j]),

    for all |s| − L + 1 windows at once (numpy over the windows): |r| · L steps, O(|r| · L · |s|) work.
    """
    r, s = _ids(reference, "reference"), _ids(sequence, "sequence")
    if r.size == 0 or s.size == 0:
        return 0.0
    width = min(2 * r.size, s.size)
    windows = np.lib.stride_tricks.sliding_window_view(s, width).T  # [width, windows]: windows[j] = w_j of each
    prev = np.zeros((width + 1, windows.shape[1]), np.int64)  # T[i - 1][0..width] of every window
    for token in r:
        row = np.zeros_like(prev)
        for j in range(1, width + 1):
            np.maximum(prev[j], row[j - 1], out=row[j])
            np.maximum(row[j], prev[j - 1] + (windows[j - 1] == token), out=row[j])
        prev = row
    return int(prev[width].max()) / r.size
