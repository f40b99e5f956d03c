"""The sentence embedder (m3jax/retrieval/embedder.py) against Hugging Face transformers in torch.

References are computed here, independently of the module: MiniLM through `AutoTokenizer` + `BertModel` with
mean pooling and L2 norm (the sentence-transformers recipe) on real CPython-documentation text; XLM-RoBERTa
through a small random `XLMRobertaModel` saved with its own `tokenizers` tokenizer, CLS-pooled, on padded batches
(HF derives its positions from the ids: padding_idx + 1, + 2, ...). A sentence-transformers `1_Pooling` config
overrides either default pooling. Also: a text's vector does not depend on its batch, sharding over 8 CPU devices
changes nothing, and bad directories fail with errors that name the problem.
"""

import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from m3jax.data.corpus import embedded_corpus
from m3jax.retrieval import embedder as embedder_lib
from m3jax.retrieval.embedder import DEFAULT_POOLING, REQUIRED_FILES, Embedder, encode, resolve_model_dir

MINILM = "all-MiniLM-L6-v2"
encode_jit = jax.jit(encode, static_argnums=1)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def corpus_texts() -> list[str]:
    """16 real texts from a few words to past the 256-token truncation, plus two very short ones."""
    docs = embedded_corpus()
    lengths = [40, 80, 120, 200, 300, 450, 600, 800, 1000, 1300, 1600, 2500, 4000, 9000]
    return [docs[(37 * i) % len(docs)].text[:n] for i, n in enumerate(lengths)] + ["Hello.", "x"]


@pytest.fixture(scope="module")
def minilm():
    """(our embedder, the HF tokenizer, the HF BertModel), loaded once."""
    model_dir = resolve_model_dir(MINILM)
    hf_model = transformers.BertModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    return Embedder.load(MINILM), transformers.AutoTokenizer.from_pretrained(model_dir), hf_model


def test_minilm_matches_transformers(minilm):
    embedder, hf_tok, hf_model = minilm
    texts = corpus_texts()
    batch = hf_tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = hf_model(**batch).last_hidden_state.numpy()  # [n, seq, 384]
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    want = normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))

    assert embedder.tokenize(texts) == [list(row[m == 1]) for row, m in zip(ids, mask, strict=True)]
    got = embedder.embed(texts)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert (got * want).sum(1).min() >= 0.9999
    ours = np.asarray(encode_jit(embedder.params, embedder.config, ids, mask))
    np.testing.assert_allclose(ours[mask == 1], hidden[mask == 1], atol=1e-4)
    assert embedder.embed([]).shape == (0, 384)
    assert embedder.identity["name"] == MINILM and embedder.identity["pooling"] == "mean"
    assert len(embedder.identity["weights_sha256"]) == 64


def test_minilm_semantics(minilm):
    embedder = minilm[0]
    pairs = [("How do I open a file for reading in Python?", "What is the way to read a text file with Python?"),
             ("The dog is playing in the garden.", "A puppy runs around on the lawn."),
             ("Sort a list of numbers in ascending order.", "Arrange the integers from smallest to largest.")]
    a = embedder.embed([p for p, _ in pairs])
    b = embedder.embed([q for _, q in pairs])
    sims = a @ b.T  # [3, 3]: paraphrases on the diagonal
    for i in range(len(pairs)):
        assert sims[i, i] > np.delete(sims[i], i).max() + 0.2, sims


def test_sharded_equals_unsharded(minilm):
    embedder = minilm[0]
    texts = corpus_texts()
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))  # Explicit axes, jax's default
    sharded = Embedder.load(MINILM, batch_size=5, mesh=mesh)
    assert sharded.batch_size == 8  # a multiple of the 8 devices: 16 texts in 2 batches of different lengths
    np.testing.assert_allclose(sharded.embed(texts), embedder.embed(texts), atol=1e-5)


# A small random XLM-RoBERTa and a word-level tokenizer over it; pad id 1 as in XLM-R / BGE-M3.
WORDS = ["memory", "model", "the", "a", "of", "text", "key", "value", "attention", "layer", "token", "sparse"]
XLMR = dict(vocab_size=250, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory):
    """A saved random XLMRobertaModel (LayerNorms randomised too) with its tokenizer.json; max 128 tokens."""
    path = tmp_path_factory.mktemp("xlmr")
    torch.manual_seed(0)
    model = transformers.XLMRobertaModel(transformers.XLMRobertaConfig(**XLMR, initializer_range=0.2)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3} | {w: 4 + i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(path / "tokenizer.json"))
    return path


def xlmr_texts() -> list[str]:
    """Word sequences of 1 to 200 words (the longest is truncated to 128 tokens)."""
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS + ["unknown"], n)) for n in (1, 5, 29, 30, 31, 47, 90, 200)]


