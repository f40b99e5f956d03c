"""Generation (m3jax/infer/generate.py): cached decoding equals full recomputation with memory swaps, batching with
unequal prompts equals one by one, RAG equals the plain model on the concatenated text, sampling."""

import json

import jax
import numpy as np
import pytest
from test_memory import random_params

from m3jax.data.tokenizer import Tokenizer
from m3jax.infer.generate import BankMemories, Sampling, generate
from m3jax.memory import bank as bank_lib
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib
from m3jax.model.memory import Memory, valid_keys
from m3jax.retrieval.embedder import Embedder
from m3jax.retrieval.index import Index
from m3jax.retrieval.query import QueryRetriever

SLOTS = 5


@pytest.fixture(scope="module")
def setup(memory_kb, kb_retrieval):
    """memory_kb's bank and index behind a QueryRetriever, a model of its architecture with random parameters
    (std 0.15: memory moves the logits), and prompts of 9, 70 and 140 tokens (bos included) of the knowledge
    base's text."""
    config = memory_kb["config"]
    cfg = ModelConfig.from_config(config.model, config.memory)
    tokenizer = Tokenizer(memory_kb["tokenizer"])
    bank = bank_lib.MemoryBank.open(memory_kb["bank"], expect_architecture=bank_lib.architecture(cfg),
                                    expect_tokenizer=tokenizer.sha256, allow_other_checkpoint=True)
    embedder = Embedder.load("all-MiniLM-L6-v2", max_len=256, batch_size=16)
    index = Index.load(kb_retrieval["index"], expect_embedder=embedder.identity)
    retriever = QueryRetriever(embedder.embed, index.search, bank.read_tokens, tokenizer.encode, refs=SLOTS,
                               candidates=20, max_overlap=2 / 3)
    with open(memory_kb["knowledge"]) as f:
        text = tokenizer.encode(" ".join(json.loads(line)["text"] for line in f.readlines()[-3:]))
    bos = tokenizer.bos_id
    prompts = [[bos, *text[:8]], [bos, *text[100:169]], [bos, *text[300:439]]]
    return {"cfg": cfg, "params": random_params(cfg, 5), "bank": bank, "tokenizer": tokenizer, "prompts": prompts,
            "source": BankMemories(bank, retriever, tokenizer)}


