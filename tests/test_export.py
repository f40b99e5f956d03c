"""Hugging Face Llama export: transformers loads it as is and its logits equal ours (which also pins the
model's math to Llama's), through the library, the CLI on a real Orbax checkpoint, and in bfloat16."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import tiny_config
from flax import nnx

from m3jax.checkpoint import Checkpointer
from m3jax.export import from_hf_llama, save_hf_llama, to_hf_llama
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib
from m3jax.parallel import make_mesh
from m3jax.train.step import Trainer

REPO = Path(__file__).resolve().parents[1]
# GQA (8 query heads on 2 KV heads), head_dim independent of hidden_size, non-default RoPE base and norm eps,
# vocabulary 300 padded to 384. A large init_std keeps the logits O(1), so the tolerances mean something.
MODEL = dict(vocab_size=300, num_layers=3, hidden_size=48, num_heads=8, num_kv_heads=2, head_dim=16,
             mlp_dim=80, rope_base=50000.0, norm_eps=1e-5, init_std=0.2, dtype="float32")
BATCH, SEQ = 2, 40


@functools.cache
def _forward(model_cfg: ModelConfig):
    graphdef = params_lib.graphdef(model_cfg)
    return jax.jit(lambda params, *inputs: nnx.merge(graphdef, params)(*inputs))


def our_logits(model_cfg: ModelConfig, params, tokens, positions, segment_ids) -> np.ndarray:
    """Our logits on the real vocabulary."""
    inputs = (np.asarray(x, np.int32) for x in (tokens, positions, segment_ids))
    return np.asarray(_forward(model_cfg)(params, *inputs))[..., : model_cfg.vocab_size]


def hf_logits(model, tokens) -> np.ndarray:
    """HF logits (float32) on the real vocabulary; positions default to 0..T-1 and no padding."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits
    return out.float().numpy()[..., : model.config.m3jax_vocab_size]


