"""FLOPs accounting and model FLOPs utilisation (MFU): the one place the formula lives.

Per trained token: 6·N, with N the matmul parameters (Transformer blocks + LM head; the embedding is a gather,
not a matmul), plus causal attention: the full T² term of QKᵀ and AV is 12·L·T·H·d per token for forward +
backward, and a causal mask halves it, so 6·L·T·H·d. Recompute under remat is not counted (it is not model work).

Explicit memory (forward only, counted as the paper counts it): writing a reference is its forward through the
layers up to the last memory layer plus the top-k scoring; reading a memory is QKᵀ and AV over its k keys in
every memory head, per context token.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from m3jax.model.config import ModelConfig

# Dense bf16 peak FLOP/s per device for accelerators, by jax `device_kind` prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token (forward + backward) at sequence length `seq_len`."""
    n = cfg.param_counts()["matmul"]
    attention = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    return 6.0 * n + attention


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Best FLOP/s of an n³ matmul on the default device, measured now (the CPU's peak for MFU)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_peak_flops() -> float:
    """Peak FLOP/s of one device: the table for accelerators, a measured float32 matmul on CPU."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measure_matmul_flops()
    for prefix, peak in PEAK_FLOPS.items():
        if dev.device_kind.startswith(prefix):
            return peak
    raise ValueError(f"no peak FLOP/s known for device kind {dev.device_kind!r}; add it to PEAK_FLOPS")


def mfu(tokens_per_second: float, flops_per_token: float, num_devices: int, peak_per_device: float) -> float:
    return tokens_per_second * flops_per_token / (num_devices * peak_per_device)


def write_flops_per_reference(cfg: ModelConfig, sink_len: int = 0) -> float:
    """Forward of one `memory_ref_len`-token reference (+ `sink_len`) through the layers up to the last memory
    layer (which stops at its q/k/v projections), with causal attention (QKᵀ and AV, half the T² term), plus the
    unmasked top-k scoring QKᵀ of every memory layer's memory heads (the paper: ≈ 0.308 TFLOPs for 2.4B)."""
    if not cfg.has_memory:
        raise ValueError("the model has no memory heads: it writes no memory")
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    ref_len = cfg.memory_ref_len
    t = ref_len + sink_len
    full_layers = cfg.memory_layers[-1]
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    qkv = d * h * hd + 2 * d * kv * hd
    matmuls = 2 * t * (full_layers * per_layer + qkv)
    attention = full_layers * 2 * t * t * h * hd  # QKᵀ + AV = 4·T²·H·d, halved by the causal mask
    memory_q_heads = len(cfg.memory_kv_heads) * cfg.num_groups
    scoring = len(cfg.memory_layers) * 2 * ref_len * ref_len * memory_q_heads * hd
    return float(matmuls + attention + scoring)


def read_flops_per_token(cfg: ModelConfig) -> float:
    """One context token reading one memory: QKᵀ and AV over its `memory_k` keys, in every memory head of every
    memory layer (the query heads of the memory KV heads; the paper: 1.44e-4 TFLOPs per 64-token use)."""
    memory_q_heads = len(cfg.memory_kv_heads) * cfg.num_groups
    return float(len(cfg.memory_layers) * memory_q_heads * 4 * cfg.memory_k * cfg.head_dim)
