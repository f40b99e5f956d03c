"""The continued stage (m3jax/train/tasks.py MemoryTask): memories from a bank or encoded in the step, a warm-up
checkpoint continued with memory, exact resume, and the refusal of a bank another checkpoint wrote."""

import copy
import json
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, assert_invocations, run_tool
from test_launch import cpu_env
from test_memory import random_params

from m3jax import checkpoint as ckpt_lib
from m3jax.config import ConfigError
from m3jax.memory import bank as bank_lib
from m3jax.memory import writer
from m3jax.memory.bank import BankMismatchError
from m3jax.model import ModelConfig
from m3jax.model import params as params_lib
from m3jax.parallel import make_mesh
from m3jax.train import loop
from m3jax.train.step import Trainer
from m3jax.train.tasks import MemoryTask, loss_sums

BATCH = 8


def continued_config(memory_kb, kb_retrieval, mode, bank=None):
    """memory_kb's data, knowledge base and retrieved ids, read in `mode` (bank: `bank`, default memory_kb's)."""
    c = copy.deepcopy(memory_kb["config"])
    c.run_name = "continued"
    c.data.path = memory_kb["data"]
    c.data.tokenizer = memory_kb["tokenizer"]
    c.data.global_batch_size = BATCH
    c.memory.update(read=True, bank=str(bank or memory_kb["bank"]), knowledge=memory_kb["knowledge"])
    c.retrieval.update(mode=mode, ids_path=kb_retrieval["ids"])
    c.train.update(eval_every=0, log_every=1)
    return c


def write_bank(memory_kb, path, params, checkpoint):
    """A bank of memory_kb's references written by `params` (float32 encoding, bf16 codec)."""
    config = memory_kb["config"]
    cfg = ModelConfig.from_config(config.model, config.memory)
    tokenizer_sha = bank_lib.tokenizer_hash(memory_kb["tokenizer"])
    refs = memory_kb["refs"]
    bank, _ = writer.open_for_writing(
        str(path), refs, architecture=bank_lib.architecture(cfg), tokenizer_sha256=tokenizer_sha,
        checkpoint=checkpoint, sink=memory_kb["sink"], codec="bf16", refs_per_shard=64,
        record=writer.writer_record(refs, 1, cfg.dtype))
    writer.write_references(bank, params, cfg, refs, memory_kb["sink"], batch_size=64)
    return str(path)


def first_batch(config, params):
    trainer = Trainer(config, make_mesh(config.mesh))
    assert isinstance(trainer.task, MemoryTask)
    batch = trainer.global_batch(next(trainer.task.train_iterator(0, 1)))
    return trainer, jax.device_put(params, trainer.param_shardings), batch


def mean_loss(trainer, params, batch) -> float:
    _, (nll, weight) = jax.jit(trainer.loss)(params, batch)
    return float(nll / weight)


def logits(trainer, params, batch) -> np.ndarray:
    """The model's logits on `batch` reading the task's memories (float32)."""
    def forward(params, batch):
        model = params_lib.model_from(trainer.task.model_cfg, params)
        return model(batch["inputs"], batch["positions"], batch["segment_ids"], batch["memory_group"],
                     trainer.task.memory(model, batch))
    return np.asarray(jax.jit(forward)(params, batch), np.float32)


