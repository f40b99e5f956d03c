"""Packing tokenised documents into fixed-length language-modelling rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

# The fields of a packed row, each an int32 array of shape [seq_len], in storage order: the language-modelling
# fields, then the provenance of each input token (retrieval uses it to never retrieve a sequence's own text).
LM_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_weights", "documents", "doc_offsets")


def pack_documents(
    docs_tokens: Iterable[Sequence[int]], seq_len: int, bos_id: int, eos_id: int,
    doc_numbers: Iterable[int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Concatenates documents into one token stream and cuts it into rows of `seq_len` next-token pairs.

    Each document becomes [bos, *tokens, eos]; the stream is their concatenation, in order. Row i covers
    stream[i*L : i*L+L+1] (consecutive rows overlap by one token), so every stream token is an input exactly
    once, except the very last one when it would be alone in a row. Each yielded row holds int32 arrays of
    shape [L] (`LM_FIELDS`):

    - inputs:       stream[i*L : i*L+L]
    - targets:      stream[i*L+1 : i*L+L+1]
    - segment_ids:  1, 2, 3, ... for each document piece in the row, numbered afresh in every row; 0 = padding
    - positions:    index of the input inside its document piece in this row (0 at the row start and at every
                    document start)
    - loss_weights: 1 where the target is a real token of the input's document, else 0 (the bos that follows
                    an eos, and padding)
    - documents:    the number of the input's document: `doc_numbers[j]` for the j-th document (default j),
                    e.g. its index in the corpus; -1 = padding
    - doc_offsets:  the input's index in its document's [bos, *tokens, eos] (token t of the document is at
                    t + 1); -1 = padding

    The final row is padded (0 in the first five fields, -1 in the last two), or dropped when fewer than 2
    stream tokens remain for it (its only token was already the previous row's last target).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    # pending stream tokens, the index of the document of each one, its number and its offset in the document
    tokens: list[np.ndarray] = []
    doc_ids: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    pending = 0
    doc_numbers = iter(doc_numbers) if doc_numbers is not None else None
    for doc_index, doc in enumerate(docs_tokens):
        piece = np.empty(len(doc) + 2, dtype=np.int32)
        piece[0], piece[1:-1], piece[-1] = bos_id, doc, eos_id
        tokens.append(piece)
        doc_ids.append(np.full(piece.shape, doc_index, dtype=np.int64))
        numbers.append(np.full(piece.shape, doc_index if doc_numbers is None else next(doc_numbers), np.int32))
        offsets.append(np.arange(piece.size, dtype=np.int32))
        pending += piece.size
        if pending <= seq_len:
            continue
        stream = [np.concatenate(a) for a in (tokens, doc_ids, numbers, offsets)]
        num_rows = (stream[0].size - 1) // seq_len
        for start in range(0, num_rows * seq_len, seq_len):
            yield _make_row(*(a[start : start + seq_len + 1] for a in stream), seq_len)
        tokens, doc_ids, numbers, offsets = ([a[num_rows * seq_len :]] for a in stream)
        pending = tokens[0].size
    if pending >= 2:
        yield _make_row(*(np.concatenate(a) for a in (tokens, doc_ids, numbers, offsets)), seq_len)


def _make_row(tokens: np.ndarray, doc_ids: np.ndarray, numbers: np.ndarray, offsets: np.ndarray,
              seq_len: int) -> dict[str, np.ndarray]:
    """One row from `n` stream tokens (2 <= n <= L+1), their document indices, numbers and offsets; n < L+1
    pads the end."""
    n = tokens.size
    num_inputs = min(n, seq_len)
    input_docs = doc_ids[:num_inputs]
    target_docs = np.full(num_inputs, -1, dtype=np.int64)  # -1: no target (padding past the stream's end)
    target_docs[: n - 1] = doc_ids[1:n]

    starts = np.ones(num_inputs, dtype=bool)
    starts[1:] = input_docs[1:] != input_docs[:-1]
    index = np.arange(num_inputs)
    row = {name: np.zeros(seq_len, dtype=np.int32) for name in LM_FIELDS}
    row["inputs"][:num_inputs] = tokens[:num_inputs]
    row["targets"][: n - 1] = tokens[1:n]
    row["segment_ids"][:num_inputs] = np.cumsum(starts)
    row["positions"][:num_inputs] = index - np.maximum.accumulate(np.where(starts, index, 0))
    row["loss_weights"][:num_inputs] = input_docs == target_docs
    for name, values in (("documents", numbers), ("doc_offsets", offsets)):
        row[name][:] = -1
        row[name][:num_inputs] = values[:num_inputs]
    return row
