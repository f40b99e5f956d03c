"""Retrieval chunks of packed sequences, and the memory slots each chunk reads.

Chunks. A packed row holds pieces of several documents (its segments). Chunks never cross a document boundary:
each segment is cut into consecutive `chunk_size`-token chunks from its first token, and its last chunk holds
what is left (a *tail*, 1 … chunk_size tokens). Chunks are numbered in row order; chunk g is memory group g of
the model (`memory_group`, one per token, −1 = none). A row has at most `max_groups(seq_len, chunk_size)` groups:
ceil(L / C) for its full chunks plus a quarter more for tails. In the rare row with still more chunks (many short
documents), the chunks past the budget read no memory (group −1); `chunk_groups` reports how many tokens lost it.

A chunk retrieves with its own text. A chunk of fewer than `min_tokens` tokens (a short tail, or a document that
starts just before the row ends) retrieves nothing (its references are −1): its text says too little to search
with. It still reads, in the paper layout, the references of the chunks before it in its document.

Slots (the memories a group reads, `slot_index`), from each chunk's retrieved references `refs [G, R]`:
- "paper" (Memory3's training layout, R = 1): group g reads its own reference and those of the previous S − 1
  chunks of the same document, own first;
- "per_chunk": group g reads its own R references (R ≤ S).
Within a group a reference is read once (a repeat is an empty slot: reading a memory twice would double its weight
in the softmax). The row's unique references are listed once, sorted, −1 padded to G·R (`M`), and slots hold
indices into that list (−1 = empty), which is the layout of `m3jax.model.memory.Memory` (never a copy per chunk).
"""

from __future__ import annotations

import math

import numpy as np

LAYOUTS = ("paper", "per_chunk")


def max_groups(seq_len: int, chunk_size: int) -> int:
    """Memory groups per row: ceil(L / C) full chunks plus a quarter more for document tails."""
    full = math.ceil(seq_len / chunk_size)
    return full + math.ceil(full / 4)


def chunk_groups(segment_ids: np.ndarray, chunk_size: int, num_groups: int) -> tuple[np.ndarray, int]:
    """The chunk (memory group) of every token: segment_ids [..., L] -> (group [..., L] int32, lost).

    −1 on padding (segment 0) and on the chunks past `num_groups`; `lost` counts the real tokens of those.
    """
    seg = np.asarray(segment_ids)
    idx = np.arange(seg.shape[-1])
    starts = np.ones(seg.shape, bool)
    starts[..., 1:] = seg[..., 1:] != seg[..., :-1]
    seg_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
    real = seg > 0
    new_chunk = real & ((idx - seg_start) % chunk_size == 0)
    group = np.cumsum(new_chunk, axis=-1) - 1
    keep = real & (group < num_groups)
    return np.where(keep, group, -1).astype(np.int32), int(np.count_nonzero(real & ~keep))


def group_spans(group: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) of each group in one row: group [L] -> (starts [G], stops [G]); an unused group is [0, 0)."""
    group = np.asarray(group)
    idx = np.arange(group.shape[0])
    real = group >= 0
    starts = np.zeros(num_groups, np.int64)
    stops = np.zeros(num_groups, np.int64)
    counts = np.bincount(group[real], minlength=num_groups)
    firsts = np.full(num_groups, group.shape[0], np.int64)
    np.minimum.at(firsts, group[real], idx[real])
    used = counts > 0
    starts[used] = firsts[used]
    stops[used] = firsts[used] + counts[used]
    return starts, stops


def slot_index(refs: np.ndarray, group_segment: np.ndarray, layout: str, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Slots of each group and the row's unique references.

    refs [G, R] int (−1 = none), group_segment [G] (the segment of each group; 0 = unused) ->
    (unique [G·R] int32 sorted, −1 padded; index [G, slots] int32 into `unique`, −1 = empty). See the module
    docstring for the layouts.
    """
    refs = np.asarray(refs)
    num_groups, r = refs.shape
    if layout == "paper":
        if r != 1:
            raise ValueError(f"the paper layout retrieves 1 reference per chunk, got refs of shape {refs.shape}")
        g = np.arange(num_groups)[:, None] - np.arange(slots)[None, :]  # [G, S]: own, previous, ...
        same_doc = (g >= 0) & (group_segment[np.maximum(g, 0)] == group_segment[:, None])
        ids = np.where(same_doc, refs[np.maximum(g, 0), 0], -1)
    elif layout == "per_chunk":
        if r > slots:
            raise ValueError(f"{r} references per chunk do not fit {slots} slots")
        ids = np.full((num_groups, slots), -1, refs.dtype)
        ids[:, :r] = refs
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ids = np.where((group_segment > 0)[:, None], ids, -1)
    # a reference read twice by one group: keep its first slot
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    repeat = np.zeros_like(sorted_ids, bool)
    repeat[:, 1:] = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
    dup = np.zeros_like(repeat)
    np.put_along_axis(dup, order, repeat, axis=1)
    ids = np.where(dup, -1, ids)
    unique = np.unique(ids[ids >= 0])
    padded = np.full(num_groups * r, -1, np.int32)
    padded[: unique.size] = unique
    index = np.where(ids >= 0, np.searchsorted(unique, ids), -1).astype(np.int32)
    return padded, index
