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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory):
    """A 1000-token sentencepiece model and 64-token packed data of the embedded corpus, built once."""
    from m3jax.data.corpus import embedded_corpus
    from m3jax.data.prepare import prepare
    from m3jax.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("lm_data")
    spm = train_tokenizer((d.text for d in embedded_corpus()), str(root / "spm"), vocab_size=1000)
    prepare("embedded", spm, str(root / "data"), seq_len=64, heldout_fraction=0.05, num_shards=2)
    return str(root / "data")


def lm_config(data_dir, *, num_steps, eval_every=0, stop_at=0, mesh=None, init_from=""):
    """tests/lm_test_config.py pointed at `data_dir`, with the run length and mesh of one test."""
    import lm_test_config

    c = lm_test_config.get_config()
    c.data.path = data_dir
    c.init_from = init_from
    c.train.update(num_steps=num_steps, stop_at=stop_at, eval_every=eval_every or num_steps)
    c.train.checkpoint_every = num_steps
    if mesh:
        c.mesh.update(mesh)
    return c
