"""The continued stage at CPU scale: configs/demo.py's model, memories encoded in the step (online mode).

    python -m m3jax.train --config=configs/continued_demo.py --workdir=runs/demo/continued \\
        --config.init_from=runs/demo/train/checkpoints --config.data.path=runs/demo/memory_data \\
        --config.memory.knowledge=runs/demo/knowledge.jsonl --config.data.tokenizer=runs/demo/tokenizer/spm.model

Online mode with the encoding's gradient (`memory.encode_grad=True`), as configs/continued.py: the references'
memories are written by the parameters being trained, so the writer learns what to keep and the trained model
reads the bank its own checkpoint writes. Measured on the entity task (docs/continued.md, "What teaches a model to read
memory"): held-out accuracy 0.315 at k = 8 through the bank the final weights wrote, against 0.135 for bank mode
read through the warm-up's bank and 0.015 through a rewritten one. `--config.retrieval.mode=bank
--config.memory.bank=...` reads the warm-up checkpoint's bank instead (1.31x the warm-up step vs 1.85x).
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.run_name = "demo_continued"
    c.memory.read = True
    c.retrieval.update(mode="online", layout="paper", refs_per_chunk=1)
    c.memory.encode_grad = True
    c.optimizer.update(peak_lr=1e-3, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.05)
    # eval_batches=0: every held-out record is scored
    c.train.update(num_steps=150, log_every=10, eval_every=50, eval_batches=0, checkpoint_every=50)
    return c
