"""Builds the retrieval index of a memory bank: every reference embedded, one ScaNN searcher over the vectors.

    python tools/build_index.py --config=configs/demo.py --bank=runs/demo/bank \
        --tokenizer=runs/demo/tokenizer/spm.model [--index=BANK/index] [--config.retrieval.index=tree_ah ...]

- The embedder is `config.retrieval.embedder` (a local Hugging Face directory, or the packaged
  all-MiniLM-L6-v2); the index kind and its settings are `config.retrieval.*` (auto: brute force up to
  `brute_force_max` references, tree + asymmetric hashing + exact reorder above).
- A reference's text is its stored tokens decoded by `--tokenizer`, which must be the one that wrote the bank.
  An incomplete bank is refused, naming how many references are unwritten.
- The index is saved in `--index` (default BANK/index) with the embedder's identity: retrieval with another
  embedder, or for a bank whose texts changed, is refused. The vectors stay in `INDEX-vectors/` (blocks, each with
  a record of the texts it embedded): a rebuild with other index settings does not embed again, and a rerun embeds
  only the missing blocks and those whose references were written again with other tokens.
- Several processes (jax.distributed: `--config.distributed.*`, SLURM, TPU pods) each embed their share of the
  blocks on their own devices; process 0 builds and saves the searcher.
- `--bank` and `--index` may be `gs://` URLs (the default index, and the vectors beside it, are then in the bucket).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags
from ml_collections import config_flags

from m3jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_BANK = flags.DEFINE_string("bank", None, "The memory bank: a directory or a TensorStore kvstore URL.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The SentencePiece model that wrote the bank.")
_INDEX = flags.DEFINE_string("index", "", "The index directory or gs:// URL (default BANK/index).")
_BLOCK_REFS = flags.DEFINE_integer("block_refs", 4096, "References per saved vector block.", lower_bound=1)
_LOG_EVERY = flags.DEFINE_float("log_every_s", 10.0, "Seconds between progress lines (0: after every block).",
                                lower_bound=0.0)


_PROGRESS = cli.progress("build_index: ")


def main(argv):
    cli.start(argv)
    import jax  # after flag parsing, so jax picks up XLA_FLAGS set by launchers

    from m3jax import parallel
    from m3jax.config import validate
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.retrieval import build
    from m3jax.retrieval.embedder import Embedder
    from m3jax.retrieval.index import IndexSettings

    t0 = time.perf_counter()
    config = _CONFIG.value
    r = config.retrieval
    try:
        validate(config)
        parallel.initialize_distributed(config.distributed)
        proc, nproc = jax.process_index(), jax.process_count()
        tokenizer = Tokenizer(_TOKENIZER.value)
        bank = build.open_bank(_BANK.value, tokenizer)
        index_dir = _INDEX.value or build.default_index_dir(_BANK.value)
        mesh = parallel.make_mesh(config.mesh, jax.local_devices())
        embedder = Embedder.from_config(r, mesh)
        blocks = build.VectorBlocks(build.vectors_dir(index_dir), num_refs=bank.num_refs,
                                    block_refs=_BLOCK_REFS.value, identity=embedder.identity)
        settings = IndexSettings.from_config(r)
    except (ValueError, FileNotFoundError, KeyError) as e:  # BankMismatchError is a ValueError
        sys.exit(f"build_index: {e}")

    try:
        s = build.embed_references(blocks, bank, tokenizer, embedder, process_index=proc, process_count=nproc,
                                   log=_PROGRESS, log_every_s=_LOG_EVERY.value)
    except ValueError as e:  # a damaged bank row (BankCorruptionError) names itself
        sys.exit(f"build_index: {e}")
    print(f"build_index: process {proc} of {nproc}: embedded {s['refs']:,} references ({s['blocks']} blocks; "
          f"{s['reused']} up to date) in {s['seconds']:.1f} s ({s['refs_per_s']:,.1f}/s) with "
          f"{embedder.identity['name']}", flush=True)
    cli.barrier("build_index_embedded")
    if proc == 0:
        t1 = time.perf_counter()
        try:
            index = build.build_index(blocks, embedder, settings, index_dir, bank=bank)
        except ValueError as e:
            sys.exit(f"build_index: {e}")
        print(f"build_index: {index_dir}: {index.num_vectors:,} vectors of {index.dim}, {index.settings}, built in "
              f"{time.perf_counter() - t1:.1f} s; {time.perf_counter() - t0:.1f} s in all", flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "bank", "tokenizer"])
    app.run(main)
