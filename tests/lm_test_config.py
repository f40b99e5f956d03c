"""A tiny float32 language model on the test data (used in-process by conftest.lm_config and by CLI tests)."""

from m3jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "test"
    c.model.update(vocab_size=-1, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=128, dtype="float32")
    c.data.seq_len = 64
    c.data.global_batch_size = 16
    c.optimizer.update(peak_lr=1e-2, warmup_steps=2, decay_fraction=0.2)
    c.train.update(num_steps=20, log_every=1, eval_every=0, eval_batches=2, checkpoint_every=1000)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
