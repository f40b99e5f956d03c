"""Tokenises, packs and shards a corpus into train/heldout ArrayRecord splits plus metadata.json.

    python tools/prepare_data.py --tokenizer=runs/demo/tokenizer/spm.model --out=runs/demo/data

metadata.json names the corpus and records the digest of its texts (`corpus_sha256`): tools/retrieve.py filters by
provenance only with a bank written from that very corpus. The corpus and tokenizer may be `gs://` URLs; the output
directory is local (m3jax/data/records.py says how to mount a bucket).
"""

import sys

from absl import app, flags

from m3jax.data.prepare import prepare

_CORPUS = flags.DEFINE_string("corpus", "embedded", '"embedded", or comma-separated text/JSONL paths/globs.')
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model path.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output data directory.", required=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per packed row.", lower_bound=1)
_HELDOUT_FRACTION = flags.DEFINE_float("heldout_fraction", 0.02, "Fraction of documents held out, in [0, 1).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 4, "ArrayRecord shards per split.", lower_bound=1)
flags.register_validator("heldout_fraction", lambda f: 0.0 <= f < 1.0,
                         message="--heldout_fraction must be in [0, 1): a training split must remain")
_SEED = flags.DEFINE_integer("seed", 0, "Salt of the document -> split hash.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        meta = prepare(_CORPUS.value, _TOKENIZER.value, _OUT.value, seq_len=_SEQ_LEN.value,
                       heldout_fraction=_HELDOUT_FRACTION.value, num_shards=_NUM_SHARDS.value, seed=_SEED.value)
    except (OSError, ValueError) as e:  # an unreadable corpus or tokenizer, a bucket output (DataLocationError)
        sys.exit(f"prepare_data: {e}")
    for name, split in meta["splits"].items():
        print(
            f"{name}: {split['num_documents']} documents -> {split['num_records']} records of "
            f"{meta['seq_len']}, {split['num_tokens']} tokens ({split['num_loss_tokens']} with loss)"
        )
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
