"""Stage 1 of Memory3 pretraining: warm-up, ordinary language-model pretraining without memory.

AdamW (weight decay 0.1), warmup-stable-decay learning rate, bf16 compute with float32 parameters and optimiser
state, as in the paper. Point `data.path` at a directory from tools/prepare_data.py and size the model with
`--config.model.*` (or use configs/memory3_2b.py for the paper's 2.4B architecture).
"""

from m3jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "warmup"
    c.optimizer.schedule = "wsd"
    c.optimizer.weight_decay = 0.1
    c.optimizer.decay_fraction = 0.1
    c.model.dtype = "bfloat16"
    return c
