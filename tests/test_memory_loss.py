"""The held-out memory-loss measurement (m3jax/memory/evaluate.py, tools/eval_memory_loss.py) on a tiny setup.

Real text (held-out passages of the embedded corpus, tokenized by the `lm_data` tokenizer) and a random model at
init_std 0.3 (O(1) logits, so memory visibly moves the loss and the tolerances mean something; the machinery does
not need a trained model). Pinned: the own-memory loss with k = 128, every layer and every KV head a memory head,
equals the plain model's loss on `sink + reference + context` as one sequence (the read path's oracle 1, in loss
form, computed here independently of the tool's batching); int8 memories move the loss little; empty memory is
not memory off; the CLI's numbers are the library's on the same checkpoint.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from m3jax.checkpoint import Checkpointer
from m3jax.data.corpus import embedded_corpus
from m3jax.data.prepare import heldout_split
from m3jax.data.records import read_metadata
from m3jax.data.tokenizer import Tokenizer
from m3jax.memory import evaluate
from m3jax.memory.knowledge import sink_tokens
from m3jax.model import params as params_lib
from m3jax.model.config import ModelConfig
from m3jax.model.params import init_params

REPO = Path(__file__).resolve().parents[1]
REF_LEN = 128
LENGTHS = [128, 128, 77, 5]  # two full references, a short one, one shorter than k = 8
K_CLI = 16  # the CLI test's --k: neither config.memory.k (8) nor ref_len


@pytest.fixture(scope="module")
def setup(lm_data):
    meta = read_metadata(lm_data)
    tokenizer = Tokenizer(Path(lm_data).parent / "spm.model")
    all_cfg = ModelConfig(vocab_size=meta["vocab_size"], num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                          head_dim=16, mlp_dim=128, init_std=0.3, dtype="float32", memory_chunk_size=64,
                          memory_layers=(0, 1), memory_kv_heads=(0, 1))
    params = init_params(all_cfg, 0)
    passages = evaluate.heldout_passages(embedded_corpus(), tokenizer, heldout_fraction=meta["heldout_fraction"],
                                         seed=meta["seed"], ref_len=REF_LEN, num_passages=len(LENGTHS))
    lengths = np.asarray(LENGTHS, np.int32)
    tokens = np.where(np.arange(REF_LEN)[None] < lengths[:, None], passages.tokens, 0)
    passages = evaluate.Passages(tokens=tokens, lengths=lengths, doc_ids=passages.doc_ids)
    sink = sink_tokens(tokenizer, "Reference:")
    return dict(meta=meta, tokenizer=tokenizer, all_cfg=all_cfg, params=params, passages=passages, sink=sink)


def test_heldout_passages_and_partners(setup):
    tokenizer, meta = setup["tokenizer"], setup["meta"]
    p = evaluate.heldout_passages(embedded_corpus(), tokenizer, heldout_fraction=meta["heldout_fraction"],
                                  seed=meta["seed"], ref_len=REF_LEN, num_passages=40, min_tokens=32)
    docs = {d.doc_id: d.text for d in embedded_corpus()}
    assert len(p) == 40 and p.tokens.shape == (40, REF_LEN) and (p.lengths >= 32).all()
    assert all(heldout_split(d, meta["heldout_fraction"], meta["seed"]) for d in p.doc_ids)
    first_round = len(set(p.doc_ids))
    assert p.doc_ids[:first_round] == tuple(dict.fromkeys(p.doc_ids))  # round-robin: every document first
    for i in (0, first_round):  # a passage is a slice of its document's tokens
        ids = tokenizer.encode(docs[p.doc_ids[i]])
        piece = p.tokens[i, : p.lengths[i]].tolist()
        assert any(ids[s:s + REF_LEN] == piece for s in range(0, len(ids), REF_LEN))
        assert (p.tokens[i, p.lengths[i]:] == 0).all()
    partners = evaluate.shuffled_partners(p.doc_ids)
    assert all(p.doc_ids[j] != p.doc_ids[i] for i, j in enumerate(partners))
    assert (evaluate.shuffled_partners(["a", "a", "a"]) != np.arange(3)).all()  # one document: still not itself


@pytest.fixture(scope="module")
def nll(setup):
    """Every condition at k = 128 (k = 8 runs in the CLI test), the encoder's output and both codecs, every layer
    and KV head a memory head; batches of 3 (the second one short: padded to shape)."""
    return evaluate.passage_nll(setup["params"], setup["all_cfg"], setup["passages"], setup["sink"],
                                bos_id=setup["tokenizer"].bos_id, ks=[REF_LEN],
                                codecs=[evaluate.NO_CODEC, "bf16", "int8"], batch_size=3)


def plain_loss_on_one_sequence(params, cfg, passages, sink, bos_id):
    """Mean loss on each context when sink + reference + context are one plain sequence: positions 0..p-1,
    p..p+n-1 (the reference) and p+128.. (the context), as the memory layout places them; padding after."""
    p, b = len(sink), len(passages)
    t = p + 2 * REF_LEN
    seq, pos, seg = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for i, (tokens, n) in enumerate(zip(passages.tokens, passages.lengths, strict=True)):
        ref = tokens[:n]
        m = p + 2 * n
        seq[i, :m] = np.concatenate([sink, ref, [bos_id], ref[:-1]])
        pos[i, :m] = np.concatenate([np.arange(p + n), p + REF_LEN + np.arange(n)])
        seg[i, :m] = 1
    graphdef = params_lib.graphdef(dataclasses.replace(cfg, memory_layers=(), memory_kv_heads=()))
    logits = jax.jit(lambda params, *x: nnx.merge(graphdef, params)(*x))(params, seq, pos, seg)
    logits = np.asarray(logits, np.float64)[..., : cfg.vocab_size]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return np.asarray([-logp[i, p + n:p + 2 * n][np.arange(n), tokens[:n]].mean()
                       for i, (tokens, n) in enumerate(zip(passages.tokens, passages.lengths, strict=True))])


def test_own_full_memory_equals_one_long_sequence(setup, nll):
    """Oracle 1 in loss form: k = 128 with every layer and KV head a memory head is the plain long sequence."""
    own = nll[f"own k={REF_LEN} none"] / nll["tokens"]
    expected = plain_loss_on_one_sequence(setup["params"], setup["all_cfg"], setup["passages"], setup["sink"],
                                          setup["tokenizer"].bos_id)
    np.testing.assert_allclose(own, expected, rtol=1e-5, atol=1e-5)
    empty = nll["empty"] / nll["tokens"]
    assert np.abs(own - empty).min() > 0.05, (own, empty)  # the memory matters: the comparison is not vacuous
    shuffled = nll[f"shuffled k={REF_LEN} none"] / nll["tokens"]
    assert np.abs(shuffled - own).min() > 0.05


def test_codecs_empty_and_off(nll):
    """int8 within a small tolerance of bf16 and of the encoder's float32 output; empty memory is not memory
    off; every loss finite."""
    assert set(nll) == {*evaluate.condition_names([REF_LEN], ["none", "bf16", "int8"]), "tokens"}
    loss = {name: v / nll["tokens"] for name, v in nll.items()}
    assert all(np.isfinite(v).all() for v in loss.values())
    own = f"own k={REF_LEN}"
    effect = np.abs(loss[f"{own} none"] - loss["empty"])
    assert effect.min() > 0.01, effect
    for codec, tol in (("bf16", 0.005), ("int8", 0.02)):
        err = np.abs(loss[f"{own} {codec}"] - loss[f"{own} none"])
        assert err.max() < tol and err.max() < 0.2 * effect.min(), (codec, err, effect)
    assert np.abs(loss[f"{own} int8"] - loss[f"{own} bf16"]).max() < 0.02
    assert np.abs(loss["empty"] - loss["off"]).min() > 1e-3
    s = evaluate.summarize(nll)
    assert s["empty"]["delta_empty"] == 0 and s["off"]["delta_off"] == 0
    assert s["own k=128 int8"]["loss"] == pytest.approx(nll["own k=128 int8"].sum() / nll["tokens"].sum())


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/eval_memory_loss.py", "--config=tests/lm_test_config.py", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_numbers_are_the_library_numbers(setup, lm_data, tmp_path):
    """tools/eval_memory_loss.py on an init checkpoint of tests/lm_test_config.py (memory layers = first half): its
    per-passage losses and summary are passage_nll's and summarize's on the same parameters, passages and --k. K_CLI
    is neither config.memory.k nor ref_len, and its losses differ from config.memory.k's: a tool that ignored --k
    (or a library that ignored k) would not match."""
    import lm_test_config

    config = lm_test_config.get_config()
    config.data.path = lm_data
    config.model.update(vocab_size=setup["meta"]["vocab_size"], init_std=0.3)
    cfg = ModelConfig.from_config(config.model, config.memory)
    params = init_params(cfg, 1)
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=1, async_save=False)
    ckpt.save(1, {"params": params}, {}, json.loads(config.to_json_best_effort()),
              {"run_id": "test", "data": {"tokenizer_sha256": setup["tokenizer"].sha256}})
    ckpt.wait()
    ckpt.close()
    out_json = tmp_path / "out.json"
    proc = run_tool(f"--checkpoint={tmp_path}", f"--tokenizer={Path(lm_data).parent / 'spm.model'}",
                    "--num_passages=3", f"--k={K_CLI}", "--codec=bf16", "--batch_size=3", f"--json={out_json}")
    assert proc.returncode == 0, proc.stderr
    assert "3 held-out passages" in proc.stdout and f"own k={K_CLI} bf16" in proc.stdout, proc.stdout
    result = json.loads(out_json.read_text())
    assert result["setup"]["memory_layers"] == [0]

    meta, tokenizer = setup["meta"], setup["tokenizer"]
    passages = evaluate.heldout_passages(embedded_corpus(), tokenizer, heldout_fraction=meta["heldout_fraction"],
                                         seed=meta["seed"], ref_len=REF_LEN, num_passages=3)
    assert result["doc_ids"] == list(passages.doc_ids) and result["tokens"] == passages.lengths.tolist()
    nll = evaluate.passage_nll(params, cfg, passages, setup["sink"], bos_id=tokenizer.bos_id,
                               ks=[K_CLI, config.memory.k], codecs=["bf16"], batch_size=3)
    names = evaluate.condition_names([K_CLI], ["bf16"])
    assert list(result["passage_loss"]) == list(result["summary"]) == names
    for name in names:
        np.testing.assert_allclose(result["passage_loss"][name], nll[name] / nll["tokens"], rtol=1e-5, err_msg=name)
    summary = evaluate.summarize({name: nll[name] for name in [*names, "tokens"]})
    for name in names:
        assert result["summary"][name] == pytest.approx(summary[name], rel=1e-5, abs=1e-6), name
    k_effect = np.abs(nll[f"own k={K_CLI} bf16"] - nll[f"own k={config.memory.k} bf16"]) / nll["tokens"]
    assert k_effect.min() > 1e-3, k_effect
