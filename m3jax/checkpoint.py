"""Orbax checkpoints: train state, data-iterator state and config, restorable onto any mesh.

Layout: `{workdir}/checkpoints/{step}/{state,data,config,loop}`: the train state (Orbax arrays), the data
iterator's state, the config, and the loop's host-side state (the run's id, the identity of its data, the spike
guard's statistics and rescue log).

Identity. A run gets a unique id (`new_run_id`: its name and random digits) when its first checkpoint is made,
and every checkpoint carries it; a checkpoint's identity is {run_id, step} (`checkpoint_identity`). Two runs
never share one, whatever their names: a memory bank, and everything derived from it, records the identity of
the checkpoint that wrote it.

A checkpoint that exists but cannot be restored is an error naming it (`CheckpointError`): the run stops, the
checkpoint is left as it is, and nothing restarts from step 0 over it.

Jobs other than training (memory writing, evaluation, export) load a checkpoint with `load_model`: its
parameters placed on the job's mesh, its model config, the config it was saved with and its identity, after
checking that the job's model config describes the checkpoint's model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from m3jax import parallel, paths
from m3jax.model import params as params_lib
from m3jax.model.config import ARCHITECTURE_FIELDS, ModelConfig

ITEMS = ("state", "data", "config", "loop")


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message names it."""


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints of a run under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, async_save: bool = True):
        self.directory = paths.absolute(directory)  # a bucket URL, or a local path made absolute (as Orbax needs)
        self._check_readable_layout()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
        self._saving: int | None = None  # the step of the last save begun

    def _check_readable_layout(self) -> None:
        """Step directories that Orbax would not list (e.g. a damaged name) must not be silently skipped."""
        if not self.directory.exists():
            return
        for child in self.directory.iterdir():
            name = child.name
            if child.is_dir() and not name.isdigit() and ".orbax-checkpoint-tmp" not in name:
                raise CheckpointError(
                    f"{child}: unexpected entry in the checkpoint directory {self.directory}; refusing to train "
                    "over it (move it away if it is not a checkpoint)"
                )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict, loop_state: dict | None = None) -> bool:
        """Saves `step` now (asynchronously when enabled). `data_state` is the data iterator's JSON state,
        `loop_state` the training loop's own JSON state.

        The caller decides when (every `train.checkpoint_every` steps and at the end of an invocation). A save
        that fails (now, or in the background: raised by the next `save` or `wait`) is a CheckpointError naming
        the step; it is not committed, so no run takes it for a checkpoint.
        """
        self.wait()
        self._saving = step
        with self._naming_failure():
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(config),
                    loop=ocp.args.JsonSave(loop_state or {}),
                ),
                force=True,
            )

    @contextlib.contextmanager
    def _naming_failure(self):
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - storage errors (gcsfs's name no object) get the step's name
            raise CheckpointError(f"saving checkpoint {self.directory / str(self._saving)} failed "
                                  f"({type(e).__name__}: {e}); it is not committed") from e

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict, dict]:
        """(state, data_state, config, loop_state) of `step`, arrays placed as `abstract_state`'s shardings say."""
        path = self.directory / str(step)
        items = dict(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()
        )
        if (path / "loop").exists():  # absent from checkpoints written before the loop kept state of its own
            items["loop"] = ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - any failure to read an existing checkpoint stops the run
            raise CheckpointError(
                f"checkpoint {path} exists but cannot be restored ({type(e).__name__}: {e}). The run stops "
                "here and leaves it untouched; fix or move it to resume, never restart over it."
            ) from e
        return out.state, out.data, out.config, (out.get("loop") or {})

    def wait(self) -> None:
        with self._naming_failure():
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def save_params(directory: str | os.PathLike, params: Any, config: dict, loop_state: dict,
                step: int = 0) -> epath.Path:
    """Writes a checkpoint of parameters alone (an imported model) as step `step` of `directory`, in the layout
    above; returns its step directory.

    Its train state holds only `params`, which is all that `init_from` (`load_params`) and the jobs (`load_model`)
    read: there is no optimiser or data-iterator state, so no run resumes from it. `loop_state` should carry a run
    id (`new_run_id`), which a bank written with these parameters records.
    """
    ckpt = Checkpointer(directory, max_to_keep=1, async_save=False)
    try:
        ckpt.save(step, {"params": params}, {}, config, loop_state)
        ckpt.wait()
    finally:
        ckpt.close()
    return ckpt.directory / str(step)


def resolve_step_dir(path: str | os.PathLike) -> epath.Path:
    """A run's workdir or checkpoint directory (-> its latest step), or one step directory -> that step's directory."""
    path = paths.absolute(path)
    if (path / "state").exists():
        if not ocp.path.step.is_path_finalized(path):
            raise CheckpointError(f"{path} is an unfinished checkpoint (its save was interrupted: in a bucket, "
                                  "Orbax's commit_success.txt is missing)")
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    steps = sorted(int(p.name) for p in path.iterdir()
                   if p.name.isdigit() and (p / "state").exists() and ocp.path.step.is_path_finalized(p))
    if not steps:
        raise CheckpointError(f"{path} holds no checkpoint (no finished <step>/state directory)")
    return path / str(steps[-1])


def load_params(path: str | os.PathLike, abstract_params: Any) -> Any:
    """Parameters only, from a checkpoint directory or one step of it, placed as `abstract_params` says.

    `abstract_params` is a tree of `jax.ShapeDtypeStruct` with shardings (any mesh); the optimiser state and
    data state of the checkpoint are not read.
    """
    step_dir = resolve_step_dir(path)
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), abstract_params
    )
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(
                step_dir / "state",
                args=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args={"params": restore_args},
                    partial_restore=True,
                ),
            )
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load parameters from {step_dir} ({type(e).__name__}: {e})") from e
    logging.info("loaded parameters from %s", step_dir)
    return out["params"]


