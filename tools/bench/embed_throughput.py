"""Throughput of the sentence embedder (texts/s) per batch size, beside Hugging Face torch on the same texts.

    python tools/bench/embed_throughput.py [--model=all-MiniLM-L6-v2 --texts=256 --chars=300 \
        --batch_sizes=32,64,128 --max_len=256 --repeats=2 --torch]

The texts are real: the embedded corpus (CPython's documentation) cut into `chars`-character pieces, about the
size of a Memory3 reference (~64 tokens), `texts` of them drawn with a fixed seed. For each batch size,
`Embedder.embed` on all texts is called once to compile every shape, then timed (best of `repeats`; tokenising,
padding and the host copy included). If torch and transformers are importable, the same texts go through
`AutoTokenizer` + `AutoModel` (`BertModel` for MiniLM) in torch the way sentence-transformers runs them (sorted by
length, padded to the longest of each batch, mean or CLS pooling as ours, L2 norm), and the ratio and the lowest
cosine between the two embeddings are printed. The machine is shared and noisy: compare ratios within one run.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import app, flags

from m3jax.data.corpus import embedded_corpus
from m3jax.retrieval.embedder import Embedder, resolve_model_dir

_MODEL = flags.DEFINE_string("model", "all-MiniLM-L6-v2", "packaged model name or local HF directory")
_TEXTS = flags.DEFINE_integer("texts", 256, "texts embedded per timed call")
_CHARS = flags.DEFINE_integer("chars", 300, "characters per text (pieces of the embedded corpus)")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32", "64", "128"], "batch sizes to compare")
_MAX_LEN = flags.DEFINE_integer("max_len", 256, "tokens per text after truncation")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed calls per batch size (best is reported)")
_TORCH = flags.DEFINE_bool("torch", True, "also time Hugging Face torch (if importable)")


def corpus_pieces(n: int, chars: int) -> list[str]:
    """`n` pieces of `chars` characters of the embedded corpus, drawn with a fixed seed."""
    pieces = [d.text[i:i + chars] for d in embedded_corpus() for i in range(0, len(d.text) - chars + 1, chars)]
    rng = np.random.default_rng(0)
    return [pieces[i] for i in rng.choice(len(pieces), n, replace=False)]


def best_time(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time of `fn` over `repeats` calls after one warm-up call, and its output."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def torch_embedder(model_dir, pooling: str, max_len: int, batch_size: int) -> Callable[[Sequence[str]], np.ndarray]:
    """The sentence-transformers loop in torch: length-sorted batches padded to their longest text."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    def embed(texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), model.config.hidden_size), np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_len,
                                  return_tensors="pt")
                hidden = model(**batch).last_hidden_state  # [b, t, dim]
                if pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"][..., None].float()
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    return embed


def main(argv):
    del argv
    texts = corpus_pieces(_TEXTS.value, _CHARS.value)
    use_torch = _TORCH.value and all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    rows = []
    for batch_size in map(int, _BATCH_SIZES.value):
        embedder = Embedder.load(_MODEL.value, max_len=_MAX_LEN.value, batch_size=batch_size)
        if not rows:
            tokens = [len(t) for t in embedder.tokenize(texts)]
            print(f"device: {jax.devices()[0].device_kind}; model: {embedder.identity['name']} "
                  f"({embedder.identity['model_type']}, {embedder.pooling} pooling, dim {embedder.dim}); "
                  f"{len(texts)} texts of {_CHARS.value} chars, {np.mean(tokens):.0f} tokens on average "
                  f"(max {max(tokens)}); best of {_REPEATS.value} after a warm-up call")
        jax_s, ours = best_time(lambda e=embedder: e.embed(texts), _REPEATS.value)
        row = {"batch": batch_size, "jax": len(texts) / jax_s}
        if use_torch:
            embed = torch_embedder(resolve_model_dir(_MODEL.value), embedder.pooling, _MAX_LEN.value, batch_size)
            torch_s, theirs = best_time(lambda embed=embed: embed(texts), _REPEATS.value)
            row |= {"torch": len(texts) / torch_s, "min_cos": float((ours * theirs).sum(1).min())}
        rows.append(row)

    header = f"{'batch':>6} {'jax texts/s':>12}"
    if use_torch:
        header += f" {'torch texts/s':>14} {'jax/torch':>10} {'min cos':>9}"
    print(header)
    for r in rows:
        line = f"{r['batch']:>6} {r['jax']:>12.1f}"
        if use_torch:
            line += f" {r['torch']:>14.1f} {r['jax'] / r['torch']:>9.2f}x {r['min_cos']:>9.6f}"
        print(line)


if __name__ == "__main__":
    app.run(main)
