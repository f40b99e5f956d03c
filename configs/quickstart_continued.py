"""`make demo`'s continued stage: configs/quickstart.py's model learns to read memory (online mode).

    launch/local.sh configs/quickstart_continued.py --workdir=runs/demo/continued \\
        --config.init_from=runs/demo/warmup --config.data.path=runs/demo/data \\
        --config.memory.bank=runs/demo/bank --config.memory.knowledge=runs/demo/entities/knowledge.jsonl \\
        --config.data.tokenizer=runs/demo/tokenizer/spm.model --config.eval.cloze=runs/demo/entities/cloze.jsonl

Each 64-token chunk reads the one reference retrieved for it (the paper's training layout), encoded in the step by
the parameters being trained, with the encoding's gradient (`memory.encode_grad`): the writer learns what to keep,
and the final checkpoint rewrites the bank it is evaluated with. 600 steps at peak learning rate 3e-3 are the
measured recipe (tests/conftest.py ENTITY_RUN: held-out entity accuracy 0.55 and 0.34 over two seeds with memory,
0.00 without; 300 steps reached 0.00). `memory.bank` names the warm-up's bank for its retrieval index and the
retrieved ids of the training data (tools/retrieve.py); `--config.memory.read=False` is the memory-off control.
"""

from configs import quickstart


def get_config():
    c = quickstart.get_config()
    c.run_name = "quickstart_continued"
    c.memory.read = True
    c.memory.encode_grad = True
    c.retrieval.update(mode="online", layout="paper", refs_per_chunk=1)
    c.optimizer.update(peak_lr=3e-3, warmup_steps=10)
    # eval_batches=0: every held-out record is scored (the split of a small knowledge task is under a batch or two)
    c.train.update(num_steps=600, log_every=10, eval_every=100, eval_batches=0, checkpoint_every=200)
    return c