def xlmr_hidden(model_dir, token_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HF XLMRobertaModel's last hidden states [n, seq, hidden] of `token_ids` right-padded with pad id 1, and
    the padded ids and mask [n, seq]."""
    hf_model = transformers.XLMRobertaModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    seq = max(len(t) for t in token_ids)
    ids = np.ones((len(token_ids), seq), np.int64)
    mask = np.zeros((len(token_ids), seq), np.int64)
    for i, t in enumerate(token_ids):
        ids[i, :len(t)], mask[i, :len(t)] = t, 1
    with torch.no_grad():
        hidden = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    return hidden.numpy(), ids, mask


def test_xlmr_matches_transformers(xlmr_dir):
    embedder = Embedder.load(str(xlmr_dir), max_len=128, batch_size=4)
    assert embedder.identity["model_type"] == "xlm-roberta" and embedder.identity["pooling"] == "cls"
    texts = xlmr_texts()
    token_ids = embedder.tokenize(texts)
    assert max(len(t) for t in token_ids) == 128 and all(t[0] == 0 and t[-1] == 2 for t in token_ids)  # truncated
    hidden, ids, mask = xlmr_hidden(xlmr_dir, token_ids)  # [n, 128, 64]

    ours = np.asarray(encode_jit(embedder.params, embedder.config, ids, mask))
    np.testing.assert_allclose(ours[mask == 1], hidden[mask == 1], atol=1e-4)
    got = embedder.embed(texts)  # batches of 4 over 2 length buckets
    np.testing.assert_allclose(got, normalize(hidden[:, 0]), atol=1e-5)
    alone = np.concatenate([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(got, alone, atol=1e-5)


def numpy_pooling(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Unit vectors of hidden states [n, seq, dim]: the first token ("cls") or the mean over real tokens."""
    pooled = hidden[:, 0] if mode == "cls" else (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return normalize(pooled)


def with_pooling(model_dir, out, mode: str):
    """`model_dir`'s files linked into `out`, with a sentence-transformers 1_Pooling/config.json selecting
    `mode` (the packaged MiniLM's own file, its flags set for `mode`)."""
    out.mkdir()
    for name in REQUIRED_FILES:
        (out / name).symlink_to(model_dir / name)
    pooling = json.loads((resolve_model_dir(MINILM) / "1_Pooling" / "config.json").read_text())
    pooling.update(word_embedding_dimension=json.loads((model_dir / "config.json").read_text())["hidden_size"],
                   pooling_mode_cls_token=mode == "cls", pooling_mode_mean_tokens=mode == "mean")
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return str(out)


def test_pooling_config_overrides_the_default(minilm, xlmr_dir, tmp_path, monkeypatch):
    """Documented: "a sentence-transformers `1_Pooling` config decides when present". CLS pooling for MiniLM (BERT:
    mean by default) and mean pooling for XLM-R (CLS by default) give that pooling of HF's hidden states.
    Negative control: a loader that ignores the file gives the default pooling and fails the check."""
    _, hf_tok, hf_model = minilm
    texts = corpus_texts()[:6]
    batch = hf_tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = hf_model(**batch).last_hidden_state.numpy()
    cls = Embedder.load(with_pooling(resolve_model_dir(MINILM), tmp_path / "minilm_cls", "cls"))
    assert cls.identity["pooling"] == "cls"
    np.testing.assert_allclose(cls.embed(texts), numpy_pooling(hidden, batch["attention_mask"].numpy(), "cls"),
                               atol=1e-5)

    xlmr_mean = with_pooling(xlmr_dir, tmp_path / "xlmr_mean", "mean")
    texts = xlmr_texts()
    embedder = Embedder.load(xlmr_mean, max_len=128)
    assert embedder.identity["pooling"] == "mean"
    hidden, _, mask = xlmr_hidden(xlmr_dir, embedder.tokenize(texts))

    def assert_mean_pooled(embedder):
        np.testing.assert_allclose(embedder.embed(texts), numpy_pooling(hidden, mask, "mean"), atol=1e-5,
                                   err_msg="not the mean pooling that 1_Pooling selects")

    assert_mean_pooled(embedder)
    monkeypatch.setattr(embedder_lib, "read_pooling", lambda model_dir, model_type: DEFAULT_POOLING[model_type])
    with pytest.raises(AssertionError, match="not the mean pooling that 1_Pooling selects"):
        assert_mean_pooled(Embedder.load(xlmr_mean, max_len=128))


def test_bad_model_dirs(tmp_path, xlmr_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Embedder.load(str(tmp_path / "nowhere"))
    no_tok = tmp_path / "no_tok"
    shutil.copytree(xlmr_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Embedder.load(str(no_tok))

    gpt = tmp_path / "gpt"
    shutil.copytree(xlmr_dir, gpt)
    config = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json.*gpt2"):
        Embedder.load(str(gpt))

    missing = tmp_path / "missing"
    shutil.copytree(xlmr_dir, missing)
    tensors = safetensors.numpy.load_file(missing / "model.safetensors")
    del tensors["encoder.layer.1.output.dense.bias"]
    safetensors.numpy.save_file(tensors, missing / "model.safetensors")
    with pytest.raises(KeyError, match=r"encoder\.layer\.1\.output\.dense\.bias.*model\.safetensors"):
        Embedder.load(str(missing), max_len=128)
