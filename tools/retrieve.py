"""Retrieves the references of every 64-token chunk of a prepared split, for continued training with memory.

    python tools/retrieve.py --config=configs/demo.py --data=runs/demo/data --bank=runs/demo/bank \
        [--split=train] [--index=BANK/index] [--knowledge=embedded] [--out=DATA/retrieval-SPLIT]

For each record and each chunk (chunks never cross a document boundary: m3jax/memory/layout.py): the chunk's
text is embedded (`config.retrieval.embedder`, which must be the index's), `config.retrieval.candidates`
neighbours are searched, the leaking ones dropped, and the best `config.retrieval.refs_per_chunk` kept:
- references cut from the record's own text (the provenance filter). `--knowledge` (default: the data's corpus, the
  knowledge split of tools/prepare_data.py) must be both the knowledge base the bank was written from and the corpus
  the data was prepared from, by their digests (m3jax/retrieval/retrieve.py: `provenance_for`); anything else is
  refused, naming both. `--knowledge=''` turns the filter off, for a bank whose knowledge base shares no text with
  the training data (e.g. the entity task's); a warning says so, loudly when the bank was written from the data's
  own corpus;
- references whose overlap with the record (eq. 6) exceeds `config.retrieval.train_max_overlap`.
The ids go to `--out` in blocks of records (m3jax/retrieval/retrieve.py); several processes (jax.distributed)
take alternate blocks; a rerun finishes the missing blocks and refuses other inputs. `--bank`, `--index` and `--out`
may be `gs://` URLs.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from m3jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_DATA = flags.DEFINE_string("data", None, "A data directory written by tools/prepare_data.py.")
_SPLIT = flags.DEFINE_string("split", "train", "The split to retrieve for.")
_BANK = flags.DEFINE_string("bank", None, "The memory bank: a directory or a TensorStore kvstore URL.")
_INDEX = flags.DEFINE_string("index", "", "The bank's index directory or gs:// URL (default BANK/index).")
_KNOWLEDGE = flags.DEFINE_string("knowledge", None, "The knowledge base the bank was written from, which must be "
                                 "the data's corpus (the default); '' = no provenance filter, for a knowledge base "
                                 "that shares no text with the training data.")
_OUT = flags.DEFINE_string("out", "", "Output directory or gs:// URL (default DATA/retrieval-SPLIT).")
_BLOCK_RECORDS = flags.DEFINE_integer("block_records", 1024, "Records per output block (a new output only).",
                                      lower_bound=1)
_BATCH_RECORDS = flags.DEFINE_integer("batch_records", 64, "Records whose chunks are embedded and searched at once.",
                                      lower_bound=1)
_LOG_EVERY = flags.DEFINE_float("log_every_s", 10.0, "Seconds between progress lines (0: after every batch).",
                                lower_bound=0.0)


_PROGRESS = cli.progress("retrieve: ")


def main(argv):
    cli.start(argv)
    import jax  # after flag parsing, so jax picks up XLA_FLAGS set by launchers

    from m3jax import parallel
    from m3jax.config import validate
    from m3jax.data.records import read_metadata
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.memory import writer
    from m3jax.retrieval import build
    from m3jax.retrieval.embedder import Embedder
    from m3jax.retrieval.index import Index
    from m3jax.retrieval.retrieve import ChunkRetriever, RetrievalSettings, RetrievedIds, provenance_for, retrieve_split

    t0 = time.perf_counter()
    config = _CONFIG.value
    r = config.retrieval
    try:
        meta = read_metadata(_DATA.value)
        config.data.seq_len = meta["seq_len"]
        validate(config)
        if _SPLIT.value not in meta["splits"]:
            raise ValueError(f"split {_SPLIT.value!r} not in {_DATA.value} (splits: {sorted(meta['splits'])})")
        parallel.initialize_distributed(config.distributed)
        proc, nproc = jax.process_index(), jax.process_count()
        tokenizer = Tokenizer(meta["tokenizer_path"])
        if tokenizer.sha256 != meta["tokenizer_sha256"]:
            raise ValueError(f"{meta['tokenizer_path']} changed since {_DATA.value} was prepared (sha256 differs)")
        bank = build.open_bank(_BANK.value, tokenizer)
        record = writer.read_record(_BANK.value)
        if record is None:
            raise ValueError(f"the bank {_BANK.value} has no writer record ({writer.RECORD_KEY}): write it with "
                             "tools/write_memory.py")
        provenance = provenance_for(meta["corpus"] if _KNOWLEDGE.value is None else _KNOWLEDGE.value, tokenizer,
                                    bank.metadata["ref_len"], data_dir=_DATA.value, data_meta=meta,
                                    bank_path=_BANK.value, bank_record=record, log=_PROGRESS)
        index_dir = _INDEX.value or build.default_index_dir(_BANK.value)
        mesh = parallel.make_mesh(config.mesh, jax.local_devices())
        embedder = Embedder.from_config(r, mesh)
        index = Index.load(index_dir, expect_embedder=embedder.identity, expect_bank=build.bank_binding(bank))
        if index.num_vectors != bank.num_refs:
            raise ValueError(f"index {index_dir} holds {index.num_vectors:,} vectors, the bank {bank.num_refs:,} "
                             "references: rebuild it with tools/build_index.py")
        settings = RetrievalSettings.from_config(config)
        out = _OUT.value or os.path.join(_DATA.value, f"retrieval-{_SPLIT.value}")
        store = RetrievedIds.create(out, {
            "data": os.path.abspath(_DATA.value), "split": _SPLIT.value,
            "num_records": meta["splits"][_SPLIT.value]["num_records"], "seq_len": meta["seq_len"],
            "tokenizer_sha256": meta["tokenizer_sha256"], "bank": bank.path, "num_refs": bank.num_refs,
            "bank_checkpoint": bank.metadata["checkpoint"], "references_sha256": record["references_sha256"],
            "embedder": embedder.identity, "index": index.settings,
            "provenance": provenance is not None, "block_records": _BLOCK_RECORDS.value,
            "chunk_size": settings.chunk_size, "num_groups": settings.num_groups,
            "refs_per_chunk": settings.refs_per_chunk, "candidates": settings.candidates,
            "max_overlap": settings.max_overlap, "min_tokens": settings.min_tokens})
    except (ValueError, FileNotFoundError, KeyError) as e:  # BankMismatchError, IndexMismatchError: ValueErrors
        sys.exit(f"retrieve: {e}")

    retriever = ChunkRetriever(settings, tokenizer, embedder.embed, index.search, bank.read_tokens, provenance)
    s = retrieve_split(store, _DATA.value, _SPLIT.value, retriever, process_index=proc, process_count=nproc,
                       batch_records=_BATCH_RECORDS.value, log=_PROGRESS, log_every_s=_LOG_EVERY.value)
    by_provenance = f"{s['dropped_provenance']:,} by provenance" if provenance else "none by provenance (NO FILTER)"
    print(f"retrieve: process {proc} of {nproc}: {s['records']:,} records ({s['blocks']} blocks), {s['chunks']:,} "
          f"chunks, {s['queries']:,} searched, dropped {by_provenance} and "
          f"{s['dropped_overlap']:,} by overlap, {s['empty_refs']:,} chunks without a reference; "
          f"{s['seconds']:.1f} s ({s['records_per_s']:,.2f} records/s)", flush=True)
    cli.barrier("retrieve_done")
    if proc == 0:
        missing = store.missing_blocks()
        state = "complete" if not missing else f"INCOMPLETE: {len(missing)} blocks missing"
        print(f"retrieve: {store.directory}: {store.num_records:,} records, {state}; "
              f"{time.perf_counter() - t0:.1f} s in all", flush=True)
        if missing:
            sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "data", "bank"])
    app.run(main)
