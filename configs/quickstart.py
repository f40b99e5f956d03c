"""`make demo`'s warm-up: a 2-layer model pretrained on the embedded corpus in about a minute on 2 CPU cores.

    launch/local.sh configs/quickstart.py --workdir=runs/demo/warmup --config.data.path=runs/demo/data_warmup

The size at which the continued stage (configs/quickstart_continued.py) measurably teaches a model to read
memory on 2 CPU cores: held-out entities answered from memory, none without (README, "The demo"). The memory
geometry is set here, as every tool that writes or reads this model's memories takes this config: every token of a
knowledge-base entry is kept (k = 32 covers the ~27-token references of two attributes) in both layers; the
paper's k = 8 of 128 does not yet teach a model this small to read (docs/continued.md).
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.run_name = "quickstart"
    c.model.update(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=256)
    c.memory.update(k=32, layers="all")
    c.data.seq_len = 128
    c.data.global_batch_size = 16
    c.optimizer.update(peak_lr=3e-3, warmup_steps=10)
    c.train.update(num_steps=100, log_every=10, eval_every=25, eval_batches=4, checkpoint_every=100)
    return c
