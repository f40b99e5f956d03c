"""Trains the SentencePiece tokenizer on a corpus.

    python tools/train_tokenizer.py --corpus=embedded --out=runs/demo/tokenizer/spm --vocab_size=8192
"""



import sys

from absl import app, flags

from m3jax.data.corpus import load_corpus
from m3jax.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer

_CORPUS = flags.DEFINE_string("corpus", "embedded", '"embedded", or comma-separated text/JSONL paths/globs.')
_OUT = flags.DEFINE_string("out", None, "Model prefix, local or gs://: writes <out>.model and <out>.vocab.",
                           required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size, special and byte pieces included.",
                                   lower_bound=MIN_VOCAB_SIZE)
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model type.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        docs = load_corpus(_CORPUS.value)
        path = train_tokenizer((d.text for d in docs), _OUT.value, _VOCAB_SIZE.value, _MODEL_TYPE.value)
    except (OSError, ValueError) as e:  # no corpus, no text in it, a vocab_size it cannot support
        sys.exit(f"train_tokenizer: {e}")
    tokenizer = Tokenizer(path)
    print(f"trained on {len(docs)} documents: vocab_size={tokenizer.vocab_size} sha256={tokenizer.sha256}")
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
