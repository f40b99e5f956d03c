"""SentencePiece tokenizer: deterministic training from in-memory text and a small lossless wrapper.

Training uses identity normalisation without whitespace cleanup or a dummy prefix, plus byte fallback, so
`decode(encode(text)) == text` for any text (newlines and characters outside the vocabulary become byte
pieces). Special ids are fixed: pad=0, unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on "sentences" and skips long ones, so each non-blank line is one sentence."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def train_tokenizer(texts: Iterable[str], out_prefix: str, vocab_size: int, model_type: str = "bpe") -> str:
    """Trains a tokenizer on `texts` and writes `{out_prefix}.model` (and a readable `.vocab`); returns the
    model path.

    Single-threaded and fed in order, so the same texts always give a byte-identical model file. The model
    is serialised through a writer rather than `model_prefix`, so the output path is not recorded in it.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    model_path = Path(f"{out_prefix}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = (f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n" for i in range(processor.vocab_size()))
    Path(f"{out_prefix}.vocab").write_text("".join(vocab), encoding="utf-8")
    return str(model_path)


class Tokenizer:
    """A loaded SentencePiece model; `sha256` identifies the exact model file (it tags data, memory banks)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            model = Path(self.path).read_bytes()
        except OSError as e:
            raise FileNotFoundError(f"cannot read tokenizer model {self.path}: {e.strerror}") from e
        self._processor = spm.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(model)
        except RuntimeError as e:
            raise ValueError(f"{self.path} is not a SentencePiece model: {e}") from e
        self._sha256 = hashlib.sha256(model).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        return self._processor.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text (encoded in parallel; -1 = all cores), without bos/eos."""
        return self._processor.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (a list or a 1-D integer array); special ids decode to nothing."""
        return self._processor.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    @property
    def sha256(self) -> str:
        return self._sha256
