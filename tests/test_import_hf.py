"""tools/import_hf.py: a Hugging Face Llama into an m3jax checkpoint. A random transformers model (GQA, untied head,
non-default RoPE base) imported and exported again keeps its logits and every weight bit for bit; the imported
checkpoint writes a bank and starts the continued stage; bf16 and fp16 weights import exactly; and every kind of
bad input is refused with the file and the key it was read from."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import REPO, cli_env, run_tool
from test_memory_pipeline import synthetic_ids

from m3jax import checkpoint as ckpt_lib
from m3jax.data.tokenizer import Tokenizer
from m3jax.export.llama import PARAM_MAP, HFCheckpointError, load_hf_llama, to_hf_llama
from m3jax.memory.writer import read_record
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib
from m3jax.parallel import make_mesh
from m3jax.train.step import Trainer

# tests/lm_test_config.py's architecture (so that its jobs need only --config.model.rope_base and vocab_multiple),
# with GQA, an untied head and a RoPE base other than the default. The vocabulary is the test tokenizer's (1000);
# vocab_multiple=8 leaves it unpadded, so that the exported tensors have the original's shapes.
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
             max_position_embeddings=512)
MODEL = {"model.rope_base": 50000.0, "model.vocab_multiple": 8}  # what its jobs add to tests/lm_test_config.py
MODEL_FLAGS = tuple(f"--config.{k}={v}" for k, v in MODEL.items())
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rope_theta=20000.0, tie_word_embeddings=False)
SEQ = 48


def random_llama(seed: int, std: float = 0.15, **config) -> transformers.LlamaForCausalLM:
    """A float32 LlamaForCausalLM with random weights: linear weights at `std` (O(1) logits, so tolerances mean
    something) and norm weights around 1 (all ones would hide a misplaced norm)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.5 * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))
    return model


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def import_hf(hf, out, *args):
    return run_tool(out.parent, "import_hf", f"--hf={hf}", f"--out={out}", *args, timeout=300)


@pytest.fixture(scope="module")
def tokenizer(lm_data):
    return str(Path(lm_data).parent / "spm.model")


@pytest.fixture(scope="module")
def imported(tokenizer, tmp_path_factory):
    """The random Llama (vocabulary of the test tokenizer) saved by transformers, and tools/import_hf.py's
    checkpoint of it under tests/lm_test_config.py."""
    root = tmp_path_factory.mktemp("import_hf")
    model = random_llama(0, vocab_size=Tokenizer(tokenizer).vocab_size, **LLAMA)
    model.save_pretrained(root / "hf")
    proc = import_hf(root / "hf", root / "ckpt", "--config=tests/lm_test_config.py", f"--tokenizer={tokenizer}",
                     *MODEL_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "model": model, "hf": root / "hf", "ckpt": root / "ckpt", "stdout": proc.stdout}


def test_import_then_export_is_bit_exact_and_keeps_the_logits(imported, tokenizer):
    root, model = imported["root"], imported["model"]
    loaded = ckpt_lib.load_model(imported["ckpt"])
    cfg = loaded.model_config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (2, 4, 2, 16, 128)
    assert (cfg.rope_base, cfg.norm_eps, cfg.vocab_size, cfg.padded_vocab_size) == (50000.0, 1e-5, 1000, 1000)
    assert cfg.memory_layers == (0,) and loaded.identity["step"] == 0  # lm_test_config's memory geometry; a run id
    assert "--config.model.rope_base=50000.0" in imported["stdout"]

    out = root / "exported"
    proc = run_tool(root, "export_pytorch", f"--checkpoint={imported['ckpt']}", f"--out={out}",
                    f"--tokenizer={tokenizer}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = safetensors.numpy.load_file(imported["hf"] / "model.safetensors")
    exported = safetensors.numpy.load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original) and len(original) == 3 + 9 * 2
    for name, w in original.items():
        assert exported[name].dtype == w.dtype == np.float32 and exported[name].shape == w.shape, name
        np.testing.assert_array_equal(exported[name].view(np.uint32), w.view(np.uint32), err_msg=name)

    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, SEQ))
    want = hf_logits(model, tokens)
    assert want.std() > 0.5  # O(1) logits: the tolerances below are tight
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert back.config.rope_parameters["rope_theta"] == 50000.0 and back.config.num_key_value_heads == 2
    np.testing.assert_allclose(hf_logits(back, tokens), want, atol=1e-5, rtol=0)
    # And the imported parameters compute the same function in JAX.
    positions = np.broadcast_to(np.arange(SEQ), tokens.shape).astype(np.int32)
    ours = params_lib.model_from(cfg, loaded.params)(tokens.astype(np.int32), positions, np.ones_like(positions))
    np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4, rtol=0)