def test_bank_and_online_modes_read_the_same_memories(memory_kb, kb_retrieval, tmp_path):
    """A bank written by parameters P, read in bank mode, and the same references encoded by P in the step (online
    mode): the same memories up to the bf16 codec, the same first-batch loss up to it, and a loss that memory moves
    (every slot emptied changes it by far more than the codec's error). Parameters at std 0.15, not the small
    initialisation, so that reading memory changes the loss measurably."""
    cfg = ModelConfig.from_config(memory_kb["config"].model, memory_kb["config"].memory)
    params = random_params(cfg, 7, std=0.15)
    bank = write_bank(memory_kb, tmp_path / "bank", params, {"run_id": "p", "step": 0})
    config = continued_config(memory_kb, kb_retrieval, "bank", bank)
    config.memory.bank_other_checkpoint = True  # P is no checkpoint's: nothing to tie the bank to
    bank_trainer, p, bank_batch = first_batch(config, params)
    online_trainer, _, online_batch = first_batch(continued_config(memory_kb, kb_retrieval, "online"), params)
    for name in ("inputs", "memory_index", "memory_ids"):  # the same rows, reading the same references
        np.testing.assert_array_equal(bank_batch[name], online_batch[name], err_msg=name)

    model = params_lib.model_from(cfg, p)
    stored = bank_trainer.task.memory(model, bank_batch)
    encoded = jax.jit(online_trainer.task.memory)(model, online_batch)
    np.testing.assert_array_equal(stored.valid, encoded.valid)
    for name in ("keys", "values"):  # bf16 storage: 8 mantissa bits
        a, b = np.asarray(getattr(stored, name)), np.asarray(getattr(encoded, name))
        np.testing.assert_allclose(a, b, rtol=2**-8, atol=1e-6, err_msg=name)
        assert np.abs(b).max() > 0.1, name  # real memories, not zeros

    bank_loss, online_loss = mean_loss(bank_trainer, p, bank_batch), mean_loss(online_trainer, p, online_batch)
    empty = {**bank_batch, "memory_index": jax.numpy.full_like(bank_batch["memory_index"], -1)}
    no_memory_loss = mean_loss(bank_trainer, p, empty)
    assert abs(bank_loss - online_loss) < 1e-3 * bank_loss, (bank_loss, online_loss)
    assert no_memory_loss != bank_loss
    # Memory moves the logits far more than the codec does (per position, so that no average cancels the two).
    with_bank, with_online = logits(bank_trainer, p, bank_batch), logits(online_trainer, p, online_batch)
    without = logits(bank_trainer, p, empty)
    codec, memory = np.abs(with_bank - with_online).mean(), np.abs(with_bank - without).mean()
    assert memory > 20 * max(codec, 1e-6), (codec, memory)


@pytest.fixture(scope="module")
def warm_start(memory_kb, kb_retrieval, tmp_path_factory):
    """A 4-step warm-up run on memory_kb's data (LM task, checkpoint 4) and the bank its checkpoint wrote."""
    root = tmp_path_factory.mktemp("continued")
    config = continued_config(memory_kb, kb_retrieval, "bank")
    config.memory.read = False
    config.run_name = "warmup"
    config.train.update(num_steps=4, checkpoint_every=4)
    loop.train(config, str(root / "warmup"))
    step_dir = ckpt_lib.resolve_step_dir(root / "warmup")
    loaded = ckpt_lib.load_model(step_dir)
    bank = write_bank(memory_kb, root / "bank", loaded.params, loaded.identity)
    return {"root": root, "checkpoint": str(step_dir), "bank": bank}


def continued_run_config(memory_kb, kb_retrieval, warm_start, **train):
    """Bank mode from the warm-up checkpoint that wrote the bank, 6 steps, evaluated at 0 and 6 on one batch of
    the train split (the only split with retrieved ids here)."""
    c = continued_config(memory_kb, kb_retrieval, "bank", warm_start["bank"])
    c.init_from = warm_start["checkpoint"]
    c.data.eval_split = "train"
    c.train.update(num_steps=6, checkpoint_every=3, eval_every=6, eval_batches=1, **train)
    return c


@pytest.fixture(scope="module")
def straight(memory_kb, kb_retrieval, warm_start, tmp_path_factory):
    """The uninterrupted 6-step continued run (in-process, 8 devices): its workdir and summary."""
    workdir = tmp_path_factory.mktemp("straight")
    summary = loop.train(continued_run_config(memory_kb, kb_retrieval, warm_start), str(workdir))
    assert summary["resumed_from"] is None and sorted(summary["losses"]) == list(range(1, 7))
    assert all(np.isfinite(list(summary["losses"].values())))
    return {"workdir": workdir, **summary}