def _read_json_item(step_dir: epath.Path, item: str) -> dict:
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
            return ckptr.restore(step_dir / item)
    except Exception as e:  # noqa: BLE001 - a damaged item is named, whatever Orbax raised
        raise CheckpointError(f"cannot read {step_dir / item} ({type(e).__name__}: {e})") from e


def load_config(path: str | os.PathLike) -> dict:
    """The config dict saved with a checkpoint (a run's checkpoint directory or one step of it)."""
    return _read_json_item(resolve_step_dir(path), "config")


def load_loop_state(path: str | os.PathLike) -> dict:
    """The loop's state saved with a checkpoint ({} for a checkpoint without one)."""
    step_dir = resolve_step_dir(path)
    return _read_json_item(step_dir, "loop") if (step_dir / "loop").exists() else {}


def new_run_id(run_name: str) -> str:
    """A fresh run's identity: its name and 12 random hex digits (see the module docstring)."""
    return f"{run_name}-{secrets.token_hex(6)}"


def checkpoint_identity(step_dir: epath.Path, loop_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{run_id, step} of a checkpoint step directory: the run id its loop state records (module docstring)."""
    run_id = (load_loop_state(step_dir) if loop_state is None else loop_state).get("run_id")
    if not run_id:
        raise CheckpointError(f"checkpoint {step_dir} records no run id (it was written outside the training loop or "
                              "by an older m3jax), so nothing derived from it could name it; resume the run once to "
                              "write a checkpoint that does")
    return {"run_id": str(run_id), "step": int(step_dir.name)}


def check_architecture(model_cfg: Mapping[str, Any], saved_config: Mapping[str, Any], where: str = "") -> None:
    """`model_cfg` (a job's config.model) must describe the checkpoint's model: each of `ARCHITECTURE_FIELDS`
    that the checkpoint's config saved is equal; otherwise a CheckpointError naming the key and both values."""
    saved = saved_config.get("model", {})
    for key in ARCHITECTURE_FIELDS:
        if key in saved and saved[key] != model_cfg[key]:
            raise CheckpointError(f"config.model.{key}={model_cfg[key]!r} but the checkpoint{where} was trained with "
                                  f"{saved[key]!r}")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's parameters, loaded for a job."""

    params: Any  # pure dict, placed on the job's mesh
    model_config: ModelConfig
    saved_config: dict  # the config the checkpoint was saved with
    step_dir: epath.Path
    loop_state: dict  # what the training loop saved with it: the run id, the identity of its data, ...

    @property
    def identity(self) -> dict[str, Any]:
        """{run_id, step}: what a bank written with these parameters records (a CheckpointError without a run id)."""
        return checkpoint_identity(self.step_dir, self.loop_state)

    def check_tokenizer(self, tokenizer_sha256: str, name: str) -> None:
        """Refuses a tokenizer other than the one that wrote the checkpoint's training data (same vocabulary
        size or not: another tokenizer gives the ids other meanings)."""
        theirs = self.loop_state.get("data", {}).get("tokenizer_sha256")
        if theirs is None:
            raise CheckpointError(f"checkpoint {self.step_dir} records no tokenizer of its data, so {name} cannot be "
                                  "checked against it; resume the run once to write a checkpoint that does")
        if theirs != tokenizer_sha256:
            raise CheckpointError(f"{name} is not the tokenizer that wrote the training data of checkpoint "
                                  f"{self.step_dir} (data {self.saved_config.get('data', {}).get('path')!r}): sha256 "
                                  f"{tokenizer_sha256[:12]}…, the data's {theirs[:12]}…")


def load_model(path: str | os.PathLike, config=None, *, mesh: Mesh | None = None) -> LoadedModel:
    """The parameters of a checkpoint (a run's workdir, its checkpoint directory, or one step) for a job.

    config: the job's config (a ConfigDict). Its `model` must describe the checkpoint's model (`vocab_size = -1`
    is filled in from the checkpoint, in place), and its `memory` gives the memory geometry; its logical axis
    rules place the parameters on `mesh`. Without a config, the checkpoint's own config says everything.
    mesh: the job's devices (default: everything on the first local device).
    """
    step_dir = resolve_step_dir(path)
    saved = load_config(step_dir)
    where = f" {step_dir}"
    if config is not None:
        if config.model.vocab_size == -1:
            with config.unlocked():
                config.model.vocab_size = int(saved["model"]["vocab_size"])
        check_architecture(config.model, saved, where)
        model_cfg = ModelConfig.from_config(config.model, config.memory, attention_fallback=True)
        rules = config.logical_axis_rules
    else:
        memory = saved.get("memory")
        # A config saved before memory.heads existed: its memory section still describes the geometry.
        memory = {**memory, "heads": memory.get("heads", True)} if memory else None
        model_cfg = ModelConfig.from_config(saved["model"], memory, attention_fallback=True)
        rules = saved.get("logical_axis_rules", parallel.DEFAULT_LOGICAL_AXIS_RULES)
    params = load_params(step_dir, params_lib.abstract_on_mesh(model_cfg, mesh, rules))
    return LoadedModel(params=params, model_config=model_cfg, saved_config=saved, step_dir=step_dir,
                       loop_state=load_loop_state(step_dir))
