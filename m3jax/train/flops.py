"""FLOPs accounting and model FLOPs utilisation (MFU): the one place the formula lives.

Per trained token: 6·N, with N the matmul parameters (Transformer blocks + LM head; the embedding is a gather,
not a matmul), plus causal attention: the full T² term of QKᵀ and AV is 12·L·T·H·d per token for forward +
backward, and a causal mask halves it, so 6·L·T·H·d. Recompute under remat is not counted (it is not model work).
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
