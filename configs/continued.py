"""Stage 2 of Memory3 pretraining: continued training with memory, for the paper's 2.4B architecture.

Starts from the last warm-up checkpoint (`--config.init_from=RUN/checkpoints`, parameters only: a fresh optimiser
and schedule), at a smaller peak learning rate, with every 64-token chunk reading 5 memories: its own retrieved
reference and the previous 4 chunks' (the paper layout, 1 reference per chunk). The references are encoded in every
step by the parameters being trained, through the memory layers only (`retrieval.mode="online"`, the paper's way),
and the loss is differentiated through that encoding (`memory.encode_grad=True`: a sparse writer learns what to
keep only so, tests/test_memory_learning.py; per device 77.8 GiB of a v5p-128 chip's 95 with it, 45.8 without,
measured before the fused attention and the chunked loss);
`retrieval.mode="bank"` reads memories a checkpoint wrote with tools/write_memory.py instead (`memory.bank`).

    launch/tpu_pod.sh configs/continued.py --config.init_from=gs://.../warmup/checkpoints \\
        --config.data.path=... --config.data.tokenizer=... --config.memory.knowledge=...

The retrieved reference ids of the data's splits come from tools/retrieve.py (default DATA/retrieval-SPLIT).
"""

from configs import memory3_2b


def get_config():
    c = memory3_2b.get_config()
    c.run_name = "memory3_2b_continued"
    c.memory.read = True
    c.retrieval.update(mode="online", layout="paper", refs_per_chunk=1)
    # The paper says only "a smaller learning rate" than the warm-up's: a third of a 3e-4 warm-up peak is a starting
    # point, not a measured optimum. A short warmup: the parameters are trained already.
    c.optimizer.update(peak_lr=1e-4, warmup_steps=50, schedule="wsd", decay_fraction=0.1)
    c.train.update(num_steps=10_000, checkpoint_every=500, eval_every=500)
    return c
