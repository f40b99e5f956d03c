"""Held-out entities scored while training (`config.eval`): what a model answers about people it can know only by
reading memory.

The items are the held-out entities' cloze items of `eval.cloze` (tools/make_entities.py): all of them, or a fixed
random sample of `eval.cloze_items`. Set up once per run, as the prompts never change:
- each item's reference: the reference of the memory source (the bank, or the knowledge base in online mode) whose
  text opens as the knowledge base's entry of that entity ("<name> (born ", `m3jax.data.entities.KB_TEMPLATE`);
- the reference each prompt retrieves: the index's best for the prompt's text (`retrieval.embedder`; no leakage
  filter, nothing leaks at evaluation), and the recall@1 of the items' own references.
Each evaluation completes the prompts greedily (`eval.cloze_tokens` tokens) with the parameters evaluated and scores
exact match (`m3jax.evals.cloze`) in three arms: the retrieved memory, empty memory (the sink kept) and memory off
(the plain model). Bank mode reads the retrieved memories from the bank (written by an earlier checkpoint); online
mode encodes them with the parameters evaluated, as its training step does, once per evaluation.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3jax.config import ConfigError
from m3jax.data.entities import KB_TEMPLATE
from m3jax.evals import cloze
from m3jax.memory import encode as encode_lib
from m3jax.model.config import ModelConfig
from m3jax.model.memory import Memory
from m3jax.retrieval import build
from m3jax.retrieval.embedder import Embedder
from m3jax.retrieval.index import Index
from m3jax.retrieval.query import QueryRetriever

# The arms scored, and the name of each one's accuracy in the evaluation line (beside loss, loss_empty_memory, ...).
ACCURACY = {"retrieved": "entity_accuracy", "empty": "entity_accuracy_empty_memory",
            "off": "entity_accuracy_memory_off"}
RECALL = "entity_recall_at_1"
_OPENING = KB_TEMPLATE[: KB_TEMPLATE.index("{", 1)]  # "{name} (born ": how an entity's knowledge-base entry opens
_TEXTS_PER_READ = 4096  # references decoded at once when looking for the entities'


def read_items(path: str, count: int) -> list[dict]:
    """The held-out entities' items of a cloze.jsonl (a local file or a `gs://` object), in file order: all
    (`count` 0) or a fixed random sample."""
    try:
        lines = epath.Path(path).read_text(encoding="utf-8").splitlines()
        items = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.eval.cloze: cannot read {path}: {e}") from e
    fields = {"name", "prompt", "answer", "heldout"}
    if any(not fields <= set(it) for it in items):
        raise ConfigError(f"config.eval.cloze: {path} is not a cloze.jsonl of tools/make_entities.py (each line "
                          f"holds {sorted(fields)})")
    heldout = [it for it in items if it["heldout"]]
    if not heldout:
        raise ConfigError(f"config.eval.cloze: {path} holds no held-out entity's item")
    if 0 < count < len(heldout):
        keep = np.sort(np.random.default_rng(0).choice(len(heldout), count, replace=False))
        heldout = [heldout[i] for i in keep]
    return heldout


def entity_references(texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """The reference stating each entity: the first of `texts` (the references' texts, by id) that opens as the
    knowledge-base entry of `names[i]`; [n] int64, -1 where none does."""
    marker = _OPENING.format(name="")
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        name, found, _ = text.partition(marker)
        if found:
            first.setdefault(name, i)
    return np.asarray([first.get(name, -1) for name in names], np.int64)


@functools.cache
def _encoder(cfg: ModelConfig, mesh: Mesh | None, rules):
    """jit(params, tokens [u, ref_len], lengths [u], sink) -> the references' memories, replicated on `mesh`."""
    fn = functools.partial(encode_lib.encode, cfg=cfg, k=cfg.memory_k, ref_len=cfg.memory_ref_len, rules=rules)
    return jax.jit(fn) if mesh is None else jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))