@pytest.mark.slow
def test_continued_run_from_the_warmup_checkpoint_resumes_exactly(memory_kb, kb_retrieval, warm_start, straight,
                                                                   tmp_path):
    """Bank mode from the warm-up checkpoint that wrote the bank: 6 steps straight, and 3 + 3 with a resume in
    between (parameters from the run's checkpoint, the loader's state with them): the same losses, bit for bit."""

    split = tmp_path / "split"
    loop.train(continued_run_config(memory_kb, kb_retrieval, warm_start, stop_at=3), str(split))
    resumed = loop.train(continued_run_config(memory_kb, kb_retrieval, warm_start), str(split))
    assert resumed["resumed_from"] == 3
    assert_invocations(split, [(0, False, 3), (3, True, 6)], straight["losses"])

    # It started from the warm-up parameters: its first loss is the warm-up model's on that batch with memory,
    # far below an untrained model's ln(vocab).
    assert straight["losses"][1] < np.log(memory_kb["config"].model.vocab_size) - 0.5, straight["losses"]

    # Held-out metrics side by side at steps 0 and 6: with memory, every slot empty, memory off. At step 0 (the
    # warm-up parameters) memory off is the plain language model on the same rows at their own positions.
    evals = [r for r in map(json.loads, (straight["workdir"] / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6]
    assert all(set(r) >= {"loss", "loss_empty_memory", "loss_memory_off"} for r in evals), evals
    config = continued_run_config(memory_kb, kb_retrieval, warm_start)
    task = MemoryTask(config)
    batch = task.eval_batches(0, 1)[0]
    cfg = task.model_cfg
    params = ckpt_lib.load_model(warm_start["checkpoint"]).params
    start = cfg.context_start(len(task.sink_tokens()))
    logits = params_lib.model_from(cfg, params)(batch["inputs"], batch["positions"] - start, batch["segment_ids"])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[..., : cfg.vocab_size], -1)
    nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    plain = float(np.sum(nll * batch["loss_weights"]) / np.sum(batch["loss_weights"]))
    assert evals[0]["loss_memory_off"] == pytest.approx(plain, rel=1e-4)
    assert evals[0]["loss_memory_off"] != evals[0]["loss_empty_memory"]  # the sink and the shifted positions


@pytest.mark.slow
def test_two_processes_through_the_local_launcher_equal_one(memory_kb, kb_retrieval, warm_start, straight,
                                                            tmp_path):
    """launch/local.sh with 2 processes (4 CPU devices each) runs the same continued stage from the command line:
    each process gathers its own rows' memories from the bank; every step's loss equals the 1-process run's up to
    cross-process float rounding."""
    workdir = tmp_path / "run"
    flags = [f"--workdir={workdir}", "--verbosity=0", "--config.run_name=continued", "--config.data.seq_len=256",
             f"--config.data.global_batch_size={BATCH}", f"--config.data.path={memory_kb['data']}",
             "--config.data.eval_split=train", "--config.memory.read=True",
             f"--config.memory.bank={warm_start['bank']}", f"--config.retrieval.ids_path={kb_retrieval['ids']}",
             f"--config.init_from={warm_start['checkpoint']}",
             "--config.train.num_steps=6", "--config.train.checkpoint_every=3", "--config.train.eval_every=6",
             "--config.train.eval_batches=1", "--config.train.log_every=1"]
    r = subprocess.run([shutil.which("bash"), "launch/local.sh", "tests/lm_test_config.py", *flags], cwd=REPO,
                       env=cpu_env(4, NUM_PROCESSES="2"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:] + (workdir / "logs" / "process_1.log").read_text()[-3000:]
    assert_invocations(workdir, [(0, False, 6)], straight["losses"], rtol=1e-5)


def test_a_control_never_resumes_as_the_run_it_controls(memory_kb, kb_retrieval, warm_start, straight, tmp_path):
    """The straight run's checkpoint, resumed as the shuffled-memory control or as the memory-off control, or in
    the other memory mode: each stops before training, naming the key with both values."""
    shutil.copytree(straight["workdir"] / "checkpoints", tmp_path / "checkpoints")
    for key, value, named in (("memory.shuffle_references", True, "checkpoint False, now True"),
                              ("memory.read", False, "checkpoint True, now False"),
                              ("retrieval.mode", "online", "checkpoint 'bank', now 'online'")):
        config = continued_run_config(memory_kb, kb_retrieval, warm_start)
        section, name = key.split(".")
        config[section][name] = value
        with pytest.raises(ConfigError, match=re.escape(f"{key}: {named}")):
            loop.train(config, str(tmp_path))


def test_a_bank_of_another_checkpoint_is_refused_unless_allowed(memory_kb, kb_retrieval, warm_start, tmp_path):
    """memory_kb's bank was written by fresh parameters, not by the warm-up checkpoint the run starts from: the run
    stops naming the bank and both checkpoints; memory.bank_other_checkpoint=True reads it."""
    config = continued_run_config(memory_kb, kb_retrieval, warm_start)
    config.memory.bank = memory_kb["bank"]
    named = r"memory bank \S+: checkpoint: bank \{'run_id': 'fresh'.*expected \{'run_id': 'warmup-"
    with pytest.raises(BankMismatchError, match=named):
        MemoryTask(config).source()
    config.memory.bank_other_checkpoint = True
    assert MemoryTask(config).source().num_refs == len(memory_kb["refs"])

    config.memory.bank, config.memory.bank_other_checkpoint = "", False
    with pytest.raises(ConfigError, match="config.memory.bank"):
        MemoryTask(config).source()


def mean_objective(trainer, batch):
    """params -> the task's mean objective on `batch` (what the train step differentiates)."""
    def objective(params):
        total, (_, weight) = trainer.loss(params, batch)
        return total / weight
    return objective


@pytest.mark.slow
def test_online_encoding_is_a_constant_of_the_step_unless_encode_grad(memory_kb, kb_retrieval):
    """Online mode's gradient with memory.encode_grad=False is the gradient of the loss with the memories as
    constants (encoded outside the differentiated function); encode_grad=True adds the encoder's path, which
    changes the gradient of the memory layers' parameters."""
    cfg = ModelConfig.from_config(memory_kb["config"].model, memory_kb["config"].memory)
    params = random_params(cfg, 3, std=0.15)
    config = continued_config(memory_kb, kb_retrieval, "online")
    config.memory.encode_grad = False
    trainer, p, batch = first_batch(config, params)
    task = trainer.task
    constant = task.memory(params_lib.model_from(cfg, p), batch)

    def loss_with(memory):
        def loss(q):
            logits = params_lib.model_from(cfg, q)(batch["inputs"], batch["positions"], batch["segment_ids"],
                                                   batch["memory_group"], memory)
            total, _, weight = loss_sums(logits, batch["targets"], batch["loss_weights"].astype(jnp.float32), 0.0)
            return total / weight
        return loss

    want = jax.jit(jax.grad(loss_with(constant)))(p)
    got = jax.jit(jax.grad(mean_objective(trainer, batch)))(p)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))

    config = continued_config(memory_kb, kb_retrieval, "online")
    config.memory.encode_grad = True
    through = Trainer(config, make_mesh(config.mesh))
    full = jax.jit(jax.grad(mean_objective(through, batch)))(p)
    differ = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), full, got)
    assert differ["layers"]["wk"] > 1e-6, differ  # the encoder's keys come from the memory layers' projections


