"""The continued stage at CPU scale: configs/demo.py's model, read memory from the demo's bank.

    python -m m3jax.train --config=configs/continued_demo.py --workdir=runs/demo/continued \\
        --config.init_from=runs/demo/train/checkpoints --config.data.path=runs/demo/memory_data \\
        --config.memory.bank=runs/demo/bank

Bank mode: the memories the warm-up checkpoint wrote (tools/write_memory.py), gathered by the loader and decoded
on device; `--config.retrieval.mode=online` (with `memory.knowledge` and `data.tokenizer`) encodes them in the
step instead.
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.run_name = "demo_continued"
    c.memory.read = True
    c.retrieval.update(mode="bank", layout="paper", refs_per_chunk=1)
    c.optimizer.update(peak_lr=1e-3, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.05)
    # eval_batches=0: every held-out record is scored
    c.train.update(num_steps=150, log_every=10, eval_every=50, eval_batches=0, checkpoint_every=50)
    return c
