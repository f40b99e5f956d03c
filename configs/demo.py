"""A small model that learns visibly on the embedded corpus in a few minutes on 2 CPU cores (`make demo`)."""

from configs import warmup


def get_config():
    c = warmup.get_config()
    c.run_name = "demo"
    c.model.update(
        vocab_size=-1,  # from the tokenizer that wrote the data
        num_layers=4,
        hidden_size=256,
        num_heads=8,
        num_kv_heads=4,
        head_dim=32,
        mlp_dim=704,
        rope_base=10000.0,
        dtype="float32",  # XLA on CPU is faster in float32
    )
    c.data.seq_len = 256
    c.data.global_batch_size = 16
    c.optimizer.update(peak_lr=3e-3, warmup_steps=20, decay_fraction=0.2, min_lr_ratio=0.05)
    c.train.update(num_steps=200, log_every=20, eval_every=50, eval_batches=6, checkpoint_every=100)
    return c