def test_generate_tool_prints_what_the_library_generates(memory_kb, kb_retrieval, warm_start, straight):
    """tools/generate.py on the warm-up checkpoint and the bank it wrote: the printed continuation is the library's
    `generate` on the same checkpoint, bank and index, and --show_references lists what the chunks read. The
    continued run's checkpoint with that bank is refused, the error naming the way out."""
    from m3jax.data.tokenizer import Tokenizer
    from m3jax.infer.generate import BankMemories, generate
    from m3jax.retrieval.embedder import Embedder
    from m3jax.retrieval.index import Index
    from m3jax.retrieval.query import QueryRetriever

    prompt = "The history of the city"
    args = [f"--bank={warm_start['bank']}", f"--index={kb_retrieval['index']}", f"--prompt={prompt}",
            "--max_new_tokens=70", "--show_references"]
    ran = run_tool(memory_kb["root"], "generate", f"--checkpoint={warm_start['checkpoint']}", *args)
    assert ran.returncode == 0, ran.stderr[-3000:]

    loaded = ckpt_lib.load_model(warm_start["checkpoint"])
    tok = Tokenizer(memory_kb["tokenizer"])
    bank = bank_lib.MemoryBank.open(warm_start["bank"], expect_architecture=bank_lib.architecture(loaded.model_config),
                                    expect_tokenizer=tok.sha256, expect_checkpoint=loaded.identity)
    embedder = Embedder.from_config(memory_kb["config"].retrieval)
    index = Index.load(kb_retrieval["index"], expect_embedder=embedder.identity)
    retriever = QueryRetriever.from_config(memory_kb["config"].retrieval, embedder, index, bank.read_tokens, tok,
                                           refs=5)
    out = generate(loaded.params, loaded.model_config, [[tok.bos_id, *tok.encode(prompt)]], 70,
                   source=BankMemories(bank, retriever, tok))
    assert ran.stdout.startswith(f"=== prompt 0 (memory3): {prompt}\n{tok.decode(out.tokens[0].tolist())}\n")
    listed = [int(m.group(1)) for m in re.finditer(r"chunk \d+: reference (\d+):", ran.stdout)]
    assert listed == [int(i) for i in out.references[0].reshape(-1) if i >= 0] and listed

    refused = run_tool(memory_kb["root"], "generate", f"--checkpoint={straight['workdir']}", *args)
    assert refused.returncode != 0 and "checkpoint" in refused.stderr, refused.stderr[-2000:]
    assert "allow_other_checkpoint" in refused.stderr  # the way out is named