class EntityEval:
    """params -> {ACCURACY of each arm, RECALL} on the held-out entities of `config.eval.cloze` (the module
    docstring). source: the run's `MemoryBank` (bank mode) or `References` (online mode); sink: its sink tokens;
    tokenizer: the data's; mesh and rules: where the parameters live (a training run's), None for one device."""

    def __init__(self, config, model_cfg: ModelConfig, tokenizer, source, sink: np.ndarray, *,
                 mesh: Mesh | None = None, rules=()):
        t0 = time.perf_counter()
        e = config.eval
        self.cfg, self.tokenizer, self.source = model_cfg, tokenizer, source
        self.sink = np.asarray(sink, np.int32)
        self.mode = str(config.retrieval.mode)
        self.mesh, self.rules = mesh, cloze.hashable_rules(rules)
        self.steps, self.batch_size = int(e.cloze_tokens), int(e.cloze_batch)
        items = read_items(e.cloze, int(e.cloze_items))
        self.prompts, self.answers = [it["prompt"] for it in items], [it["answer"] for it in items]
        self.tokens, self.lengths = cloze.encode_prompts(tokenizer, self.prompts, model_cfg.memory_chunk_size)

        num_refs = source.num_refs if self.mode == "bank" else len(source)
        where = f"bank {source.path}" if self.mode == "bank" else f"knowledge base {config.memory.knowledge}"
        self.oracle = entity_references(self._texts(num_refs), [it["name"] for it in items])
        if (self.oracle < 0).any():
            name = items[int(np.argmax(self.oracle < 0))]["name"]
            raise ConfigError(f"config.eval.cloze: no reference of the {where} states entity {name!r} of "
                              f"{e.cloze}: the memories were written from another knowledge base than its entities'")
        index_dir = e.cloze_index or build.default_index_dir(config.memory.bank)
        embedder = Embedder.from_config(config.retrieval)
        try:
            index = Index.load(index_dir, expect_embedder=embedder.identity,
                               expect_bank=build.bank_binding(source) if self.mode == "bank" else None)
        except (OSError, ValueError) as err:
            raise ConfigError(f"config.eval.cloze_index: {err}") from err
        if index.num_vectors != num_refs:
            raise ConfigError(f"config.eval.cloze_index: the index at {index_dir} holds {index.num_vectors:,} "
                              f"references, the {where} {num_refs:,}")
        ref_tokens = source.read_tokens if self.mode == "bank" else (lambda ids: source.rows(ids)[0])
        retriever = QueryRetriever.from_config(config.retrieval, embedder, index, ref_tokens, tokenizer, refs=1)
        self.retrieved = retriever(self.prompts)[:, 0]  # filtered against the prompt (eval_max_overlap)
        self.recall = float(np.mean(self.retrieved == self.oracle))
        logging.info("entity evaluation: %d held-out items of %s, retrieval recall@1 %.3f (set up in %.1f s)",
                     len(items), e.cloze, self.recall, time.perf_counter() - t0)

    def __call__(self, params) -> dict[str, float]:
        texts = self.completions(params)
        out = {name: float(np.mean([cloze.exact_match(t, a) for t, a in zip(texts[arm], self.answers, strict=True)]))
               for arm, name in ACCURACY.items()}
        out[RECALL] = self.recall
        return out

    def completions(self, params) -> dict[str, list[str]]:
        """Each arm's greedy continuation of every prompt, decoded, under `params`."""
        memory_of = self._memories(params)
        out = {}
        for arm, ids in cloze.arm_references(tuple(ACCURACY), self.oracle, retrieved=self.retrieved).items():

            def rows_memory(rows, ids=ids):
                return cloze.no_memory(self.cfg, len(rows)) if ids is None else memory_of(ids[rows])

            generated = cloze.generate(params, self.cfg, self.tokens, self.lengths, rows_memory, self.steps,
                                       batch_size=self.batch_size, mesh=self.mesh, rules=self.rules)
            out[arm] = [self.tokenizer.decode(g) for g in generated]
        return out

    def _texts(self, num_refs: int) -> list[str]:
        """Every reference's text: its tokens (the bank's stored ones, or the knowledge base's), decoded."""
        texts = []
        for start in range(0, num_refs, _TEXTS_PER_READ):
            ids = np.arange(start, min(start + _TEXTS_PER_READ, num_refs))
            tokens = self.source.read_tokens(ids) if self.mode == "bank" else self.source.rows(ids)[0]
            texts.extend(self.tokenizer.decode(row[row >= 0]) for row in tokens)
        return texts

    def _memories(self, params) -> Callable[[np.ndarray], Memory]:
        """ids [b] -> the Memory in which row i reads reference ids[i] (-1: nothing): gathered from the bank, or
        (online mode) encoded by `params`, every retrieved reference once."""
        if self.mode == "bank":
            return lambda ids: cloze.single_slot_memory(self.source, ids, self.sink, self.cfg.compute_dtype)
        cfg = self.cfg
        unique = np.unique(self.retrieved[self.retrieved >= 0])
        kv = np.zeros((1, len(cfg.memory_layers), 2, len(cfg.memory_kv_heads), cfg.memory_k, cfg.head_dim),
                      cfg.compute_dtype)  # the last row: an empty slot
        positions = np.full((1, len(cfg.memory_layers), len(cfg.memory_kv_heads), cfg.memory_k), -1, np.int32)
        if unique.size:
            tokens, lengths = self.source.rows(unique)
            if self.mesh is None:
                encoded = _encoder(cfg, None, self.rules)(params, tokens, lengths, self.sink)
            else:
                with jax.set_mesh(self.mesh):
                    encoded = _encoder(cfg, self.mesh, self.rules)(params, tokens, lengths, self.sink)
            kv = np.concatenate([np.asarray(encoded[0])[:, 0], kv])
            positions = np.concatenate([np.asarray(encoded[1])[:, 0], positions])

        def memory_of(ids):
            present = ids >= 0
            row = np.where(present, np.searchsorted(unique, np.maximum(ids, 0)), len(unique))
            return cloze.slot_memory(kv[row][:, None], positions[row][:, None], present, self.sink)

        return memory_of
