"""The PyTorch Memory3 module (m3jax/export/torch_memory.py) against the JAX model: the same exported weights and the
same memories give the same logits, through several memory layers, a strict subset of memory KV heads, GQA, packed
segments, tokens that read no memory and groups with empty slots and padding keys."""

import json

import jax
import numpy as np
import pytest
from test_memory import random_params

from m3jax.export import save_hf_llama
from m3jax.export.memory_config import MEMORY_CONFIG_FILE, read_memory_config, write_memory_config
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib
from m3jax.model.memory import Memory

torch = pytest.importorskip("torch")
from m3jax.export.torch_memory import Memory3Llama, MemoryInputs  # noqa: E402

SINK = [1, 7, 9]
CHUNK = 8


def memory_model_config(**kw):
    """3 layers, memory layers 0 and 2, memory KV head 1 of 2 (GQA: 2 query heads each), non-default RoPE base, a
    vocabulary padded to the next multiple of 128."""
    base = dict(vocab_size=300, num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
                rope_base=5000.0, dtype="float32", memory_layers=(0, 2), memory_kv_heads=(1,),
                memory_chunk_size=CHUNK, memory_ref_len=16, memory_k=4)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = memory_model_config()
    params = random_params(cfg, 3)
    out = tmp_path_factory.mktemp("torch_memory")
    save_hf_llama(params, cfg, out)
    write_memory_config(out, cfg, SINK)
    return cfg, params, Memory3Llama.from_pretrained(out), out


def batch(cfg, rng, b=2, t=30, memories=5, slots=3):
    """Two rows: row 0 one document whose 8-token chunks are groups 0..3; row 1 two packed documents (groups restart
    at the second) and 4 padding tokens that read nothing. Random memories, some slots empty, one memory padded."""
    tokens = rng.integers(0, cfg.vocab_size, (b, t))
    seg = np.ones((b, t), np.int32)
    seg[1, 14:26], seg[1, 26:] = 2, 0
    start = cfg.context_start(len(SINK))
    positions = np.tile(start + np.arange(t), (b, 1))
    positions[1, 14:] = start + np.arange(t - 14)
    group = np.tile(np.arange(t) // CHUNK, (b, 1))
    group[1, 14:] = 2 + np.arange(t - 14) // CHUNK
    group[1, 26:] = -1
    group[0, 5] = -1  # a token that reads no memory
    groups = int(group.max()) + 1
    index = rng.integers(0, memories, (b, groups, slots))
    for r in range(b):  # a group reads a memory at most once
        for g in range(groups):
            index[r, g] = rng.permutation(memories)[:slots]
    index[0, 1, 2] = index[1, 0, :] = -1  # empty slots, and a group with none at all
    valid = np.ones((b, memories, cfg.memory_k), bool)
    valid[:, 2, -1] = False  # a reference shorter than k
    shape = (len(cfg.memory_layers), b, memories, len(cfg.memory_kv_heads), cfg.memory_k, cfg.head_dim)
    keys = rng.standard_normal(shape).astype(np.float32) * 2
    values = rng.standard_normal(shape).astype(np.float32) * 2
    return tokens, positions, seg, group, index.astype(np.int32), valid, keys, values


def jax_logits(cfg, params, tokens, positions, seg, group=None, memory=None):
    model = params_lib.model_from(cfg, params)
    return np.asarray(jax.jit(model.__call__)(tokens, positions, seg, group, memory))[..., :cfg.vocab_size]


def torch_logits(model, tokens, positions, seg, group=None, memory=None):
    with torch.no_grad():
        args = [torch.as_tensor(np.asarray(a, np.int64)) for a in (tokens, positions, seg)]
        g = None if group is None else torch.as_tensor(np.asarray(group, np.int64))
        return model(*args, g, memory).numpy()[..., :model.vocab_size]


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_module_reads_memory_as_the_jax_model(exported, seed):
    cfg, params, model, _ = exported
    tokens, positions, seg, group, index, valid, keys, values = batch(cfg, np.random.default_rng(seed))
    memory = Memory(keys=keys, values=values, index=index, valid=valid, sink_tokens=np.asarray(SINK, np.int32))
    want = jax_logits(cfg, params, tokens, positions, seg, group, memory)
    inputs = MemoryInputs(keys=torch.as_tensor(keys), values=torch.as_tensor(values),
                          index=torch.as_tensor(index.astype(np.int64)), valid=torch.as_tensor(valid))
    got = torch_logits(model, tokens, positions, seg, group, inputs)
    real = seg > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
    # the memories matter: the same tokens with every slot empty differ
    empty = MemoryInputs(keys=inputs.keys, values=inputs.values, index=torch.full_like(inputs.index, -1),
                         valid=inputs.valid)
    assert np.abs(torch_logits(model, tokens, positions, seg, group, empty)[real] - got[real]).max() > 1e-2


def test_torch_module_without_memory_is_the_plain_model(exported):
    cfg, params, model, _ = exported
    tokens, _, seg, *_ = batch(cfg, np.random.default_rng(2))
    positions = np.tile(np.arange(tokens.shape[1]), (tokens.shape[0], 1))
    want = jax_logits(cfg, params, tokens, positions, seg)
    got = torch_logits(model, tokens, positions, seg)
    np.testing.assert_allclose(got[seg > 0], want[seg > 0], atol=1e-4, rtol=0)


def test_memory_config_is_what_the_module_reads(exported, tmp_path):
    cfg, _, model, out = exported
    saved = read_memory_config(out)
    assert saved["memory_layers"] == [0, 2] and saved["memory_kv_heads"] == [1] and saved["sink_tokens"] == SINK
    assert (model.memory_layers, model.memory_kv_heads, model.context_start()) == ((0, 2), (1,), 3 + 16)
    with pytest.raises(FileNotFoundError, match="memory_config.json"):
        read_memory_config(tmp_path)
    broken = {k: v for k, v in saved.items() if k != "sink_tokens"}
    (tmp_path / MEMORY_CONFIG_FILE).write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="sink_tokens"):
        read_memory_config(tmp_path)
    with pytest.raises(ValueError, match="no memory heads"):
        write_memory_config(tmp_path, memory_model_config(memory_layers=(), memory_kv_heads=()), SINK)
