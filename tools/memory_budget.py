"""What explicit memory costs for a config: bytes per memory and per bank (per codec), FLOPs to write and read.

    python tools/memory_budget.py --config=configs/memory3_2b.py --num_refs=110000000 [--json]
        [--processes=16 --global_batch=... --seq=... --memories_per_chunk=1 --sink_len=0]

The memory layers, memory heads, k, ref_len and chunk size come from `config.memory` (whether or not the run
reads memory: the warm-up config is the one that writes a bank). Printed:
- bytes per memory (the paper's figure: 450,560 for memory3_2b in bf16) and the whole bank: memories only, and on
  disk with positions, tokens, written flags and shard indexes (`m3jax.memory.bank.bytes_per_reference`);
- FLOPs to write one reference and to read one memory per token and per use (one chunk of `chunk_size` tokens),
  by the formulas of `m3jax.train.flops`, beside RAG's cost of putting the same reference in the context
  (2·N·ref_len, the paper: ≥ 0.624 TFLOPs);
- the memory bytes one training step moves to each host: (global batch / processes) sequences × chunks per
  sequence × unique memories per chunk (1 in the paper's layout: a chunk reads its own reference and the previous
  4 chunks'), with their positions.
"""

from __future__ import annotations

import json
import math

from absl import app, flags
from ml_collections import config_flags

from m3jax.memory.bank import architecture, bytes_per_reference, row_shape
from m3jax.memory.codecs import CODECS
from m3jax.model.config import ModelConfig
from m3jax.train.flops import read_flops_per_token, write_flops_per_reference

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_NUM_REFS = flags.DEFINE_integer("num_refs", None, "references in the bank", lower_bound=1)
_CODECS = flags.DEFINE_list("codecs", list(CODECS), "codecs to compare")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", None, "sequences per step (default: config.data)", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq", None, "tokens per sequence (default: config.data.seq_len)", lower_bound=1)
_PROCESSES = flags.DEFINE_integer("processes", 1, "hosts (JAX processes) sharing the batch", lower_bound=1)
_MEMORIES_PER_CHUNK = flags.DEFINE_float(
    "memories_per_chunk", 1.0, "unique memories per chunk a step moves (1 = the paper's training layout)")
_SINK_LEN = flags.DEFINE_integer("sink_len", 0, "sink tokens encoded with every reference (the paper counts 0)",
                                 lower_bound=0)
flags.register_validator("memories_per_chunk", lambda m: m > 0, message="--memories_per_chunk must be > 0")
_JSON = flags.DEFINE_bool("json", False, "print JSON instead of a table")


def budget(config, num_refs: int, codecs, *, global_batch: int, seq: int, processes: int,
           memories_per_chunk: float, sink_len: int) -> dict:
    mem = config.memory
    cfg = ModelConfig.from_config(config.model, mem)
    arch = architecture(cfg)
    chunks = math.ceil(seq / mem.chunk_size)
    memories_per_host = global_batch / processes * chunks * memories_per_chunk
    per_codec = {}
    for name in codecs:
        per_ref = bytes_per_reference(name, arch)
        memory = per_ref["memory"] + per_ref.get("scale", 0)
        per_codec[name] = {
            "bytes_per_memory": memory,
            "bank_memory_bytes": memory * num_refs,
            "bank_bytes_on_disk": sum(per_ref.values()) * num_refs,
            "step_bytes_per_host": memories_per_host * (memory + per_ref["positions"]),
        }
    read_token = read_flops_per_token(cfg)
    return {
        "config": {"memory_layers": list(cfg.memory_layers), "memory_kv_heads": list(cfg.memory_kv_heads),
                   "row_shape": list(row_shape(arch)), "k": mem.k, "ref_len": mem.ref_len,
                   "chunk_size": mem.chunk_size, "num_refs": num_refs},
        "codecs": per_codec,
        "flops": {
            "write_per_reference": write_flops_per_reference(cfg, sink_len),
            "read_per_token_per_memory": read_token,
            "read_per_use": read_token * mem.chunk_size,
            "rag_per_reference": 2.0 * cfg.param_counts()["non_embedding"] * mem.ref_len,
        },
        "step": {"global_batch": global_batch, "seq": seq, "processes": processes, "chunks_per_sequence": chunks,
                 "memories_per_chunk": memories_per_chunk, "memories_per_host": memories_per_host},
    }


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def render(b: dict) -> str:
    c, s, fl = b["config"], b["step"], b["flops"]
    layers = c["memory_layers"]
    if layers == list(range(layers[0], layers[-1] + 1)):
        layers = f"{layers[0]}..{layers[-1]}"
    lines = [f"memory {c['row_shape']} (layers, K/V, kv heads, k, head_dim); memory layers {layers}",
             f"bank of {c['num_refs']:,} references; training step: {s['global_batch']} x {s['seq']} tokens over "
             f"{s['processes']} process(es), {s['chunks_per_sequence']} chunks per sequence, "
             f"{s['memories_per_chunk']:g} unique memories per chunk = {s['memories_per_host']:,.0f} per host",
             "",
             f"{'codec':<6} {'bytes/memory':>13} {'bank (memory)':>26} {'bank (on disk)':>15} {'step/host':>12}"]
    for name, r in b["codecs"].items():
        bank = f"{_bytes(r['bank_memory_bytes'])} ({r['bank_memory_bytes'] / 2**40:,.2f} TiB)"
        lines.append(f"{name:<6} {r['bytes_per_memory']:>13,} {bank:>26} "
                     f"{_bytes(r['bank_bytes_on_disk']):>15} {_bytes(r['step_bytes_per_host']):>12}")
    lines += ["",
              f"write one reference:            {fl['write_per_reference']:.4g} FLOPs "
              f"({fl['write_per_reference'] / 1e12:.3f} TFLOPs)",
              f"read one memory, per token:     {fl['read_per_token_per_memory']:.4g} FLOPs",
              f"read one memory, per use:       {fl['read_per_use']:.4g} FLOPs ({c['chunk_size']} tokens)",
              f"RAG, the reference in context: {fl['rag_per_reference']:.4g} FLOPs "
              f"({fl['rag_per_reference'] / fl['read_per_use']:,.0f}x a memory read)"]
    return "\n".join(lines)


def main(argv):
    del argv
    config = _CONFIG.value
    b = budget(config, _NUM_REFS.value, _CODECS.value,
               global_batch=_GLOBAL_BATCH.value or config.data.global_batch_size, seq=_SEQ.value or config.data.seq_len,
               processes=_PROCESSES.value, memories_per_chunk=_MEMORIES_PER_CHUNK.value, sink_len=_SINK_LEN.value)
    print(json.dumps(b, indent=1) if _JSON.value else render(b))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "num_refs"])
    app.run(main)
