"""The train state and the jitted, sharded train/eval steps of a task.

`Trainer` owns one jit site for each step, with explicit in/out shardings and a donated state. Parameters and
optimiser states are sharded by the logical axis names of the model's parameters through
`config.logical_axis_rules`; each batch field by the logical axes its task's schema gives it.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3jax import parallel
from m3jax.config import ConfigError
from m3jax.model import ModelConfig, kernels
from m3jax.model import params as params_lib
from m3jax.train.optimizer import lr_schedule, make_optimizer
from m3jax.train.tasks import Task, task_for


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    lr_scale: jax.Array  # float32 scalar multiplying the scheduled learning rate (lowered by the spike guard)


class Trainer:
    """Builds the model abstractly and jits the init, train and eval steps of `task` (default: the config's) for
    one mesh."""

    def __init__(self, config, mesh: Mesh, task: Task | None = None):
        self.config = config
        self.mesh = mesh
        self.task = task or task_for(config)
        self.rules = tuple(tuple(r) for r in config.logical_axis_rules)
        platform = mesh.devices.flat[0].platform  # "tpu" for a TPU topology compiled ahead of time, too
        self.model_cfg = ModelConfig.from_config(config.model, config.memory, platform=platform)
        kernel = kernels.get(self.model_cfg.attention, self.model_cfg.attention_interpret)
        if kernel is not None and not kernel.supports(int(config.data.seq_len)):
            raise ConfigError(f"config.data.seq_len: {config.data.seq_len} is not a multiple of "
                              f"{kernels.SEQ_MULTIPLES[kernel.impl]}, which config.model.attention="
                              f"{config.model.attention!r} ({kernel.impl} on {platform}) needs")
        self.num_steps = int(config.train.num_steps)
        self.optimizer = make_optimizer(config.optimizer, self.num_steps)
        self.schedule = lr_schedule(config.optimizer, self.num_steps)
        self.abstract_params = params_lib.abstract_params(self.model_cfg)

        self.param_shardings = params_lib.param_shardings(self.model_cfg, mesh, self.rules)
        abstract_opt = jax.eval_shape(self.optimizer.init, self.abstract_params)
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_shardings = optax.tree_map_params(
            self.optimizer, lambda _, sharding: sharding, abstract_opt, self.param_shardings,
            transform_non_params=lambda _: replicated,
        )
        self.state_shardings = TrainState(step=replicated, params=self.param_shardings, opt_state=opt_shardings,
                                          lr_scale=replicated)
        self.schema = self.task.schema()
        self.batch_shardings = {name: NamedSharding(mesh, parallel.logical_to_spec(field.axes, self.rules))
                                for name, field in self.schema.items()}

        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._train_step = jax.jit(
            self._train_step_impl,
            in_shardings=(self.state_shardings, self.batch_shardings),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            self._eval_step_impl,
            in_shardings=(self.param_shardings, self.batch_shardings),
            out_shardings=replicated,
        )

    # ----------------------------------------------------------------------------------------------- state
    def abstract_state(self) -> TrainState:
        """The train state as ShapeDtypeStructs carrying this mesh's shardings (a restore target)."""
        shapes = jax.eval_shape(self._init_state)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings
        )

    def init_state(self) -> TrainState:
        with jax.set_mesh(self.mesh):
            return self._init()

    def state_from_params(self, params) -> TrainState:
        """A fresh step-0 state around given parameters (e.g. loaded by `init_from`)."""
        params = jax.device_put(params, self.param_shardings)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
        lr_scale = jax.device_put(jnp.ones((), jnp.float32), self.state_shardings.lr_scale)
        return TrainState(step=step, params=params, opt_state=opt_state, lr_scale=lr_scale)

    def scale_lr(self, state: TrainState, factor: float) -> TrainState:
        """`state` with its learning-rate multiplier set to `factor` (1 = the schedule as configured)."""
        with jax.set_mesh(self.mesh):
            lr_scale = jax.jit(lambda: jnp.full((), factor, jnp.float32), out_shardings=self.state_shardings.lr_scale)()
        return state.replace(lr_scale=lr_scale)

    def _init_state(self) -> TrainState:
        params = params_lib.init_params(self.model_cfg, int(self.config.seed))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params),
                          lr_scale=jnp.ones((), jnp.float32))

    # ----------------------------------------------------------------------------------------------- steps
    def loss(self, params, batch):
        """(objective sum, (cross-entropy sum, weight)) of a batch under `params`: the task's loss."""
        total, nll, weight = self.task.loss(params_lib.model_from(self.model_cfg, params), batch)
        return total, (nll, weight)

    def _train_step_impl(self, state: TrainState, batch):
        with parallel.axis_rules(self.rules):
            accum = int(self.config.optimizer.grad_accum_steps)
            grad_fn = jax.value_and_grad(self.loss, has_aux=True)
            if accum == 1:
                (total, (nll, weight)), grads = grad_fn(state.params, batch)
            else:
                micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

                def body(carry, mb):
                    mb = {k: parallel.shard_activation(x, self.schema[k].axes) for k, x in mb.items()}
                    (t, (n, w)), g = grad_fn(state.params, mb)
                    return jax.tree.map(jnp.add, carry, (t, n, w, g)), None

                zeros = (0.0, 0.0, 0.0, jax.tree.map(jnp.zeros_like, state.params))
                (total, nll, weight, grads), _ = jax.lax.scan(body, zeros, micro)
            # Sums over every token of the global batch -> means: accumulation gives the full-batch gradient.
            denom = jnp.maximum(weight, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            # AdamW's update is linear in the learning rate, so scaling it scales the learning rate.
            updates = jax.tree.map(lambda u: u * state.lr_scale, updates)
            params = optax.apply_updates(state.params, updates)
            metrics = {
                "loss": nll / denom,
                "total_loss": total / denom,
                "grad_norm": optax.tree.norm(grads),
                "lr": self.schedule(state.step) * state.lr_scale,
                "tokens": weight,
            }
            new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, lr_scale=state.lr_scale)
            return new_state, metrics

    def _eval_step_impl(self, params, batch):
        with parallel.axis_rules(self.rules):
            sums = self.task.eval_sums(params_lib.model_from(self.model_cfg, params), batch)
            return {name: {"nll_sum": nll, "weight": weight} for name, (nll, weight) in sums.items()}

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh):
            return self._train_step(state, batch)

    def eval_step(self, params, batch) -> dict:
        """{metric: {"nll_sum", "weight"}} of the task's held-out metrics (`Task.eval_sums`) on a global batch."""
        with jax.set_mesh(self.mesh):
            return self._eval_step(params, batch)

    def lower_train_step(self, state, batch) -> jax.stages.Lowered:
        """The train step lowered for `state` and `batch`, arrays or ShapeDtypeStructs (ahead-of-time compiles)."""
        with jax.set_mesh(self.mesh):
            return self._train_step.lower(state, batch)

    # ----------------------------------------------------------------------------------------------- data
    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch as ShapeDtypeStructs with their shardings (ahead-of-time compiles)."""
        return {name: jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=self.batch_shardings[name])
                for name, f in self.schema.items()}

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of the global batch -> global arrays, each field sharded as the schema says."""
        missing = [f for f in self.schema if f not in local_batch]
        if missing:
            raise KeyError(f"batch is missing fields {missing} of task {self.task.name!r}; it has "
                           f"{sorted(local_batch)}")
        rows = self.schema[next(iter(self.schema))].shape[0] // jax.process_count()
        out = {}
        for name, field in self.schema.items():
            x = np.asarray(local_batch[name], field.dtype)
            if x.shape != (rows, *field.shape[1:]):
                raise ValueError(f"batch field {name!r} of task {self.task.name!r} has shape {x.shape}, expected "
                                 f"{(rows, *field.shape[1:])} (this process's rows of {field.shape})")
            out[name] = jax.make_array_from_process_local_data(self.batch_shardings[name], x)
        return out