def random_params(model_cfg: ModelConfig, seed: int = 0):
    """Random parameters of the model's tree (numpy: no compilation). Norm weights are random too, since all
    ones would hide a misplaced or missing norm."""
    abstract = params_lib.abstract_params(model_cfg)
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for path, leaf in paths:
        if "norm" in jax.tree_util.keystr(path):
            leaves.append(1.0 + 0.5 * rng.standard_normal(leaf.shape, np.float32))
        else:
            leaves.append(model_cfg.init_std * rng.standard_normal(leaf.shape, np.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model_cfg, params, HF model loaded from the float32 export directory)."""
    model_cfg = ModelConfig.from_config(MODEL)
    params = random_params(model_cfg)
    out = tmp_path_factory.mktemp("hf_f32")
    save_hf_llama(params, model_cfg, out, max_position_embeddings=SEQ, bos_token_id=2, eos_token_id=3)
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    return model_cfg, params, model


def test_config_json_is_a_llama_config(tmp_path):
    model_cfg = ModelConfig.from_config(MODEL)
    paths = save_hf_llama(random_params(model_cfg), model_cfg, tmp_path, bos_token_id=2)
    assert [p.name for p in paths] == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads(paths[0].read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == 384 and cfg["m3jax_vocab_size"] == 300
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
    assert cfg["rope_theta"] == 50000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, None, None)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (hf.num_key_value_heads, hf.head_dim, hf.rms_norm_eps) == (2, 16, 1e-5)
    assert hf.rope_parameters["rope_theta"] == 50000.0 and hf.eos_token_id is None
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert generation.suppress_tokens == list(range(300, 384)) and generation.bos_token_id == 2


def test_generate_never_emits_padding_ids(tmp_path):
    """HF does not mask the padding rows of the vocabulary; generation_config.json suppresses them."""
    model_cfg = ModelConfig.from_config(MODEL)
    params = random_params(model_cfg)
    params["lm_head"][:, model_cfg.vocab_size :] = 10.0  # padding logits would win every step
    save_hf_llama(params, model_cfg, tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 11) and int(out.max()) < model_cfg.vocab_size


def test_hf_logits_match(exported):
    model_cfg, params, model = exported
    assert model.dtype == torch.float32
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, model_cfg.vocab_size, (BATCH, SEQ))
    positions = np.broadcast_to(np.arange(SEQ), (BATCH, SEQ))
    ours = our_logits(model_cfg, params, tokens, positions, np.ones((BATCH, SEQ)))
    assert ours.std() > 0.5  # O(1) logits: the tolerance below is tight
    np.testing.assert_allclose(hf_logits(model, tokens), ours, atol=1e-4, rtol=0)


def test_packed_row_matches_documents_run_separately(exported):
    """HF has no segment ids: our logits on a packed row equal HF's on each document alone, so packing never
    attends across a document boundary and positions restart per document."""
    model_cfg, params, model = exported
    lengths = (17, 23)
    tokens = np.random.default_rng(2).integers(0, model_cfg.vocab_size, (1, sum(lengths)))
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    ours = our_logits(model_cfg, params, tokens, positions, segment_ids)
    start = 0
    for n in lengths:
        np.testing.assert_allclose(hf_logits(model, tokens[:, start : start + n]), ours[:, start : start + n],
                                   atol=1e-4, rtol=0)
        start += n


def test_bfloat16_export_loads_and_agrees_loosely(exported, tmp_path):
    model_cfg, params, _ = exported
    save_hf_llama(params, model_cfg, tmp_path, dtype="bfloat16")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert model.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    tokens = np.random.default_rng(3).integers(0, model_cfg.vocab_size, (BATCH, SEQ))
    positions = np.broadcast_to(np.arange(SEQ), (BATCH, SEQ))
    ours = our_logits(model_cfg, params, tokens, positions, np.ones((BATCH, SEQ)))
    theirs = hf_logits(model, tokens)
    # bf16 rounding alone gives ~3% here (our own bf16 compute is as far from float32); a mapping error ~100%.
    assert np.linalg.norm(theirs - ours) / np.linalg.norm(ours) < 0.1
    assert np.mean(theirs.argmax(-1) == ours.argmax(-1)) > 0.8


def test_from_hf_llama_round_trip(tmp_path):
    model_cfg = ModelConfig.from_config(MODEL)
    params = random_params(model_cfg, seed=4)
    save_hf_llama(params, model_cfg, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    model, back = from_hf_llama(safetensors.numpy.load_file(tmp_path / "model.safetensors"), config)
    assert ModelConfig.from_config(model) == ModelConfig.from_config({**MODEL, "init_std": 0.02})
    jax.tree.map(np.testing.assert_array_equal, back, params)

    _, state = to_hf_llama(params, model_cfg)
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        from_hf_llama(state, {**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
    with pytest.raises(ValueError, match="no place for.*bias"):
        from_hf_llama({**state, "model.layers.0.self_attn.q_proj.bias": np.zeros(128)}, config)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(REPO / "tools" / "export_pytorch.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_exports_an_orbax_checkpoint(tmp_path):
    """The CLI exports the latest step of a run's checkpoints (an earlier step holds other parameters), and HF's
    logits equal ours on it."""
    config = tiny_config(**MODEL)
    trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    state = trainer.init_state()
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=2, async_save=False)
    earlier = trainer.state_from_params(jax.tree.map(lambda p: -p, state.params))
    ckpt.save(3, earlier, {}, json.loads(config.to_json_best_effort()))
    ckpt.save(5, state, {}, json.loads(config.to_json_best_effort()))
    ckpt.wait()
    ckpt.close()

    out = tmp_path / "hf"
    proc = run_tool(f"--checkpoint={tmp_path / 'checkpoints'}", f"--out={out}", "--bos_id=2", "--eos_id=3")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out / 'model.safetensors'}" in proc.stdout
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    hf_cfg = model.config
    assert (hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.max_position_embeddings) == (2, 3, 32)

    tokens = np.random.default_rng(5).integers(0, trainer.model_cfg.vocab_size, (BATCH, SEQ))
    positions = np.broadcast_to(np.arange(SEQ), (BATCH, SEQ))
    params = jax.device_get(state.params)
    ours = our_logits(trainer.model_cfg, params, tokens, positions, np.ones((BATCH, SEQ)))
    np.testing.assert_allclose(hf_logits(model, tokens), ours, atol=1e-4, rtol=0)


def test_cli_bad_checkpoint_path_is_named(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = run_tool(f"--checkpoint={missing}", f"--out={tmp_path / 'hf'}")
    assert proc.returncode != 0
    assert f"export_pytorch: checkpoint path {missing} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "hf").exists()
