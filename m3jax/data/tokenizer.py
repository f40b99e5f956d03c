"""SentencePiece tokenizer: deterministic training from in-memory text and a small lossless wrapper.

Training uses identity normalisation without whitespace cleanup or a dummy prefix, plus byte fallback, so
`decode(encode(text)) == text` for any text (newlines and characters outside the vocabulary become byte
pieces). Special ids are fixed: pad=0, unk=1, bos=2, eos=3.

SentencePiece silently skips training lines longer than its `max_sentence_length` (4192 UTF-8 bytes), so longer
lines are cut into pieces under it (before a space where possible, never inside a character) and the number cut
is logged; its errors for an empty corpus or an impossible vocabulary size become `ValueError`s that say what to
change.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm
from etils import epath
from sentencepiece import sentencepiece_model_pb2

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece's default `max_sentence_length` (4192 bytes), which is left as it is (setting it, even to the
# default, changes the model file's bytes): SentencePiece skips longer training lines without an error.
MAX_LINE_BYTES = sentencepiece_model_pb2.TrainerSpec().max_sentence_length
MIN_VOCAB_SIZE = 4 + 256 + 1  # the special ids, the 256 byte-fallback pieces and at least one character

_log = logging.getLogger(__name__)


def split_long_line(line: str, max_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """`line` cut into pieces of at most `max_bytes` UTF-8 bytes that concatenate back to it: each cut is before
    the piece's last space, or, in a piece without one, after its last whole character."""
    data = line.encode("utf-8")
    pieces, start = [], 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: `end` is inside a character
            end -= 1
        space = data.rfind(b" ", start + 1, end + 1)  # the next piece starts with the space, as "▁word" pieces do
        end = space if space > start else end
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    pieces.append(data[start:].decode("utf-8"))
    return pieces


class _TrainingLines:
    """The "sentences" SentencePiece trains on: each non-blank line of each text, a line over MAX_LINE_BYTES cut
    by `split_long_line` (SentencePiece would skip it). Counts the lines and the cut ones as it is iterated, and
    keeps an error of `texts` (SentencePiece turns it into a RuntimeError of its own)."""

    def __init__(self, texts: Iterable[str]):
        self._texts = texts
        self.num_lines = self.num_split = self.num_pieces = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self._texts:
                for line in text.splitlines():
                    if not line.strip():
                        continue
                    self.num_lines += 1
                    if len(line) > MAX_LINE_BYTES // 4 and len(line.encode("utf-8")) > MAX_LINE_BYTES:
                        pieces = split_long_line(line)
                        self.num_split += 1
                        self.num_pieces += len(pieces)
                        yield from pieces
                    else:
                        yield line
        except Exception as e:
            self.error = e
            raise


def _library_message(e: RuntimeError) -> str:
    """SentencePiece's error text without its source location and failed check ("INTERNAL: src/x.cc(1) [...]")."""
    return re.sub(r"^INTERNAL: (src/\S+\(\d+\) \[.*?\])?", "", str(e)).strip()


def _training_error(e: RuntimeError, lines: _TrainingLines, vocab_size: int) -> Exception:
    """SentencePiece's error as ours: a ValueError that says what to change, else a RuntimeError."""
    message = str(e)
    if lines.num_lines == 0 or "!sentences_.empty()" in message:
        return ValueError("no text to train the tokenizer on: the corpus is empty or all its lines are blank")
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return ValueError(
            f"vocab_size={vocab_size} is larger than this corpus supports (at most {m[1]}): lower "
            "--vocab_size, or train on more text"
        )
    if m := re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message):
        return ValueError(
            f"vocab_size={vocab_size} is too small for this corpus: its characters, the 4 special ids "
            f"and the 256 byte pieces need at least {m[1]}: raise --vocab_size"
        )
    return RuntimeError(f"SentencePiece could not train the tokenizer: {_library_message(e) or message}")


def train_tokenizer(texts: Iterable[str], out_prefix: str, vocab_size: int, model_type: str = "bpe") -> str:
    """Trains a tokenizer on `texts` and writes `{out_prefix}.model` (and a readable `.vocab`; a local prefix or a
    `gs://` one); returns the model path.

    Single-threaded and fed in order, so the same texts always give a byte-identical model file. The model
    is serialised through a writer rather than `model_prefix`, so the output path is not recorded in it.
    Raises ValueError for a vocab_size below MIN_VOCAB_SIZE, an empty corpus, or a vocab_size the corpus cannot
    fill; lines over MAX_LINE_BYTES are trained on in pieces, and their number is logged (a warning).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} (4 special ids, "
            "256 byte pieces and the corpus's characters)"
        )
    lines = _TrainingLines(texts)
    model = io.BytesIO()
    try:
        _train(lines, model, vocab_size, model_type)
    except Exception as e:
        if lines.error is not None:  # reading the texts failed: that error, not SentencePiece's wrapper of it
            raise lines.error from None
        if isinstance(e, RuntimeError):
            raise _training_error(e, lines, vocab_size) from e
        raise
    if lines.num_split:
        _log.warning(
            "train_tokenizer: %d of %d lines were longer than SentencePiece's limit of %d bytes (it skips "
            "such lines): cut into %d pieces to train on",
            lines.num_split,
            lines.num_lines,
            MAX_LINE_BYTES,
            lines.num_pieces,
        )
    model_path = epath.Path(f"{out_prefix}.model")  # a local file or a gs:// object
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = (f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n" for i in range(processor.vocab_size()))
    epath.Path(f"{out_prefix}.vocab").write_text("".join(vocab), encoding="utf-8")
    return str(model_path)


def _train(lines: Iterable[str], model: io.BytesIO, vocab_size: int, model_type: str) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
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


class Tokenizer:
    """A loaded SentencePiece model; `sha256` identifies the exact model file (it tags data, memory banks)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            model = epath.Path(self.path).read_bytes()  # a local file or a gs:// object
        except OSError as e:
            raise FileNotFoundError(f"cannot read tokenizer model {self.path}: {e.strerror or e}") from e
        if not model:
            raise ValueError(f"{self.path} is empty, not a SentencePiece model")
        self._processor = spm.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(model)
        except RuntimeError as e:
            reason = _library_message(e) or "its bytes do not parse as one"
            raise ValueError(f"{self.path} is not a SentencePiece model: {reason}") from e
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
