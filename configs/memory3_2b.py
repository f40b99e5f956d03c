"""The paper's 2.4B Memory3 architecture (44 layers, 40 query / 8 KV heads of dim 80, hidden 3200, gated MLP
3200, vocabulary 60,299 padded to 60,416, sequence 2048), warm-up stage, FSDP over all devices.

With full remat it fits a v5p-128 slice: `python -m m3jax.train --config=configs/memory3_2b.py --dry_run
--topology=v5p:4x4x4` compiles the train step for its 64 chips and reports ~27 GiB of 95 GiB HBM per device
(splash attention, the loss in chunks of 512 positions; ~42 GiB with the XLA attention and a whole-sequence loss).
"""

from configs import warmup


def get_config():
    c = warmup.get_config()
    c.run_name = "memory3_2b_warmup"
    c.model.update(
        vocab_size=60299,
        vocab_multiple=128,
        num_layers=44,
        hidden_size=3200,
        num_heads=40,
        num_kv_heads=8,
        head_dim=80,
        mlp_dim=3200,
        rope_base=10000.0,
        dtype="bfloat16",
        remat="full",
        attention="auto",  # Pallas splash attention on TPU (m3jax/model/kernels.py), xla elsewhere
    )
    c.data.seq_len = 2048
    c.data.global_batch_size = 2048  # ~4M tokens per batch, as the paper
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
