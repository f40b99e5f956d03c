"""Writes the memory bank of a knowledge base with a checkpoint's parameters (Memory3 §3.1: "warm start").

    python tools/write_memory.py --config=configs/demo.py --checkpoint=runs/demo/train \
        --tokenizer=runs/demo/tokenizer/spm.model --knowledge=embedded --bank=runs/demo/bank \
        [--per_document] [--codec=bf16|int8] [--batch_size=64] [--config.memory.k=8 ...]

- `--knowledge`: "embedded" (CPython's documentation) or comma-separated text / JSONL ("text" field) paths or
  globs. Each document is cut into references of at most `config.memory.ref_len` tokens, ids in document order,
  then piece order (a document's short tail is a reference of its own): see m3jax/memory/knowledge.py. The bank's
  writer record keeps it and the digest of its texts: tools/retrieve.py checks its provenance filter with them.
- The model is `config.model` with the memory geometry of `config.memory` (memory layers, memory KV heads, k,
  ref_len, sink_text); `vocab_size=-1` is taken from the checkpoint. It must match the checkpoint's saved model
  config. `--checkpoint` is a run's workdir, its checkpoint directory (latest step) or one step directory; the
  bank records it as {run_id: the run's run_name, step}.
- `--per_document`: the paper's Remark 3, each document encoded in windows of `--doc_window` tokens whose
  key/values are cut into the same references.
- Several processes (jax.distributed: `--config.distributed.*`, or SLURM / TPU pod detection) each write their own
  slice of whole shards, on their own devices (`config.mesh` applied to the process's local devices).
- Resumable: rerun the same command; only unwritten references are encoded, and the bank ends byte-identical to
  an uninterrupted run's (same batch size and devices per process). An existing bank from another knowledge base,
  tokenizer, architecture, encoding or checkpoint is refused (`--allow_other_checkpoint` accepts a complete bank
  from another checkpoint as it is, writing nothing).
- `--checkpoint`, `--tokenizer`, `--knowledge` (paths and globs) and `--bank` may be `gs://` URLs.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags
from ml_collections import config_flags

from m3jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A run's workdir, its checkpoint directory or one step.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The SentencePiece model of the checkpoint's data.")
_KNOWLEDGE = flags.DEFINE_string("knowledge", None, '"embedded", or comma-separated text/JSONL paths or globs.')
_BANK = flags.DEFINE_string("bank", None, "The memory bank: a directory or a TensorStore kvstore URL.")
_PER_DOCUMENT = flags.DEFINE_bool("per_document", False, "Encode whole documents (in windows of --doc_window "
                                  "tokens) and cut their key/values into references (Remark 3).")
_DOC_WINDOW = flags.DEFINE_integer("doc_window", 0, "--per_document: tokens per forward of a document, a "
                                   "multiple of memory.ref_len; 0 = config.data.seq_len rounded down to one.",
                                   lower_bound=0)
_CODEC = flags.DEFINE_enum("codec", "bf16", ["bf16", "int8"], "How memories are stored.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "References per forward (per process).", lower_bound=1)
_REFS_PER_SHARD = flags.DEFINE_integer("refs_per_shard", 64, "References per bank shard (file); a new bank only.",
                                       lower_bound=1)
_ALLOW_OTHER = flags.DEFINE_bool("allow_other_checkpoint", False, "Accept an existing complete bank written by "
                                 "another checkpoint as it is (nothing is written).")
_LOG_EVERY = flags.DEFINE_float("log_every_s", 10.0, "Seconds between progress lines (0: after every batch).",
                                lower_bound=0.0)


_PROGRESS = cli.progress("write_memory: ")


def main(argv):
    cli.start(argv)
    import jax  # after flag parsing, so jax picks up XLA_FLAGS set by launchers

    from m3jax import parallel
    from m3jax.checkpoint import CheckpointError, load_model
    from m3jax.config import validate
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.memory import knowledge, writer
    from m3jax.memory.bank import architecture, bytes_per_reference

    t0 = time.perf_counter()
    config = _CONFIG.value
    mem = config.memory
    try:
        tokenizer = Tokenizer(_TOKENIZER.value)
        if not mem.heads:
            raise ValueError("config.memory.heads=False: a model without memory heads writes no memory")
        if _DOC_WINDOW.value and not _PER_DOCUMENT.value:
            raise ValueError("--doc_window is the window of --per_document encoding; give both or neither")
        window = _DOC_WINDOW.value or max(mem.ref_len, config.data.seq_len // mem.ref_len * mem.ref_len)
        if _PER_DOCUMENT.value and window % mem.ref_len:
            raise ValueError(f"--doc_window={window} is not a multiple of memory.ref_len={mem.ref_len}")
        window_refs = window // mem.ref_len if _PER_DOCUMENT.value else 1

        parallel.initialize_distributed(config.distributed)
        proc, nproc = jax.process_index(), jax.process_count()
        rules = tuple(tuple(r) for r in config.logical_axis_rules)
        mesh = parallel.make_mesh(config.mesh, jax.local_devices())
        writer.units_per_batch(_BATCH_SIZE.value, window_refs, writer.batch_shards(mesh, rules))

        loaded = load_model(_CHECKPOINT.value, config, mesh=mesh)  # vocab_size -1: the checkpoint's
        loaded.check_tokenizer(tokenizer.sha256, _TOKENIZER.value)
        if config.model.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the vocabulary "
                             f"({tokenizer.vocab_size}) of {_TOKENIZER.value}")
        validate(config)
        cfg, checkpoint = loaded.model_config, loaded.identity
        refs = knowledge.load_references(_KNOWLEDGE.value, tokenizer, mem.ref_len)
        sink = knowledge.sink_tokens(tokenizer, mem.sink_text)
        bank, writable = writer.open_for_writing(
            _BANK.value, refs, architecture=architecture(cfg), tokenizer_sha256=tokenizer.sha256,
            checkpoint=checkpoint, sink=sink, codec=_CODEC.value, refs_per_shard=_REFS_PER_SHARD.value,
            record=writer.writer_record(refs, window_refs, cfg.dtype, knowledge=_KNOWLEDGE.value),
            allow_other_checkpoint=_ALLOW_OTHER.value)
        if not writable:
            print(f"write_memory: {bank.path} is complete ({bank.num_refs:,} refs, written by checkpoint "
                  f"{bank.metadata['checkpoint']}); accepted as it is, nothing written")
            return
        _PROGRESS(f"{len(refs):,} references of {len(refs.doc_ids):,} documents "
                  f"({int(refs.lengths.sum()):,} tokens); checkpoint {checkpoint}; bank {bank.path}")
    except (CheckpointError, ValueError, FileNotFoundError) as e:  # BankMismatchError is a ValueError
        sys.exit(f"write_memory: {e}")

    s = writer.write_references(bank, loaded.params, cfg, refs, sink, batch_size=_BATCH_SIZE.value,
                                window_refs=window_refs, mesh=mesh, rules=rules, process_index=proc,
                                process_count=nproc, log_every_s=_LOG_EVERY.value, log=_PROGRESS)
    rate = f"{s['refs_per_s']:,.1f} refs/s" if s["refs_per_s"] else "-"
    if s["refs_per_s_after_first_batch"]:
        rate += f" ({s['refs_per_s_after_first_batch']:,.1f} after the first batch)"
    print(f"write_memory: process {proc} of {nproc}: wrote {s['refs']:,} refs of [{s['slice'][0]}, {s['slice'][1]}) "
          f"in {s['batches']} batches, {s['bytes'] / 1e6:,.2f} MB, {s['seconds']:.1f} s, {rate}", flush=True)
    cli.barrier("write_memory_done")
    if proc == 0:
        missing = sum(b - a for a, b in bank.unwritten_ranges())
        per_ref = sum(bytes_per_reference(bank.codec, bank.metadata["architecture"]).values())
        state = "complete" if not missing else f"INCOMPLETE: {missing:,} refs unwritten"
        print(f"write_memory: bank {bank.path}: {bank.num_refs:,} refs, {bank.num_refs * per_ref / 1e6:,.2f} MB, "
              f"{state}; {time.perf_counter() - t0:.1f} s in all", flush=True)
        if missing:
            sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "checkpoint", "tokenizer", "knowledge", "bank"])
    app.run(main)
