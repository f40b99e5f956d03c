"""Default configuration and its validation.

Every stage (warm-up, continued) is an ml_collections ConfigDict built from `base_config()` by a file in
`configs/`. The dict is locked, so an override of a key that does not exist fails (ml_collections answers with a
"did you mean" hint); `validate()` then checks the values against each other once, at start-up, and names the
offending key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from m3jax import paths
from m3jax.parallel import DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES

REMAT_POLICIES = ("none", "full", "dots")
SCHEDULES = ("wsd", "cosine", "constant")
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_name = "run"
    c.seed = 0
    # Path of an Orbax checkpoint (a run's checkpoint directory or one step of it) whose parameters initialise
    # this run. Only parameters are taken: the step, optimiser and data iterator start fresh (stage 2 uses it).
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    m = c.model
    m.vocab_size = 32000  # real vocabulary; -1 = take it from the data's tokenizer
    m.vocab_multiple = 128  # the embedding and LM head are padded to a multiple of this
    m.num_layers = 12
    m.hidden_size = 768
    m.num_heads = 12
    m.num_kv_heads = 4
    m.head_dim = 64
    m.mlp_dim = 2048
    m.rope_base = 10000.0
    m.norm_eps = 1e-5
    m.init_std = 0.02
    m.dtype = "bfloat16"  # compute dtype; parameters are always float32
    m.remat = "none"  # none | full | dots
    m.scan_layers = True
    # The context part of attention (m3jax/model/kernels.py): "xla" (the reference, any backend), "splash"
    # (Pallas splash attention, TPU) or "pallas_gpu" (Pallas flash attention, GPU). Memory stays exact with each.
    m.attention = "auto"  # splash on TPU, xla elsewhere
    m.attention_interpret = False  # run a Pallas kernel in the interpreter (slow; CPU tests)

    # Explicit memory (Memory3, docs/memory.md). Two settings: whether the model *has* memory heads (its geometry:
    # which layers and KV heads read memory, how many tokens a memory keeps, ...; a warm-up model has them too, so
    # its checkpoint can write a bank), and whether this *run reads* memory (the continued stage). A model with
    # heads but no memory input is exactly the plain model.
    c.memory = ml_collections.ConfigDict()
    mem = c.memory
    mem.heads = True  # the model has memory heads (the geometry below); False = a plain Transformer
    mem.read = False  # this run's batches carry memories (requires heads)
    mem.layers = "first_half"  # 'first_half' | 'all' | comma-separated layer indices
    mem.kv_heads = "all"  # 'all' | comma-separated KV-head indices: the memory heads, shared by all memory layers
    mem.ref_len = 128  # tokens of a reference after the sink
    mem.k = 8  # tokens kept per memory per memory KV head
    mem.chunk_size = 64  # tokens per memory group
    mem.per_chunk = 5  # memories (slots) per group
    mem.sink_text = "Reference:"  # the sink is <s> followed by this text, tokenized
    # Where a run that reads memory (memory.read) gets it; retrieval.mode chooses. bank: the memories stored by
    # tools/write_memory.py, written by the checkpoint the run starts from (init_from), decoded on device.
    mem.bank = ""  # the bank's directory (bank mode)
    mem.bank_codec = "bf16"  # the bank's codec (bf16 | int8): the batch's stored arrays; checked against the bank
    mem.bank_other_checkpoint = False  # True: read a bank written by another checkpoint than init_from (its age logged)
    # online: the references' tokens, encoded in every step by the parameters being trained (the paper's way).
    mem.knowledge = ""  # the knowledge base the ids index (online mode), as tools/write_memory.py --knowledge reads
    # online: gradients flow through the encoding too, so that the writer learns what to keep (False: stop_gradient;
    # tests/test_memory_learning.py measures why the default is True)
    mem.encode_grad = True
    # The shuffled-memory control: every retrieved id mapped through a fixed random permutation of the references
    # (same slots and counts, random content). The memory-off control is memory.read=False with the same settings.
    mem.shuffle_references = False

    # Retrieval (see m3jax/retrieval/): the sentence embedder, the ScaNN index over a bank's references, the
    # leakage filter, and which references each 64-token chunk of a training sequence reads.
    c.retrieval = ml_collections.ConfigDict()
    r = c.retrieval
    r.embedder = "all-MiniLM-L6-v2"  # a local Hugging Face directory, or the name of a packaged model
    r.embed_max_len = 256  # embedder tokens per text (longer texts are truncated)
    r.embed_batch_size = 64
    r.index = "auto"  # auto | brute_force | tree_ah
    r.brute_force_max = 100_000  # auto: brute force up to this many references, tree + AH above
    r.num_leaves = 0  # tree_ah: partitions; 0 = about sqrt(references)
    r.leaves_to_search = 0  # tree_ah: partitions searched per query; 0 = a fifth of num_leaves (at least 8)
    r.ah_dims_per_block = 2  # tree_ah: asymmetric-hashing dimensions per 4-bit code
    r.reorder = 100  # tree_ah: candidates rescored exactly
    r.candidates = 20  # neighbours searched per chunk before the leakage filter
    r.min_chunk_tokens = 16  # a shorter chunk (a document's tail) retrieves nothing of its own
    r.train_max_overlap = 0.9  # training drops references with overlap > this with the sequence (eq. 6)
    r.eval_max_overlap = 2 / 3  # evaluation drops references with overlap > this with the question (eq. 6)
    r.refs_per_chunk = 1  # references kept per chunk (the paper's training layout: 1)
    r.layout = "paper"  # paper: a chunk reads its own + the previous per_chunk-1 chunks' references | per_chunk
    r.ids_path = ""  # reference ids per chunk (tools/retrieve.py); "" = DATA/retrieval-SPLIT beside the data
    r.mode = "bank"  # bank: memories gathered from the bank | online: reference tokens, encoded in the step

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = the devices the other axes leave
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # a directory written by tools/prepare_data.py
    c.data.tokenizer = ""  # the SentencePiece model that wrote it (needed by runs that read text: online memory)
    c.data.seq_len = 2048  # must match the data's metadata
    c.data.train_split = "train"
    c.data.eval_split = "heldout"
    c.data.global_batch_size = 32
    c.data.shuffle_seed = 0
    c.data.worker_count = 0  # grain worker processes; 0 = read in the training process
    c.data.prefetch = 2

    c.optimizer = ml_collections.ConfigDict()
    o = c.optimizer
    o.peak_lr = 3e-4
    o.schedule = "wsd"  # wsd | cosine | constant
    o.warmup_steps = 100
    o.decay_fraction = 0.1  # WSD: the last fraction of training decays the LR
    o.min_lr_ratio = 0.1  # final LR = peak_lr * min_lr_ratio
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.decay_norms_and_embeddings = False
    o.clip_norm = 1.0  # global-norm clipping; 0 = off
    o.grad_accum_steps = 1

    c.loss = ml_collections.ConfigDict()
    c.loss.z_loss = 0.0
    # The LM head and loss over this many positions of every row at a time, each chunk's float32 logits recomputed
    # in the backward: [batch, chunk, vocab] at once instead of [batch, seq, vocab]. 0 = the whole sequence.
    c.loss.chunk_size = 512

    c.train = ml_collections.ConfigDict()
    t = c.train
    t.num_steps = 1000  # the length of training (the LR schedule's horizon)
    t.stop_at = 0  # > 0: end this invocation after this step with a checkpoint (a scheduled stop); 0 = num_steps
    t.log_every = 10
    t.eval_every = 100  # 0 = never
    # Held-out loss: the first this many global batches of data.eval_split; 0 = every record of it (the last batch
    # padded with rows of loss weight 0, so the mean is over exactly the split's tokens).
    t.eval_batches = 4
    t.checkpoint_every = 200
    t.keep_checkpoints = 3
    # A resumed run refuses a config whose keys that decide what the state means or which data comes next (the
    # model's architecture and memory geometry, the data and its tokenizer, the batch size, the seeds) differ from
    # its checkpoint's. List here (comma-separated) the keys changed on purpose, e.g. "data.path".
    t.resume_overrides = ""
    t.async_checkpointing = True
    # Profiling: a jax.profiler trace of steps [profile_start, profile_start + profile_steps) into WORKDIR/profile
    # (TensorBoard's profile plugin or Perfetto read it). 0 = off.
    t.profile_start = 0
    t.profile_steps = 5
    t.profile_all_processes = False  # False: process 0 only

    # Loss-spike guard: a non-finite loss, or a loss more than `threshold` running standard deviations (and at
    # least `min_increase` nats) above its running mean, restores the last good checkpoint, skips the batches
    # that led there, multiplies the learning rate by `lr_factor`, and goes on; the run stops with an error
    # after `max_rescues` rescues. The running mean/variance are exponential averages over ~`window` steps and
    # judge spikes only once `min_steps` losses were seen (non-finite losses always count).
    c.spike_guard = ml_collections.ConfigDict()
    g = c.spike_guard
    g.enabled = True
    g.threshold = 6.0
    g.min_increase = 0.5
    g.window = 100
    g.min_steps = 50
    g.max_rescues = 3
    g.lr_factor = 1.0

    # Held-out entities of the knowledge task (tools/make_entities.py), scored at every evaluation of a run that reads
    # memory, in the same line as the held-out loss: exact-match accuracy of their attribute values with the memory
    # the cloze prompt alone retrieves (retrieval.embedder + the references' ScaNN index), with empty memory and with
    # memory off, and the recall@1 of each entity's reference (m3jax/evals/entities.py). Bank mode reads the
    # memories from memory.bank; online mode encodes them with the parameters being trained.
    c.eval = ml_collections.ConfigDict()
    e = c.eval
    e.cloze = ""  # the cloze.jsonl of tools/make_entities.py; "" = no entity evaluation
    e.cloze_items = 0  # held-out items scored (a fixed random sample); 0 = all
    e.cloze_index = ""  # the index of the references (tools/build_index.py); "" = BANK/index (bank mode)
    e.cloze_tokens = 6  # greedy tokens generated after each prompt
    e.cloze_batch = 64  # prompts per generation batch

    c.distributed = ml_collections.ConfigDict()
    d = c.distributed
    # Empty = auto-detect (TPU pod, SLURM) or single process. Set all three for an explicit coordinator.
    d.coordinator_address = ""
    d.num_processes = 0
    d.process_id = -1
    d.cpu_collectives = "gloo"  # for multi-process CPU runs
    return c


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {msg}")


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks values against each other. `num_devices` (the global count) enables the mesh check."""
    # The rooms that own a setting's values say what they are (imported here: loading a config stays light).
    from m3jax.memory.codecs import CODECS
    from m3jax.memory.layout import LAYOUTS
    from m3jax.memory_pipeline import MODES as MEMORY_MODES
    from m3jax.model.config import resolve_memory_kv_heads, resolve_memory_layers
    from m3jax.model.kernels import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
    from m3jax.retrieval.index import INDEX_KINDS

    m = c.model
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "vocab_multiple"):
        _check(int(m[key]) > 0, f"model.{key}", f"must be positive, got {m[key]}")
    _check(m.vocab_size == -1 or m.vocab_size > 0, "model.vocab_size", f"must be positive or -1, got {m.vocab_size}")
    _check(
        m.num_heads % m.num_kv_heads == 0,
        "model.num_heads",
        f"{m.num_heads} heads are not divisible by model.num_kv_heads={m.num_kv_heads}",
    )
    _check(m.head_dim % 2 == 0, "model.head_dim", f"RoPE needs an even head_dim, got {m.head_dim}")
    _check(m.rope_base > 1.0, "model.rope_base", f"must be > 1, got {m.rope_base}")
    _check(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
    _check(m.remat in REMAT_POLICIES, "model.remat", f"must be one of {REMAT_POLICIES}, got {m.remat!r}")
    _check(m.attention in ATTENTION_IMPLEMENTATIONS, "model.attention",
           f"must be one of {ATTENTION_IMPLEMENTATIONS}, got {m.attention!r}")

    mem = c.memory
    for key in ("ref_len", "k", "chunk_size", "per_chunk"):
        _check(int(mem[key]) > 0, f"memory.{key}", f"must be positive, got {mem[key]}")
    _check(mem.k <= mem.ref_len, "memory.k", f"{mem.k} tokens kept of a {mem.ref_len}-token reference")
    _check(mem.heads or not mem.read, "memory.read", "a run that reads memory needs a model with memory heads "
           "(memory.heads=True)")
    _check(mem.bank_codec in CODECS, "memory.bank_codec", f"must be one of {sorted(CODECS)}, got {mem.bank_codec!r}")
    if mem.heads:
        for resolve, spec, count in ((resolve_memory_layers, mem.layers, m.num_layers),
                                     (resolve_memory_kv_heads, mem.kv_heads, m.num_kv_heads)):
            try:
                resolve(spec, count)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    r = c.retrieval
    _check(r.index in INDEX_KINDS, "retrieval.index", f"must be one of {INDEX_KINDS}, got {r.index!r}")
    _check(r.layout in LAYOUTS, "retrieval.layout", f"must be one of {LAYOUTS}, got {r.layout!r}")
    _check(r.mode in MEMORY_MODES, "retrieval.mode", f"must be one of {MEMORY_MODES}, got {r.mode!r}")
    for key in ("embed_max_len", "embed_batch_size", "candidates", "refs_per_chunk", "ah_dims_per_block",
                "min_chunk_tokens"):
        _check(int(r[key]) > 0, f"retrieval.{key}", f"must be positive, got {r[key]}")
    _check(0.0 < r.train_max_overlap <= 1.0, "retrieval.train_max_overlap",
           f"must be in (0, 1], got {r.train_max_overlap}")
    _check(0.0 < r.eval_max_overlap <= 1.0, "retrieval.eval_max_overlap",
           f"must be in (0, 1], got {r.eval_max_overlap}")
    _check(r.refs_per_chunk <= r.candidates, "retrieval.refs_per_chunk",
           f"{r.refs_per_chunk} kept of retrieval.candidates={r.candidates} searched")
    if r.layout == "paper":
        _check(r.refs_per_chunk == 1, "retrieval.refs_per_chunk",
               f"the paper layout retrieves 1 reference per chunk, got {r.refs_per_chunk}")
    else:
        _check(r.refs_per_chunk <= mem.per_chunk, "retrieval.refs_per_chunk",
               f"{r.refs_per_chunk} references per chunk do not fit memory.per_chunk={mem.per_chunk} slots")

    t = c.train
    _check(c.loss.chunk_size >= 0, "loss.chunk_size", f"must be >= 0 (0 = unchunked), got {c.loss.chunk_size}")
    _check(t.num_steps > 0, "train.num_steps", f"must be positive, got {t.num_steps}")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _check(t[key] > 0, f"train.{key}", f"must be positive, got {t[key]}")
    _check(t.stop_at >= 0, "train.stop_at", f"must be >= 0, got {t.stop_at}")
    _check(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _check(t.eval_batches >= 0, "train.eval_batches",
           f"must be >= 0 (0 = every record of data.eval_split), got {t.eval_batches}")
    e = c.eval
    _check(e.cloze_items >= 0, "eval.cloze_items", f"must be >= 0 (0 = all), got {e.cloze_items}")
    for key in ("cloze_tokens", "cloze_batch"):
        _check(e[key] > 0, f"eval.{key}", f"must be positive, got {e[key]}")
    if e.cloze:
        _check(mem.read, "eval.cloze", "held-out entities are scored by what they read from memory: a run that "
               "reads memory (memory.read=True)")
        _check(t.eval_every > 0, "eval.cloze", "entities are scored at each evaluation, but train.eval_every=0")
        _check(e.cloze_index or r.mode == "bank", "eval.cloze_index",
               "online mode has no bank beside which to find the references' index: give its directory")

    _check(t.profile_start >= 0, "train.profile_start", f"must be >= 0 (0 = off), got {t.profile_start}")
    _check(t.profile_steps > 0, "train.profile_steps", f"must be positive, got {t.profile_steps}")
    g = c.spike_guard
    _check(g.threshold > 0, "spike_guard.threshold", f"must be positive, got {g.threshold}")
    _check(g.min_increase >= 0, "spike_guard.min_increase", f"must be >= 0, got {g.min_increase}")
    _check(g.window >= 2, "spike_guard.window", f"must be >= 2, got {g.window}")
    _check(g.min_steps >= 1, "spike_guard.min_steps", f"must be >= 1, got {g.min_steps}")
    _check(g.max_rescues >= 0, "spike_guard.max_rescues", f"must be >= 0, got {g.max_rescues}")
    _check(0 < g.lr_factor <= 1, "spike_guard.lr_factor", f"must be in (0, 1], got {g.lr_factor}")

    o = c.optimizer
    _check(o.schedule in SCHEDULES, "optimizer.schedule", f"must be one of {SCHEDULES}, got {o.schedule!r}")
    _check(o.peak_lr > 0, "optimizer.peak_lr", f"must be positive, got {o.peak_lr}")
    _check(0 <= o.warmup_steps <= c.train.num_steps, "optimizer.warmup_steps",
           f"must be in [0, train.num_steps={c.train.num_steps}], got {o.warmup_steps}")
    _check(0.0 <= o.decay_fraction <= 1.0, "optimizer.decay_fraction", f"must be in [0, 1], got {o.decay_fraction}")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.grad_accum_steps >= 1, "optimizer.grad_accum_steps", f"must be >= 1, got {o.grad_accum_steps}")
    _check(o.clip_norm >= 0, "optimizer.clip_norm", f"must be >= 0, got {o.clip_norm}")

    sizes = {ax: int(c.mesh[ax]) for ax in MESH_AXES}
    for ax, n in sizes.items():
        _check(n == -1 or n >= 1, f"mesh.{ax}", f"must be -1 or >= 1, got {n}")
    _check(sum(n == -1 for n in sizes.values()) <= 1, "mesh", f"at most one axis may be -1, got {sizes}")
    mesh_names = set(MESH_AXES)
    for rule in c.logical_axis_rules:
        _check(len(rule) == 2, "logical_axis_rules", f"each rule is (logical_name, mesh_axes), got {rule!r}")
        targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        for t_ax in targets:
            _check(t_ax is None or t_ax in mesh_names, "logical_axis_rules",
                   f"rule {rule!r} names mesh axis {t_ax!r}; the mesh axes are {MESH_AXES}")

    batch = c.data.global_batch_size
    _check(batch > 0, "data.global_batch_size", f"must be positive, got {batch}")
    _check(batch % o.grad_accum_steps == 0, "data.global_batch_size",
           f"{batch} is not divisible by optimizer.grad_accum_steps={o.grad_accum_steps}")
    if num_devices is not None:
        fixed = 1
        for n in sizes.values():
            fixed *= n if n != -1 else 1
        if -1 in sizes.values():
            _check(num_devices % fixed == 0, "mesh",
                   f"the fixed axes {sizes} (product {fixed}) do not divide the {num_devices} devices")
        else:
            _check(fixed == num_devices, "mesh",
                   f"the product of the mesh axes {sizes} is {fixed}, but there are {num_devices} devices")
        data_par = sizes["data"] if sizes["data"] != -1 else num_devices // fixed
        data_par *= sizes["fsdp"] if sizes["fsdp"] != -1 else num_devices // fixed
        micro = batch // o.grad_accum_steps
        _check(micro % data_par == 0, "data.global_batch_size",
               f"the micro-batch {micro} (global_batch_size / grad_accum_steps) is not divisible by the "
               f"data-parallel degree data*fsdp={data_par}")


def resolve(c: ml_collections.ConfigDict, *, saved: dict | None = None, log=None) -> dict | None:
    """Settles, in place and once, the values a config leaves to what it runs on; returns the data's metadata.

    - `model.vocab_size = -1`: from `saved` (the config saved with a checkpoint the job loads) when given, else
      from the data's tokenizer (`data.path`).
    - Local paths of the data, its tokenizer, the memory bank and the retrieved ids become absolute.
    - With `data.path`: the data must hold `data.seq_len`-token records and a vocabulary the model covers, and
      its training split at least one global batch (an error naming the key otherwise). The held-out split's
      size settles the held-out loss: `train.eval_batches` is cut to the global batches it holds, and a run
      whose held-out split is missing, or smaller than one global batch when not every record is scored
      (`train.eval_batches=0`), evaluates nothing; `log` (default absl's warning) says so.
    - `eval.cloze` must name an existing file.
    """
    from absl import logging

    from m3jax.data.records import read_metadata

    log = log or logging.warning
    if saved is not None and c.model.vocab_size == -1:
        with c.unlocked():
            c.model.vocab_size = int(saved["model"]["vocab_size"])
    if not c.data.path:
        return None
    with c.unlocked():  # local paths: the same files whatever the working directory (a resume compares them)
        for section, key in (("data", "path"), ("data", "tokenizer"), ("memory", "bank"), ("retrieval", "ids_path"),
                             ("eval", "cloze"), ("eval", "cloze_index")):
            if c[section][key] and not paths.is_url(c[section][key]):
                c[section][key] = os.path.abspath(c[section][key])
    if c.eval.cloze and not paths.absolute(c.eval.cloze).is_file():  # a local file or a gs:// object
        raise ConfigError(f"config.eval.cloze: no file {c.eval.cloze} (the cloze.jsonl of tools/make_entities.py)")
    meta = read_metadata(c.data.path)
    with c.unlocked():
        if c.model.vocab_size == -1:
            c.model.vocab_size = int(meta["vocab_size"])
    where = f"the data {c.data.path}"
    _check(int(meta["seq_len"]) == c.data.seq_len, "data.seq_len",
           f"{c.data.seq_len}, but {where} holds sequences of {meta['seq_len']}: set --config.data.seq_len="
           f"{meta['seq_len']}")
    _check(c.model.vocab_size >= meta["vocab_size"], "model.vocab_size",
           f"{c.model.vocab_size} is smaller than the vocabulary ({meta['vocab_size']}) of the tokenizer that wrote "
           f"{where}: use -1 to take it from the data")
    splits, batch = meta["splits"], int(c.data.global_batch_size)
    if c.data.train_split not in splits:
        raise ConfigError(f"config.data.train_split: {c.data.train_split!r} is not a split of {where} "
                          f"(splits: {sorted(splits)})")
    train_records = int(splits[c.data.train_split]["num_records"])
    _check(train_records >= batch, "data.global_batch_size",
           f"{batch}, but split {c.data.train_split!r} of {where} holds {train_records} records: lower it")
    if c.train.eval_every:
        held = int(splits.get(c.data.eval_split, {}).get("num_records", 0))
        available = held // batch
        if held == 0 or (available == 0 and c.train.eval_batches):
            log(f"config.train.eval_every: held-out split {c.data.eval_split!r} of {where} holds {held} records, "
                f"less than one global batch of {batch}: no held-out loss in this run"
                + (" (train.eval_batches=0 would score every record)" if held else ""))
            with c.unlocked():
                c.train.eval_every = 0
        elif available < c.train.eval_batches:
            log(f"config.train.eval_batches: held-out split {c.data.eval_split!r} of {where} holds {available} "
                f"global batches of {batch}; evaluating on {available}, not {c.train.eval_batches}")
            with c.unlocked():
                c.train.eval_batches = available
    return meta


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config (ConfigDict or its JSON dict) as {"section.key": value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(a: Mapping[str, Any], b: Mapping[str, Any], keys=None) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) for each flattened key (of `keys`, default all) on which two configs differ."""
    fa, fb = flatten(a), flatten(b)
    keys = sorted(set(fa) | set(fb)) if keys is None else keys
    return [(k, fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)]