def test_param_map_covers_every_parameter():
    """The one table of both directions names every parameter of the model once, and every tensor of a Llama."""
    cfg = ModelConfig(vocab_size=100, num_layers=2, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24)
    paths = {jax.tree_util.keystr(p, simple=True, separator="/")
             for p, _ in jax.tree_util.tree_flatten_with_path(params_lib.abstract_params(cfg))[0]}
    assert sorted(e.ours for e in PARAM_MAP) == sorted(paths)
    llama = random_llama(0, std=0.02, vocab_size=128, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    _, state = to_hf_llama(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params_lib.abstract_params(cfg)), cfg)
    assert sorted(state) == sorted(llama.state_dict())


@pytest.mark.slow
def test_imported_checkpoint_writes_a_bank_and_continues_with_memory(imported, tokenizer, memory_kb):
    """The imported checkpoint writes memory_kb's bank (tools/write_memory.py) and the continued stage reads it in
    bank mode from the command line (which holds it to the bank of the checkpoint it starts from, by the run id the
    import gave it): finite losses, and step 1's loss is the imported parameters' on that batch."""
    root = imported["root"]
    base = ("--config=tests/lm_test_config.py", *MODEL_FLAGS)
    bank = root / "bank"
    proc = run_tool(root, "write_memory", *base, f"--checkpoint={imported['ckpt']}", f"--tokenizer={tokenizer}",
                    f"--knowledge={memory_kb['knowledge']}", f"--bank={bank}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "complete" in proc.stdout
    record = read_record(bank)
    ids = synthetic_ids(root / "retrieval-train", memory_kb["data"], "train", len(memory_kb["refs"]),
                        record["references_sha256"])

    settings = {"init_from": str(imported["ckpt"]), "data.path": memory_kb["data"], "data.seq_len": 256,
                "data.global_batch_size": 8, "data.tokenizer": tokenizer, "memory.read": True,
                "memory.bank": str(bank), "retrieval.mode": "bank", "retrieval.ids_path": str(ids.directory),
                "train.num_steps": 3, "train.checkpoint_every": 3}
    workdir = root / "continued"
    cmd = [sys.executable, "-m", "m3jax.train", *base, f"--workdir={workdir}", "--verbosity=0",
           *(f"--config.{k}={v}" for k, v in settings.items())]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses

    # Step 1 trained on the imported parameters: its loss is theirs on the first batch (same program, 2 devices).
    import lm_test_config

    config = lm_test_config.get_config()
    for key, value in {**MODEL, **settings, "model.vocab_size": Tokenizer(tokenizer).vocab_size}.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:2]))
    batch = trainer.global_batch(next(trainer.task.train_iterator(0, 1)))
    loss = jax.jit(trainer.loss)

    def mean_loss(params) -> float:
        _, (nll, weight) = loss(jax.device_put(params, trainer.param_shardings), batch)
        return float(nll / weight)

    started = mean_loss(ckpt_lib.load_model(imported["ckpt"]).params)
    assert started == pytest.approx(losses[1], rel=1e-5)
    assert abs(mean_loss(trainer.init_state().params) - started) > 0.1  # a fresh start would show