# What the fixture run must show on its 40 held-out entities (80 cloze items), one seed: at least this much exact-match
# accuracy reading the memories its own final weights wrote, above the best control (the same weights with another
# entity's memory, an empty slot, memory off). Measured at conftest.ENTITY_RUN with tools/bench/stage2_entities.py:
# seed 0 0.550 against <= 0.000 for every control, seed 1 0.338 against <= 0.013; at 300 or 400 steps instead of 600
# nothing was read yet (0.000 and 0.075).
ENTITY_MARGIN = 0.2


@pytest.mark.slow
def test_a_continued_model_answers_from_memory_what_it_never_trained_on(entity_run):
    """The continued stage of the fixture entity run: held-out entities' attributes exist only in the knowledge base,
    so they are answered right only by reading memory; the model does, and shuffled, empty or no memory does not."""
    rows = entity_run["results"]["rows"]
    held = rows["stage2_memory / rewritten bank"]["summary"]["heldout"]
    acc, print_table = held["accuracy"], entity_run["stdout"]
    assert held["recall_at_1"] >= 0.9, print_table
    controls = max(acc["shuffled"], acc["empty"], acc["off"])
    assert acc["retrieved"] >= controls + ENTITY_MARGIN, print_table
    assert acc["off"] <= 0.05, print_table  # the facts are not in the weights
    # the warm-up never read memory: nothing to gain from it
    warm = rows["warmup / warmup bank"]["summary"]["heldout"]["accuracy"]
    assert warm["retrieved"] <= 0.05, print_table
