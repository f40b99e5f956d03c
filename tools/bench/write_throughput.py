"""Memory write throughput (references/s) vs the model's own forward FLOP rate, measured in one run.

    python tools/bench/write_throughput.py [--preset=demo|100m --batch=64 --repeats=3 --dtype=float32 --bank]

The same batch of `--batch` references (`ref_len` = 128 tokens each, after a `--sink`-token sink, so every
sequence is sink + 128 tokens) goes through
- the plain forward: `Transformer(tokens, positions, segment_ids)` -> logits, every layer and the LM head;
- the encoder: `encode_references` (the layers up to the last memory layer, which stops at q/k/v, plus the top-k
  scoring of the memory heads and the gather of the kept key/values);
- with `--bank`, the encoder + writing its output to a local bf16 TensorStore bank (`MemoryBank.write`).
Model FLOPs per reference: the forward is 2·N_matmul·T + causal attention (`m3jax.train.flops`, the training
count / 3); the encoder is `m3jax.train.flops.write_flops_per_reference` (the layers it runs, causal
attention, the unmasked QKᵀ of the scoring). Printed: refs/s and the achieved FLOP/s of each, and the ratio
encoder FLOP rate / forward FLOP rate: the writer should run near the model's own forward speed (ratio ≈ 1).
The parameters are random (speed does not depend on them). Best of `--repeats` after one compile call.

Presets: `demo` is configs/demo.py's model (4 x 256, vocab 4096) with its memory settings (first half of the
layers = 2 memory layers, all 4 KV heads, k = 8); `100m` is the ~100M shape of the other benches (8 x 1024,
16 heads, 8 KV heads, MLP 2816, vocab 32000), memory first half. `--layers` etc. override a preset.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from configs import demo
from m3jax.memory.bank import MemoryBank, architecture
from m3jax.memory.encode import encode_references
from m3jax.model.config import ModelConfig
from m3jax.model.params import init_params, model_from
from m3jax.train.flops import train_flops_per_token, write_flops_per_reference

PRESETS = {
    "demo": dict(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4, head_dim=32, mlp_dim=704,
                 vocab_size=4096),
    "100m": dict(num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=8, head_dim=64, mlp_dim=2816,
                 vocab_size=32000),
}
_PRESET = flags.DEFINE_enum("preset", "demo", sorted(PRESETS), "model shape")
_LAYERS = flags.DEFINE_integer("layers", None, "override: layers")
_HIDDEN = flags.DEFINE_integer("hidden", None, "override: hidden size")
_MEMORY_LAYERS = flags.DEFINE_string("memory_layers", None, "override config.memory.layers (first_half, all, 0,2)")
_BATCH = flags.DEFINE_integer("batch", 64, "references per call")
_SINK = flags.DEFINE_integer("sink", 7, "sink tokens before each reference (<s>Reference: is 7 with the demo "
                             "tokenizer)")
_K = flags.DEFINE_integer("k", None, "tokens kept per memory head (default: config.memory.k)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per path (best is reported), after one compile call")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_BANK = flags.DEFINE_bool("bank", True, "also time encode + write to a local bf16 bank")


def bench_config() -> ModelConfig:
    """The preset's model with memory heads: its memory geometry (k, ref_len, ...) is the model config's."""
    c = demo.get_config()
    shape = dict(PRESETS[_PRESET.value])
    if _LAYERS.value:
        shape["num_layers"] = _LAYERS.value
    if _HIDDEN.value:
        shape["hidden_size"] = _HIDDEN.value
        shape["head_dim"] = _HIDDEN.value // shape["num_heads"]
    c.model.update(dtype=_DTYPE.value, **shape)
    mem = c.memory.copy_and_resolve_references()
    mem.heads = True
    if _MEMORY_LAYERS.value:
        mem.layers = _MEMORY_LAYERS.value
    if _K.value:
        mem.k = _K.value
    return ModelConfig.from_config(c.model, mem)


def best_times(paths: dict, repeats: int) -> dict[str, float]:
    """Best seconds of each callable over `repeats` rounds, after one compile call each. Rounds interleave the
    paths, so a load that changes during the run (a shared machine) hits them alike."""
    for fn in paths.values():
        jax.block_until_ready(fn())
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv):
    del argv
    cfg = bench_config()
    b, p, ref_len = _BATCH.value, _SINK.value, cfg.memory_ref_len
    t = p + ref_len
    params = jax.jit(init_params, static_argnums=(0, 1))(cfg, 0)
    rng = np.random.default_rng(0)
    sink = rng.integers(4, cfg.vocab_size, p).astype(np.int32)
    refs = rng.integers(4, cfg.vocab_size, (b, ref_len)).astype(np.int32)
    lengths = np.full(b, ref_len, np.int32)

    forward = jax.jit(lambda params, tokens, pos, seg: model_from(cfg, params)(tokens, pos, seg))
    last = max(cfg.memory_layers) + 1
    same_layers = jax.jit(lambda params, tokens, pos, seg: model_from(cfg, params).layer_qkv(tokens, pos, seg, last))
    seqs = np.concatenate([np.broadcast_to(sink, (b, p)), refs], axis=1)  # the encoder's sequences, as one batch
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    seg = np.ones((b, t), np.int32)
    args = jax.device_put((seqs, pos, seg))
    paths = {"forward": lambda: forward(params, *args),
             "encoder layers": lambda: same_layers(params, *args),
             "encode": lambda: encode_references(params, cfg, refs, lengths, sink)}
    write = write_flops_per_reference(cfg, sink_len=p)
    no_scoring = write_flops_per_reference(dataclasses.replace(cfg, memory_kv_heads=()), sink_len=p)
    flops = {"forward": train_flops_per_token(cfg, t) / 3 * t, "encoder layers": no_scoring, "encode": write}
    root = tempfile.mkdtemp(prefix="write_throughput_")
    try:
        if _BANK.value:
            arch = architecture(cfg)
            rows = b * (_REPEATS.value + 1)
            bank = MemoryBank.create(os.path.join(root, "bank"), num_refs=rows, architecture=arch,
                                     tokenizer_sha256="bench", checkpoint={"run_id": "bench", "step": 0},
                                     sink_tokens=sink.tolist(), codec="bf16", refs_per_shard=b)
            start = iter(range(0, rows, b))

            def encode_and_write():
                kv, kept = encode_references(params, cfg, refs, lengths, sink)
                bank.write(next(start), kv, kept, refs)
                return kv

            paths["encode + bank write"] = encode_and_write
            flops["encode + bank write"] = write
        timings = best_times(paths, _REPEATS.value)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; model {cfg.num_layers} layers x "
          f"{cfg.hidden_size} ({cfg.num_heads} heads, {cfg.num_kv_heads} KV heads, head_dim {cfg.head_dim}, MLP "
          f"{cfg.mlp_dim}, vocab {cfg.vocab_size}), {_DTYPE.value}; {cfg.param_counts()['matmul'] / 1e6:.1f}M matmul "
          "parameters")
    print(f"memory layers {list(cfg.memory_layers)}, memory KV heads {list(cfg.memory_kv_heads)}, k = {cfg.memory_k}; "
          f"batch {b} references x ({p} sink + {ref_len}) tokens; best of {_REPEATS.value}")
    print(f"\n{'path':<20} {'ms/batch':>9} {'refs/s':>9} {'GFLOP/ref':>10} {'GFLOP/s':>9}")
    rate = {}
    for name, s in timings.items():
        rate[name] = b * flops[name] / s
        print(f"{name:<20} {s * 1e3:>9.1f} {b / s:>9,.0f} {flops[name] / 1e9:>10.4f} {rate[name] / 1e9:>9.1f}")
    print(f"\nencoder / forward: {timings['forward'] / timings['encode']:.2f}x the references/s, "
          f"FLOP rate ratio {rate['encode'] / rate['forward']:.2f} (target ≈ 1)")
    layers = "encoder layers"
    print(f"encode / {layers} (the same layers' forward, without the scoring and gather): FLOP rate ratio "
          f"{rate['encode'] / rate[layers]:.2f}, time {timings['encode'] / timings[layers]:.2f}x")
    if "encode + bank write" in rate:
        print(f"with the bank write: FLOP rate ratio {rate['encode + bank write'] / rate['forward']:.2f}")


if __name__ == "__main__":
    app.run(main)
