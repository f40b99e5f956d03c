"""Config validation (a misspelt override on the command line included), the pinned FLOPs formula, the LR schedules
and the weight-decay mask."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config

from m3jax.config import ConfigError, resolve, validate
from m3jax.data.records import read_metadata, write_metadata
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib
from m3jax.parallel import logical_to_spec
from m3jax.train import flops as flops_lib
from m3jax.train.optimizer import decay_mask, lr_schedule


@pytest.mark.parametrize("key,value,names", [
    ("model.num_kv_heads", 3, "config.model.num_heads"),
    ("model.head_dim", 15, "config.model.head_dim"),
    ("model.dtype", "float16", "config.model.dtype"),
    ("model.remat", "some", "config.model.remat"),
    ("optimizer.schedule", "linear", "config.optimizer.schedule"),
    ("optimizer.grad_accum_steps", 3, "config.data.global_batch_size"),
    ("train.num_steps", 0, "config.train.num_steps"),
    ("spike_guard.lr_factor", 1.5, "config.spike_guard.lr_factor"),
    ("memory.k", 200, "config.memory.k"),
    ("memory.chunk_size", 0, "config.memory.chunk_size"),
    ("retrieval.eval_max_overlap", 0.0, "config.retrieval.eval_max_overlap"),
])
def test_inconsistent_values_name_the_key(key, value, names):
    c = tiny_config()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        validate(c)


def test_mesh_must_match_device_count():
    c = tiny_config()
    c.mesh.update(data=2, fsdp=2, tensor=1)
    with pytest.raises(ConfigError, match=r"config\.mesh: .* is 4, but there are 8 devices"):
        validate(c, num_devices=8)
    c.mesh.update(data=-1, fsdp=3)
    with pytest.raises(ConfigError, match=r"config\.mesh"):
        validate(c, num_devices=8)
    c.mesh.update(data=-1, fsdp=2, tensor=2)
    validate(c, num_devices=8)


def test_locked_config_rejects_unknown_keys():
    c = tiny_config()
    c.lock()
    with pytest.raises(AttributeError, match="num_layer"):
        c.model.num_layer = 3


@pytest.mark.parametrize("override,typo,meant", [
    ("--config.model.num_layer=3", "num_layer", "num_layers"),
    ("--config.optimizr.peak_lr=0.1", "optimizr", "optimizer"),
])
def test_a_misspelt_override_fails_with_did_you_mean(override, typo, meant):
    """Documented: a misspelt `--config.x.y` fails with a "did you mean" that names the key, through the trainer's own
    command line (its flag parsing runs before any work: the run needs no data)."""
    proc = subprocess.run([sys.executable, "-m", "m3jax.train", "--config=tests/lm_test_config.py", override],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, f"{override} was accepted: {proc.stdout}{proc.stderr}"
    assert f'Did you mean "{meant}" instead of "{typo}"?' in proc.stderr, proc.stderr[-2000:]


def test_flops_formula_is_pinned():
    cfg = ModelConfig(vocab_size=1000, vocab_multiple=128, num_layers=2, hidden_size=64, num_heads=4,
                      num_kv_heads=2, head_dim=16, mlp_dim=96)
    # By hand: per layer q 64*64 + k,v 2*64*32 + o 64*64 + MLP 3*64*96 + 2 norms of 64; final norm 64;
    # LM head 64*1024 (padded vocab); the embedding gather is not counted.
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96 + 2 * 64
    n = 2 * layer + 64 + 64 * 1024
    seq = 128
    assert flops_lib.train_flops_per_token(cfg, seq) == 6 * n + 6 * 2 * seq * 4 * 16
    # The analytic count agrees with the parameters the model actually creates.
    params = params_lib.abstract_params(cfg)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == cfg.param_counts()["total"]
    assert flops_lib.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)


def test_wsd_and_cosine_schedules():
    c = tiny_config()
    o = c.optimizer
    o.update(peak_lr=1.0, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1, schedule="wsd")
    f = lr_schedule(o, 100)
    assert float(f(0)) == pytest.approx(0.1) and float(f(9)) == pytest.approx(1.0)
    assert float(f(50)) == pytest.approx(1.0) and float(f(80)) == pytest.approx(1.0)  # stable until 80
    assert float(f(90)) == pytest.approx(0.1**0.5, rel=1e-5) and float(f(100)) == pytest.approx(0.1, rel=1e-5)
    o.schedule = "cosine"
    f = lr_schedule(o, 100)
    assert float(f(55)) == pytest.approx(0.55, rel=1e-5) and float(f(100)) == pytest.approx(0.1, rel=1e-5)


def test_weight_decay_mask_spares_norms_and_embedding():
    params = params_lib.abstract_params(ModelConfig.from_config(tiny_config().model))
    mask = decay_mask(params, decay_norms_and_embeddings=False)
    assert not mask["embed"] and not mask["final_norm"] and not mask["layers"]["attn_norm"]
    assert mask["lm_head"] and mask["layers"]["wq"] and mask["layers"]["w_down"]
    assert all(jax.tree.leaves(decay_mask(params, decay_norms_and_embeddings=True)))


def test_logical_rules_map_and_never_reuse_a_mesh_axis():
    rules = tiny_config().logical_axis_rules
    assert tuple(logical_to_spec(("batch", "seq"), rules)) == (("data", "fsdp"), None)
    assert tuple(logical_to_spec(("layers", "embed", "heads", "head_dim"), rules)) == (None, "fsdp", "tensor", None)
    assert tuple(logical_to_spec(("vocab", "mlp"), rules)) == ("tensor", None)  # tensor already used
    with pytest.raises(KeyError, match="'nope'"):
        logical_to_spec(("nope",), rules)


@pytest.mark.parametrize("key,value", [("layers", "0,9"), ("layers", "1,0"), ("layers", "two"), ("kv_heads", "2")])
def test_memory_layers_and_heads_are_checked(key, value):
    c = tiny_config()  # 2 layers, 2 KV heads
    c.memory[key] = value
    with pytest.raises(ConfigError, match=rf"config\.memory\.{key}={value!r}"):
        validate(c)


def test_memory_config_resolves_into_the_model_config():
    c = tiny_config(num_layers=6)
    assert ModelConfig.from_config(c.model).memory_layers == ()  # no memory section: the plain model
    c.memory.heads = False
    assert ModelConfig.from_config(c.model, c.memory).memory_layers == ()  # no memory heads: the plain model
    c.memory.heads = True
    cfg = ModelConfig.from_config(c.model, c.memory)
    assert (cfg.memory_layers, cfg.memory_kv_heads, cfg.memory_chunk_size) == ((0, 1, 2), (0, 1), 64)
    c.memory.update(layers="all", kv_heads="1")
    cfg = ModelConfig.from_config(c.model, c.memory)
    assert (cfg.memory_layers, cfg.memory_kv_heads) == (tuple(range(6)), (1,))


def test_resolve_settles_what_the_data_decides(lm_data, tmp_path):
    """The one resolve step: vocab_size from the data, and what a small corpus allows, said or refused by key
    (a stock config on a user's 168-document corpus once stopped with an error that named no key)."""
    meta = read_metadata(lm_data)  # a real prepared directory's metadata (seq_len 64), with its splits resized

    def data(train, heldout):
        path = tmp_path / f"data-{train}-{heldout}"
        write_metadata(path, {**meta, "splits": {"train": {**meta["splits"]["train"], "num_records": train},
                                                 "heldout": {**meta["splits"]["heldout"], "num_records": heldout}}})
        return str(path)

    def config(path, **train):
        c = tiny_config(vocab_size=-1)
        c.data.update(path=path, seq_len=64, global_batch_size=16)
        c.train.update(eval_every=50, eval_batches=6, **train)
        return c

    said = []
    c = config(data(100, 20))
    resolve(c, log=said.append)
    assert c.model.vocab_size == meta["vocab_size"] and c.train.eval_batches == 1 and c.train.eval_every == 50
    assert said == [f"config.train.eval_batches: held-out split 'heldout' of the data {c.data.path} holds 1 global "
                    "batches of 16; evaluating on 1, not 6"]
    c = config(data(100, 15))
    resolve(c, log=said.append)
    assert c.train.eval_every == 0 and "no held-out loss in this run" in said[-1]
    with pytest.raises(ConfigError, match=r"config\.data\.global_batch_size: 16, but split 'train' .* holds 15 "):
        resolve(config(data(15, 20)))
    c = config(data(100, 20))
    c.data.seq_len = 128
    with pytest.raises(ConfigError, match=r"config\.data\.seq_len: 128, but .* sequences of 64"):
        resolve(c)
