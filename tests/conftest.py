"""Test set-up: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from m3jax.config import base_config  # noqa: E402


def tiny_config(**model):
    """A small float32 config for fast tests."""
    c = base_config()
    c.model.update(vocab_size=300, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=96, dtype="float32")
    c.model.update(model)
    c.data.seq_len = 32
    c.data.global_batch_size = 8
    c.train.num_steps = 10
    c.optimizer.warmup_steps = 2
    return c


@pytest.fixture
def config():
    return tiny_config()