def full_forward(cfg, params, source, prompt, generated, references, chunk=64):
    """Logits [n, vocab] of every generated token from one forward pass over prompt + generated[:-1], reading the
    references the generation reports: the prompt's chunk g reads group g's; generated token m (as an input) is in
    the group of the segment m // chunk (the first inherits the last prompt chunk's group)."""
    seq = np.asarray(prompt + list(generated[:-1]), np.int32)
    logical = np.concatenate([np.arange(len(prompt)) // chunk,
                              (len(prompt) - 1) // chunk + np.arange(len(generated) - 1) // chunk])
    # The forward pass reads memory by groups of at most `chunk` consecutive tokens: a logical group longer than
    # that (the last prompt chunk and the first generated tokens) is split into groups reading the same references.
    groups, of_group, run = np.zeros(seq.size, np.int32), [], 0
    for m, g in enumerate(logical):
        if m == 0 or g != logical[m - 1] or run == chunk:
            of_group.append(g)
            run = 0
        groups[m], run = len(of_group) - 1, run + 1
    ids = np.asarray(references, np.int64)[of_group]  # [groups, slots]
    kv, positions = source.memories(ids.reshape(1, -1), cfg.compute_dtype)
    index = np.where(ids >= 0, np.arange(ids.size).reshape(ids.shape), -1)[None].astype(np.int32)
    memory = Memory.from_rows(kv, index, valid_keys(positions), source.sink)
    start = cfg.context_start(len(source.sink))
    model = params_lib.model_from(cfg, params)
    logits = jax.jit(model.__call__)(seq[None], (start + np.arange(seq.size, dtype=np.int32))[None],
                                     np.ones((1, seq.size), np.int32), groups[None].astype(np.int32), memory)
    return np.asarray(logits[0, len(prompt) - 1:, :cfg.vocab_size], np.float32)


def test_cached_decoding_with_memory_swaps_equals_full_recomputation(setup):
    """70 tokens generated after prompts of 70 and 140 tokens: the prompt read chunk by chunk, one memory swap at
    64 generated tokens; every step's logits equal one forward pass over the whole text with the same memories.
    The swap's references are the ones the last 64 tokens retrieve; memory moves the logits."""
    cfg, params, source, tok = (setup[k] for k in ("cfg", "params", "source", "tokenizer"))
    prompts = setup["prompts"][1:]
    out = generate(params, cfg, prompts, 70, mode="memory3", source=source, slots=SLOTS, return_logits=True)
    plain = generate(params, cfg, prompts, 70, mode="none", return_logits=True)
    for i, prompt in enumerate(prompts):
        refs = out.references[i]
        prompt_groups = -(-len(prompt) // 64)
        assert refs.shape == (prompt_groups + 1, SLOTS)  # the prompt's chunks and one swap
        assert (refs >= 0).any()
        want = full_forward(cfg, params, source, prompt, out.tokens[i], refs)
        np.testing.assert_allclose(out.logits[i], want, rtol=1e-4, atol=1e-4)
        history = prompt + out.tokens[i, :64].tolist()
        np.testing.assert_array_equal(refs[-1], source.retrieve([history[-64:]], [history[-64:]])[0])
        assert np.abs(out.logits[i, 0] - plain.logits[i, 0]).max() > 1e-3  # memory is read
    for i, prompt in enumerate(prompts):  # the plain model: the same, with no memory and positions from 0
        seq = np.asarray(prompt + plain.tokens[i, :-1].tolist(), np.int32)[None]
        model = params_lib.model_from(cfg, params)
        want = np.asarray(jax.jit(model.__call__)(seq, np.arange(seq.shape[1], dtype=np.int32)[None],
                                                  np.ones_like(seq)))[0, len(prompt) - 1:, :cfg.vocab_size]
        np.testing.assert_allclose(plain.logits[i], want, rtol=1e-4, atol=1e-4)


def test_a_batch_of_unequal_prompts_equals_one_by_one(setup):
    cfg, params, source = setup["cfg"], setup["params"], setup["source"]
    batch = generate(params, cfg, setup["prompts"], 20, mode="memory3", source=source, return_logits=True)
    for i, prompt in enumerate(setup["prompts"]):
        alone = generate(params, cfg, [prompt], 20, mode="memory3", source=source, return_logits=True)
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
        np.testing.assert_allclose(batch.logits[i], alone.logits[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(batch.references[i], alone.references[0])


def test_rag_is_the_plain_model_on_the_references_and_the_prompt(setup):
    cfg, params, source, tok = (setup[k] for k in ("cfg", "params", "source", "tokenizer"))
    prompts = setup["prompts"][:2]
    rag = generate(params, cfg, prompts, 12, mode="rag", source=source, bos_id=tok.bos_id)
    ids = source.retrieve(prompts, against=prompts)
    for i, prompt in enumerate(prompts):
        row = ids[i][ids[i] >= 0]
        text = [int(t) for r in setup["bank"].read_tokens(row) for t in r if t >= 0]
        concatenated = [tok.bos_id, *text, *prompt[1:]]
        assert rag.prompts[i] == concatenated
        np.testing.assert_array_equal(rag.references[i][0], row)
        plain = generate(params, cfg, [concatenated], 12, mode="none")
        np.testing.assert_array_equal(rag.tokens[i], plain.tokens[0])


def test_sampling(setup):
    cfg, params = setup["cfg"], setup["params"]
    prompts = setup["prompts"][:2]
    greedy = generate(params, cfg, prompts, 8, mode="none")
    narrow = generate(params, cfg, prompts, 8, mode="none", sampling=Sampling(temperature=1.0, top_p=1e-6, seed=3))
    np.testing.assert_array_equal(narrow.tokens, greedy.tokens)  # top-p below any probability: the argmax
    a = generate(params, cfg, prompts, 8, mode="none", sampling=Sampling(temperature=2.0, seed=1))
    b = generate(params, cfg, prompts, 8, mode="none", sampling=Sampling(temperature=2.0, seed=1))
    c = generate(params, cfg, prompts, 8, mode="none", sampling=Sampling(temperature=2.0, seed=2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any() and (a.tokens != greedy.tokens).any()
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="mode 'beam' is not one of"):
        generate(params, cfg, prompts, 8, mode="beam")
    with pytest.raises(ValueError, match="needs a memory source"):
        generate(params, cfg, prompts, 8, mode="memory3")


def numpy_logprob(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Sum over steps of log softmax(logits[s])[tokens[s]], in float64 numpy."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    return float((z[np.arange(len(tokens)), tokens] - lse).sum())


def test_scoring_equals_what_cached_generation_read(setup):
    """score() of each prompt's own greedy continuation (40 tokens; prompts of 9, 70, 128 and 140 tokens: the
    128-token one continues in a new group of the same memories) equals the numpy log-likelihood of the cached
    decoder's logits, in every mode, is greedy, and a continuation whose last token is not the argmax scores lower
    and is not greedy."""
    from m3jax.infer.score import score

    cfg, params, source, tok = (setup[k] for k in ("cfg", "params", "source", "tokenizer"))
    prompts = [*setup["prompts"], setup["prompts"][2][:128]]
    for mode in ("none", "memory3", "rag"):
        kw = {"source": source, "bos_id": tok.bos_id} if mode != "none" else {}
        out = generate(params, cfg, prompts, 40, mode=mode, return_logits=True, **kw)
        conts = [row.tolist() for row in out.tokens]
        got = score(params, cfg, prompts, conts, mode=mode, batch_size=3, **kw)
        want = [numpy_logprob(out.logits[i], out.tokens[i]) for i in range(len(prompts))]
        np.testing.assert_allclose(got.logprob, want, rtol=1e-4, atol=2e-3, err_msg=mode)
        assert got.greedy.all() and (got.tokens == 40).all(), mode
        if mode != "none":
            for a, b in zip(got.references, out.references, strict=True):
                np.testing.assert_array_equal(a, b[:len(a)])
        first = score(params, cfg, prompts, [c[:21] for c in conts], mode=mode, **kw)
        bent = score(params, cfg, prompts, [c[:20] + [(c[20] + 1) % cfg.vocab_size] for c in conts], mode=mode, **kw)
        assert (bent.logprob < first.logprob).all() and first.greedy.all() and not bent.greedy.any(), mode
    with pytest.raises(ValueError, match="item 1: the context and the continuation"):
        score(params, cfg, prompts[:2], [[1], []], mode="none")


def plain_logprob(cfg, params, seq, scored_from):
    """Summed numpy log-softmax log-probabilities of seq[scored_from + 1:], the plain model over seq."""
    model = params_lib.model_from(cfg, params)
    x = np.asarray(seq, np.int32)[None]
    logits = np.asarray(jax.jit(model.__call__)(x, np.arange(x.shape[1], dtype=np.int32)[None], np.ones_like(x)),
                        np.float64)[0, scored_from:-1, :cfg.vocab_size]
    return numpy_logprob(logits, np.asarray(seq[scored_from + 1:])), len(seq) - 1 - scored_from


def test_passage_perplexity_reads_the_previous_chunks_memories(setup):
    """Memory3 perplexity (chunk g reads what chunk g - 1 retrieves, filtered against the passage) equals
    decoding the passage token by token through the KV cache, swapping in those memories at each chunk boundary;
    the plain and RAG modes equal numpy log-softmax of the plain model; memory moves the loss."""
    from m3jax.infer.evaluation import Evaluator, passage_perplexity

    cfg, params, source, tok = (setup[k] for k in ("cfg", "params", "source", "tokenizer"))
    passages = [setup["prompts"][2][1:], setup["prompts"][1][1:]]  # 139 and 69 tokens: 3 and 2 chunks
    ev = Evaluator(params, cfg, tok, source, slots=SLOTS, batch_size=2)
    got = passage_perplexity(ev, passages)
    assert got["tokens"] == 208
    model = params_lib.model_from(cfg, params)
    decode = jax.jit(model.decode_step)
    start, chunk = cfg.context_start(len(source.sink)), cfg.memory_chunk_size
    total, count, rag_total, none_total = 0.0, 0, 0.0, 0.0
    for passage in passages:
        full = [tok.bos_id, *passage]
        kv, positions = source.memories(np.full((1, SLOTS), -1), cfg.compute_dtype)
        memory = Memory.from_rows(kv, np.full((1, 1, SLOTS), -1, np.int32), valid_keys(positions), source.sink)
        logits, cache = model.prefill(np.asarray([[full[0]]], np.int32), np.asarray([[start]], np.int32),
                                      np.ones((1, 1), np.int32), np.zeros((1, 1), np.int32), memory,
                                      len(source.sink) + len(full) + 8)
        steps = [np.asarray(logits[0, -1, :cfg.vocab_size], np.float64)]
        for m in range(1, len(full) - 1):
            if m % chunk == 0:  # group m // chunk reads the previous chunk's references
                ids = source.retrieve([full[m - chunk:m]], against=[full])[:, :SLOTS]
                kv, positions = source.memories(ids, cfg.compute_dtype)
                kv = jax.numpy.moveaxis(jax.numpy.asarray(kv), 2, 0)
                cache = cache.with_memories(kv[:, :, :, 0], kv[:, :, :, 1], jax.numpy.asarray(valid_keys(positions)))
            logits, cache = decode(np.asarray([[full[m]]], np.int32), np.asarray([[start + m]], np.int32), cache)
            steps.append(np.asarray(logits[0, -1, :cfg.vocab_size], np.float64))
        total += numpy_logprob(np.stack(steps), np.asarray(full[1:]))
        count += len(full) - 1
        none_total += plain_logprob(cfg, params, full, 0)[0]
        ids = source.retrieve([full[:chunk]], against=[full])[0, :SLOTS]
        text = [int(x) for r in setup["bank"].read_tokens(ids[ids >= 0]) for x in r if x >= 0]
        rag_total += plain_logprob(cfg, params, [full[0], *text, *full[1:]], len(text))[0]
    np.testing.assert_allclose(got["memory3"]["loss"], -total / count, rtol=1e-5)
    np.testing.assert_allclose(got["none"]["loss"], -none_total / count, rtol=1e-5)
    np.testing.assert_allclose(got["rag"]["loss"], -rag_total / count, rtol=1e-5)
    assert abs(got["memory3"]["loss"] - got["none"]["loss"]) > 1e-3
    np.testing.assert_allclose(got["none"]["perplexity"], np.exp(got["none"]["loss"]))


def test_multiple_choice_and_knowledge_cloze_choose_by_likelihood(setup):
    """Multiple choice picks the choice of highest log-likelihood after the context (acc) or per character
    (acc_norm): the plain mode's choices equal numpy log-softmax of the plain model; knowledge cloze items hold
    the true continuation among distractors and score its loss; malformed items are refused by index."""
    from m3jax.infer.evaluation import Evaluator, document_windows, knowledge_cloze, multiple_choice

    cfg, params, source, tok = (setup[k] for k in ("cfg", "params", "source", "tokenizer"))
    ev = Evaluator(params, cfg, tok, source, slots=SLOTS, batch_size=4)
    words = tok.decode(setup["prompts"][2][1:]).split()
    items = [{"context": " ".join(words[i:i + 12]), "choices": [words[i + 12], words[i + 20], "zebra"],
              "answer": i % 3} for i in (0, 4, 8)]
    got = multiple_choice(ev, items)
    acc, acc_norm = [], []
    for it in items:
        ctx = [tok.bos_id, *tok.encode(it["context"])]
        lps = np.asarray([plain_logprob(cfg, params, ctx + tok.encode(" " + c), len(ctx) - 1)[0]
                          for c in it["choices"]])
        acc.append(np.argmax(lps) == it["answer"])
        acc_norm.append(np.argmax(lps / [len(" " + c) for c in it["choices"]]) == it["answer"])
    assert got["none"] == {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}
    assert set(got) == {"items", "none", "memory3", "rag"} and got["items"] == 3
    with pytest.raises(ValueError, match="item 1: needs choices and an answer index"):
        multiple_choice(ev, [items[0], {"context": "x", "choices": ["a"], "answer": 3}])

    docs = [p[1:] for p in setup["prompts"][1:]] + [setup["prompts"][2][60:]]
    windows = document_windows(docs, 40, 8, distractors=2, seed=1)
    assert len(windows) == 3
    for w, d in zip(windows, docs, strict=True):
        assert w["question"] == list(d[:40]) and w["choices"][w["answer"]] == list(d[40:48])
    cloze_out = knowledge_cloze(ev, windows)
    for mode in ("none", "memory3", "rag"):
        assert 0 <= cloze_out[mode]["accuracy"] <= 1 and cloze_out[mode]["answer_loss"] > 0
    with pytest.raises(ValueError, match="too few for 5 distractors"):
        document_windows(docs, 40, 8, distractors=5)


def test_the_pytorch_module_generates_what_jax_generates(setup, tmp_path):
    """The exported weights and memory configuration in PyTorch (m3jax/export/torch_memory.py), reading the same
    bank through the same retriever: greedy generation of 70 tokens (one memory swap) equals ours token for token,
    with memory and without."""
    pytest.importorskip("torch")
    from m3jax.export import save_hf_llama
    from m3jax.export.memory_config import write_memory_config
    from m3jax.export.torch_memory import Memory3Llama

    cfg, params, source = setup["cfg"], setup["params"], setup["source"]
    save_hf_llama(params, cfg, tmp_path)
    write_memory_config(tmp_path, cfg, source.sink)
    model = Memory3Llama.from_pretrained(tmp_path)
    prompt = setup["prompts"][1]
    ours = generate(params, cfg, [prompt], 70, mode="memory3", source=source, slots=SLOTS)
    assert model.generate([prompt], 70, source, slots=SLOTS) == ours.tokens.tolist()
    plain = generate(params, cfg, [prompt], 70, mode="none")
    assert model.generate([prompt], 70, source, memory=False) == plain.tokens.tolist()
    assert ours.tokens.tolist() != plain.tokens.tolist()
