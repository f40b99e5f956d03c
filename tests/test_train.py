"""End-to-end training on the embedded corpus: learning, exact resume, resharding, checkpoint failures."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REFERENCE_FLAGS, REPO, assert_invocations, guard_state, lm_config, reference_config, train_cli

from m3jax.checkpoint import CheckpointError, load_params
from m3jax.parallel import make_mesh
from m3jax.train import loop
from m3jax.train.step import Trainer


def test_held_out_loss_falls(lm_data, tmp_path, monkeypatch):
    config = lm_config(lm_data, num_steps=60, eval_every=30)
    monkeypatch.chdir(tmp_path.parent)
    summary = loop.train(config, tmp_path.name)  # a relative workdir, as users type it
    initial, final = summary["eval"][0], summary["eval"][60]
    assert initial > 6.0  # ~ln(1000) for an untrained model
    assert final < initial - 1.0, summary["eval"]  # e.g. 6.9 -> 5.7 nats
    assert (tmp_path / "tensorboard").is_dir() and list((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "checkpoints" / "60" / "state").is_dir()


@pytest.mark.slow
def test_killed_run_resumes_bitwise(lm_data, reference_run, tmp_path):
    """A trainer SIGKILLed while the checkpoint of step 6 is being written (fault point) leaves step 3 the last
    committed checkpoint; rerun, it resumes from step 3 and trains steps 4-9. Each invocation's losses, and the spike
    guard's statistics at the end, equal the uninterrupted run's bit for bit (same 8-device program)."""
    workdir = tmp_path / "run"
    killed = train_cli(workdir, lm_data, *REFERENCE_FLAGS, fault="kill_after_save_begins:6")
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    # On disk at the kill: checkpoint 3 committed, step 6 only Orbax's uncommitted temporary directory.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6.orbax-checkpoint-tmp"]
    assert_invocations(workdir, [(0, False, 6)], reference_run["losses"])

    resumed = train_cli(workdir, lm_data, *REFERENCE_FLAGS)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert_invocations(workdir, [(0, False, 6), (3, True, 9)], reference_run["losses"])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6", "9"]  # the temporary one is gone
    assert guard_state(workdir, 9) == guard_state(reference_run["workdir"], 9)

    # tools/summarize_run.py reads the resumed run: both invocations, and the losses of the steps that won.
    out = subprocess.run([sys.executable, "tools/summarize_run.py", f"--workdir={workdir}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = reference_run["losses"]
    lines = out.stdout.splitlines()
    assert lines[:2] == ["invocation started at step 0 (fresh)",
                         "invocation started at step 3 (resumed from its checkpoint)"], out.stdout
    assert lines[2].startswith(f"train loss: step 1: {losses[1]:.3f} -> step 9: {losses[9]:.3f}  ("), out.stdout


def test_checkpoint_retention_keeps_the_last_n(reference_run):
    """train.keep_checkpoints=2 with saves at steps 3, 6 and 9: exactly the last two are on disk, nothing else."""
    assert sorted(p.name for p in (reference_run["workdir"] / "checkpoints").iterdir()) == ["6", "9"]


def test_restore_onto_a_different_mesh(lm_data, reference_run, tmp_path):
    """The reference run's checkpoint 6 (mesh data 4 x fsdp 2) resumed on data 2 x fsdp 2 x tensor 2: steps 7-9
    equal the uninterrupted run's up to float rounding."""
    shutil.copytree(reference_run["workdir"] / "checkpoints" / "6", tmp_path / "checkpoints" / "6")
    config = reference_config(lm_data)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    loop.train(config, str(tmp_path))
    assert_invocations(tmp_path, [(6, True, 9)], reference_run["losses"], rtol=1e-5)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_corrupt_checkpoint_stops_the_run_and_is_kept(lm_data, tmp_path):
    loop.train(lm_config(lm_data, num_steps=6, stop_at=2), str(tmp_path))
    ckpt_dir = tmp_path / "checkpoints"
    for f in (ckpt_dir / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0garbage" * 8)
    before = tree_digest(ckpt_dir)
    with pytest.raises(CheckpointError, match=str(ckpt_dir / "2")):
        loop.train(lm_config(lm_data, num_steps=6), str(tmp_path))
    assert tree_digest(ckpt_dir) == before  # nothing overwritten, no new step written


def test_init_from_loads_parameters_only(lm_data, tmp_path):
    source = lm_config(lm_data, num_steps=4)
    loop.train(source, str(tmp_path / "src"))
    trainer = Trainer(source, make_mesh(source.mesh))
    params = load_params(tmp_path / "src" / "checkpoints", trainer.abstract_state().params)
    restored_state, *_ = loop.ckpt_lib.Checkpointer(
        tmp_path / "src" / "checkpoints", max_to_keep=1).restore(4, trainer.abstract_state())
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored_state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    stage2 = lm_config(lm_data, num_steps=2, init_from=str(tmp_path / "src" / "checkpoints"))
    fresh = loop.train(lm_config(lm_data, num_steps=2), str(tmp_path / "fresh"))
    warm = loop.train(stage2, str(tmp_path / "stage2"))
    assert warm["start_step"] == 0
    assert warm["eval"][0] < fresh["eval"][0] - 0.5  # it starts from the trained parameters


def run_cli(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "m3jax.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_bad_config_key_and_values_are_named():
    out = run_cli("--config=configs/demo.py", "--config.model.num_layer=3", "--dry_run")
    assert out.returncode != 0 and "num_layer" in out.stderr
    out = run_cli("--config=configs/demo.py", "--config.model.num_heads=6", "--config.model.num_kv_heads=4",
                  "--dry_run")
    assert out.returncode != 0 and "config.model.num_heads" in out.stderr


def test_memory3_2b_dry_run_reports_size():
    out = run_cli("--config=configs/memory3_2b.py", "--dry_run")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert 2.40e9 < report["params_non_embedding"] < 2.45e9  # the paper's 2.4B
    assert report["params_total"] == report["params_non_embedding"] + 2 * 60416 * 3200
    assert report["train_flops_per_token"] == pytest.approx(
        6 * (report["params_non_embedding"] + 60416 * 3200) + 6 * 44 * 2048 * 40 * 80)


def test_load_model_for_a_job(tmp_path):
    """load_model: a checkpoint's parameters onto the job's mesh, its config and identity; a job config that
    describes another model is refused by key."""
    import json

    from conftest import tiny_config

    from m3jax.checkpoint import Checkpointer, load_model
    from m3jax.model import ModelConfig
    from m3jax.model.params import init_params

    saved = tiny_config()
    saved.run_name = "warm"
    params = init_params(ModelConfig.from_config(saved.model, saved.memory), 7)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", max_to_keep=1, async_save=False)
    ckpt.save(5, {"params": params}, {}, json.loads(saved.to_json_best_effort()), {"run_id": "warm-0a1b"})
    ckpt.wait()
    ckpt.close()

    job = tiny_config(vocab_size=-1)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    loaded = load_model(tmp_path / "run", job, mesh=mesh)
    assert job.model.vocab_size == 300 and loaded.identity == {"run_id": "warm-0a1b", "step": 5}
    assert loaded.model_config == ModelConfig.from_config(saved.model, saved.memory)
    wq = loaded.params["layers"]["wq"].sharding  # [layers, embed, heads, head_dim]
    assert wq.mesh == mesh and wq.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    alone = load_model(tmp_path / "run" / "checkpoints" / "5")  # the checkpoint's own config, first device
    assert alone.model_config == loaded.model_config and alone.saved_config["run_name"] == "warm"

    other = tiny_config(num_layers=3)
    with pytest.raises(CheckpointError, match=r"config.model.num_layers=3 but the checkpoint .*/5 was trained with 2"):
        load_model(tmp_path / "run", other)


def test_runs_have_their_own_ids_and_a_bank_cannot_mix_two(lm_data, tmp_path):
    """Two runs of the same name reach the same step: their checkpoints' identities differ (a resume keeps its
    run's), so a bank half-written with one cannot be finished with the other."""
    from m3jax.checkpoint import checkpoint_identity
    from m3jax.memory.bank import BankMismatchError, architecture
    from m3jax.memory.knowledge import cut_references
    from m3jax.memory.writer import open_for_writing, writer_record
    from m3jax.model import ModelConfig

    config = lm_config(lm_data, num_steps=2, stop_at=1)
    first = loop.train(config, str(tmp_path / "a"))
    resumed = loop.train(lm_config(lm_data, num_steps=2), str(tmp_path / "a"))
    other = loop.train(lm_config(lm_data, num_steps=2), str(tmp_path / "b"))  # same run_name, same steps
    assert first["run_id"] == resumed["run_id"] != other["run_id"]
    assert first["run_id"].startswith("test-") and other["run_id"].startswith("test-")
    a, b = (checkpoint_identity(tmp_path / run / "checkpoints" / "2") for run in ("a", "b"))
    assert a == {"run_id": first["run_id"], "step": 2} and b == {"run_id": other["run_id"], "step": 2}

    refs = cut_references([("doc", list(range(3, 300)))], 128)
    cfg = ModelConfig.from_config(config.model, config.memory)
    kw = dict(architecture=architecture(cfg), tokenizer_sha256="tok", sink=[1, 2], codec="bf16", refs_per_shard=1,
              record=writer_record(refs, 1, cfg.dtype))
    bank, _ = open_for_writing(str(tmp_path / "bank"), refs, checkpoint=a, **kw)
    shape = (1, *bank.row_shape)
    positions = np.full((1, shape[1], shape[3], shape[4]), 3, np.int32)  # [n, mem_layers, kv_heads, k]
    bank.write(0, np.zeros(shape, np.float32), positions, refs.rows([0])[0])  # row 0 of 3, by run a
    with pytest.raises(BankMismatchError, match=f"written by checkpoint .*{first['run_id']}.*this writer has .*"
                                                f"{other['run_id']}"):
        open_for_writing(str(tmp_path / "bank"), refs, checkpoint=b, **kw)


def test_resume_refuses_a_config_that_changes_the_state_or_the_data_order(lm_data, tmp_path):
    import json
    import shutil

    from m3jax.config import ConfigError
    from m3jax.data.records import read_metadata, write_metadata

    loop.train(lm_config(lm_data, num_steps=3, stop_at=1), str(tmp_path / "run"))
    retokenized = tmp_path / "data"  # the same records, said to be written by another tokenizer
    shutil.copytree(lm_data, retokenized)
    write_metadata(retokenized, {**read_metadata(lm_data), "tokenizer_sha256": "0" * 64})

    def resume(**changes):
        c = lm_config(lm_data, num_steps=3)
        for key, value in changes.items():
            section, name = key.split(".")
            c[section][name] = value
        return loop.train(c, str(tmp_path / "run"))

    with pytest.raises(ConfigError, match=r"data.global_batch_size: checkpoint 16, now 8"):
        resume(**{"data.global_batch_size": 8})
    with pytest.raises(ConfigError, match=r"model.rope_base: checkpoint 10000.0, now 500000.0"):
        resume(**{"model.rope_base": 5e5})
    with pytest.raises(ConfigError, match=r"data.path: checkpoint .*; data.tokenizer_sha256: checkpoint "
                                          r"'[0-9a-f]{64}', now '0{64}'.*train.resume_overrides"):
        resume(**{"data.path": str(retokenized)})
    with pytest.raises(ConfigError, match=r"resume_overrides: \['optimizer.peak_lr'\] are not keys a resume compares"):
        resume(**{"train.resume_overrides": "optimizer.peak_lr"})
    # on purpose: a new shuffle seed, named; a new learning rate needs no override (it is logged)
    summary = resume(**{"data.shuffle_seed": 5, "optimizer.peak_lr": 5e-3,
                        "train.resume_overrides": "data.shuffle_seed"})
    assert summary["start_step"] == 1 and summary["end_step"] == 3
    saved = json.loads((tmp_path / "run" / "checkpoints" / "3" / "config" / "metadata").read_text())
    assert saved["data"]["shuffle_seed"] == 5