# ------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype, sharded", [(torch.bfloat16, True), (torch.float16, False)])
def test_half_precision_weights_import_exactly(dtype, sharded, tmp_path):
    """bf16 (sharded, --dtype=bfloat16) and fp16 (one file, the default config) weights: the parameters equal the
    HF tensors cast to float32, and the compute dtype is the flag's, else the config file's (configs/warmup.py)."""
    model = random_llama(2, **TINY).to(dtype)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if sharded else "1GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == sharded
    args = ["--dtype=bfloat16"] if dtype == torch.bfloat16 else []
    proc = import_hf(tmp_path / "hf", tmp_path / "ckpt", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"({str(dtype).removeprefix('torch.')})" in proc.stdout

    loaded = ckpt_lib.load_model(tmp_path / "ckpt")
    assert loaded.model_config.dtype == "bfloat16" and loaded.saved_config["memory"]["layers"] == "first_half"
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(loaded.params))
    _, state = to_hf_llama(loaded.params, loaded.model_config)
    for name, w in model.state_dict().items():
        np.testing.assert_array_equal(state[name], w.float().numpy(), err_msg=name)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny Llama saved as one file and as shards: the valid inputs each bad case spoils."""
    root = tmp_path_factory.mktemp("tiny_hf")
    model = random_llama(3, std=0.02, **TINY)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root


def _edit_config(**changes):
    def edit(d):
        path = d / "config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
    return edit


def _edit_tensors(file, change):
    def edit(d):
        state = safetensors.numpy.load_file(d / file)
        change(state)
        safetensors.numpy.save_file(state, d / file, metadata={"format": "pt"})
    return edit


def _edit_index(change):
    def edit(d):
        path = d / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        change(index["weight_map"])
        path.write_text(json.dumps(index))
    return edit


def _shard_of(d, name):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


_DROP = object()
Q0 = "model.layers.0.self_attn.q_proj.weight"
# case: (layout, spoil(directory), the file named ("": the directory), what the message says). The CLI runs each.
BAD = {
    "no config.json": ("single", lambda d: (d / "config.json").unlink(), "config.json", r"missing"),
    "no weights": ("single", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "",
                   r"no model.safetensors or model.safetensors.index.json; it holds \['pytorch_model.bin'\]"),
    "shard file missing": ("sharded", lambda d: (d / _shard_of(d, "lm_head.weight")).unlink(),
                           "model.safetensors.index.json", r"weight_map places .* which is missing"),
    "tensor missing from a shard": (
        "sharded", lambda d: _edit_tensors(_shard_of(d, Q0), lambda s: s.pop(Q0))(d), "model-0",
        rf"has no tensor '{Q0}' .*which model.safetensors.index.json places in it"),
    "another architecture": ("single", _edit_config(architectures=["MistralForCausalLM"], model_type="mistral"),
                             "config.json", r"architectures \['MistralForCausalLM'\] is not supported"),
    "attention bias": ("single", _edit_config(attention_bias=True), "config.json",
                       r"attention_bias=true is not supported: the m3jax model has no biases"),
    "rope scaling": ("single", _edit_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), "config.json",
                     r"rope_scaling .*'linear'.* is not supported \(only default RoPE\)"),
    "tied embeddings": ("single", _edit_config(tie_word_embeddings=True), "config.json",
                        r"tie_word_embeddings=true is not supported.*--untie_embeddings"),
    "sliding window": ("single", _edit_config(sliding_window=64), "config.json",
                       r"sliding_window=64 is not supported"),
    "hidden_act": ("single", _edit_config(hidden_act="gelu"), "config.json", r"hidden_act 'gelu' is not supported"),
    "head_dim inconsistent": ("single", _edit_config(head_dim=16), "model.safetensors",
                              rf"tensor '{Q0}' has shape \(32, 32\), but config.json's sizes imply \(64, 32\)"),
}
# More of the same kinds, checked through the library (`load_hf_llama`), whose messages the CLI prints as they are.
BAD_MORE = {
    "tensor missing from the index": ("sharded", _edit_index(lambda m: m.pop("model.norm.weight")),
                                      "model.safetensors.index.json", r"has no tensor 'model.norm.weight'"),
    "tensor missing": ("single", _edit_tensors("model.safetensors", lambda s: s.pop("lm_head.weight")),
                       "model.safetensors", r"has no tensor 'lm_head.weight'"),
    "bias tensors": ("single", _edit_tensors("model.safetensors",
                                             lambda s: s.update({Q0.replace("weight", "bias"): np.zeros(32, "f4")})),
                     "model.safetensors", r"no place for: \['model.layers.0.self_attn.q_proj.bias'\]"),
    "rope type": ("single", _edit_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
                  "config.json", r"rope_parameters.rope_type 'llama3' is not supported"),
    "not a safetensors file": ("single", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 16),
                               "model.safetensors", r"not a readable safetensors file"),
    "another model_type": ("single", _edit_config(architectures=_DROP, model_type="qwen2"), "config.json",
                           r"model_type 'qwen2' is not supported"),
    "mlp bias": ("single", _edit_config(mlp_bias=True), "config.json", r"mlp_bias=true is not supported"),
    "partial rotary": ("single", _edit_config(partial_rotary_factor=0.5), "config.json",
                       r"partial_rotary_factor 0.5 is not supported"),
    "layer types": ("single", _edit_config(layer_types=["sliding_attention"]), "config.json",
                    r"layer_types \['sliding_attention'\] are not supported"),
    "kv heads": ("single", _edit_config(num_key_value_heads=3), "config.json",
                 r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "head_dim underivable": ("single", _edit_config(head_dim=_DROP, hidden_size=30), "config.json",
                             r"has no head_dim, and hidden_size 30 is not a multiple of num_attention_heads 4"),
    "missing size": ("single", _edit_config(intermediate_size=_DROP), "config.json", r"has no 'intermediate_size'"),
    "quantized": ("single", _edit_config(quantization_config={"quant_method": "bitsandbytes"}), "config.json",
                  r"quantization_config is set"),
    "float64 weights": ("single", _edit_tensors("model.safetensors", lambda s: s.update({Q0: s[Q0].astype("f8")})),
                        "model.safetensors", rf"tensor '{Q0}' has dtype float64; only float32, bfloat16 and float16"),
    "shard not in the index": ("sharded", lambda d: (d / "model.safetensors.index.json").unlink(), "",
                               r"no model.safetensors or model.safetensors.index.json; it holds \['model-00001-of"),
}


def spoiled(tiny_hf, cases, case, tmp_path):
    """A copy of the tiny model spoiled as `case` says, and the start its error message must have."""
    layout, spoil, file, message = cases[case]
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf / layout, hf)
    spoil(hf)
    return hf, f"{hf / file}" if file else f"{hf}:", message


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_naming_file_and_key(case, tiny_hf, tmp_path):
    hf, where, message = spoiled(tiny_hf, BAD, case, tmp_path)
    proc = import_hf(hf, tmp_path / "ckpt")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(f"import_hf: {where}"), err
    assert re.search(message, err), err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("case", sorted(BAD_MORE))
def test_more_bad_input_is_refused_naming_file_and_key(case, tiny_hf, tmp_path):
    hf, where, message = spoiled(tiny_hf, BAD_MORE, case, tmp_path)
    with pytest.raises(HFCheckpointError) as e:
        load_hf_llama(hf)
    assert str(e.value).startswith(where) and re.search(message, str(e.value)), str(e.value)


def test_untie_embeddings_copies_the_embedding(tiny_hf, tmp_path):
    """--untie_embeddings accepts a tied model (whatever its file holds for the head): the head is the embedding."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf / "single", hf)
    _edit_config(tie_word_embeddings=True)(hf)
    _edit_tensors("model.safetensors", lambda s: s.pop("lm_head.weight"))(hf)
    proc = import_hf(hf, tmp_path / "ckpt", "--untie_embeddings")
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = ckpt_lib.load_model(tmp_path / "ckpt").params
    np.testing.assert_array_equal(params["lm_head"], np.asarray(params["embed"]).T)


def test_cli_refusals_of_its_own_flags(tiny_hf, tokenizer, tmp_path):
    """A tokenizer larger than the vocabulary, an architecture override that disagrees, a non-empty --out."""
    hf = tiny_hf / "single"
    proc = import_hf(hf, tmp_path / "a", f"--tokenizer={tokenizer}")
    assert proc.returncode != 0 and f"import_hf: --tokenizer={tokenizer} has 1000 ids, more than the vocabulary " \
        f"of {hf}/config.json (vocab_size 128)" in proc.stderr
    proc = import_hf(hf, tmp_path / "b", "--config.model.num_layers=3")
    assert proc.returncode != 0 and f"import_hf: --config.model.num_layers=3, but {hf}/config.json gives 1" \
        in proc.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    proc = import_hf(hf, tmp_path / "c")
    assert proc.returncode != 0 and "exists and is not an empty directory" in proc.stderr
