"""The train state, the loss, and the jitted, sharded train/eval steps.

`Trainer` owns one jit site for each step, with explicit in/out shardings and a donated state. Parameters and
optimiser states are sharded by the logical axis names of the model's parameters through
`config.logical_axis_rules`; the batch is sharded over (data, fsdp).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3jax import parallel
from m3jax.model import ModelConfig, Transformer
from m3jax.train.optimizer import lr_schedule, make_optimizer

BATCH_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    lr_scale: jax.Array  # float32 scalar multiplying the scheduled learning rate (lowered by the spike guard)


def abstract_model(model_cfg: ModelConfig):
    """(graphdef, abstract params as a pure dict of ShapeDtypeStruct, logical PartitionSpecs) without allocating."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return graphdef, nnx.to_pure_dict(state), specs


def init_params(model_cfg: ModelConfig, seed: int):
    """Float32 parameters as a pure dict (call under jit with out_shardings to create them sharded)."""
    with nnx.use_eager_sharding(False):
        model = Transformer(model_cfg, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.split(model)[1])


def loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float):
    """Weighted sums over tokens: (cross-entropy + z_loss·lse², cross-entropy, weight). All float32."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (lse - target_logit) * weights
    total = nll + z_loss * jnp.square(lse) * weights if z_loss else nll
    return jnp.sum(total), jnp.sum(nll), jnp.sum(weights)


class Trainer:
    """Builds the model abstractly and jits the init, train and eval steps for one mesh."""

    def __init__(self, config, mesh: Mesh):
        self.config = config
        self.mesh = mesh
        self.rules = tuple(tuple(r) for r in config.logical_axis_rules)
        self.model_cfg = ModelConfig.from_config(config.model)
        self.num_steps = int(config.train.num_steps)
        self.optimizer = make_optimizer(config.optimizer, self.num_steps)
        self.schedule = lr_schedule(config.optimizer, self.num_steps)
        self.graphdef, self.abstract_params, self.param_specs = abstract_model(self.model_cfg)

        self.param_shardings = parallel.tree_shardings(self.param_specs, mesh, self.rules)
        abstract_opt = jax.eval_shape(self.optimizer.init, self.abstract_params)
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_shardings = optax.tree_map_params(
            self.optimizer, lambda _, sharding: sharding, abstract_opt, self.param_shardings,
            transform_non_params=lambda _: replicated,
        )
        self.state_shardings = TrainState(step=replicated, params=self.param_shardings, opt_state=opt_shardings,
                                          lr_scale=replicated)
        self.batch_sharding = NamedSharding(mesh, parallel.logical_to_spec(("batch", "seq"), self.rules))

        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._train_step = jax.jit(
            self._train_step_impl,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            self._eval_step_impl,
            in_shardings=(self.param_shardings, self.batch_sharding),
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
        params = init_params(self.model_cfg, int(self.config.seed))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params),
                          lr_scale=jnp.ones((), jnp.float32))

    # ----------------------------------------------------------------------------------------------- steps
    def apply(self, params, batch) -> jax.Array:
        """Logits [batch, seq, padded_vocab] float32 for a batch dict."""
        model = nnx.merge(self.graphdef, params)
        return model(batch["inputs"], batch["positions"], batch["segment_ids"])

    def _loss(self, params, batch):
        logits = self.apply(params, batch)
        total, nll, weight = loss_sums(logits, batch["targets"], batch["loss_weights"].astype(jnp.float32),
                                       float(self.config.loss.z_loss))
        return total, (nll, weight)

    def _train_step_impl(self, state: TrainState, batch):
        with parallel.axis_rules(self.rules):
            accum = int(self.config.optimizer.grad_accum_steps)
            grad_fn = jax.value_and_grad(self._loss, has_aux=True)
            if accum == 1:
                (total, (nll, weight)), grads = grad_fn(state.params, batch)
            else:
                micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

                def body(carry, mb):
                    mb = jax.tree.map(lambda x: parallel.shard_activation(x, ("batch", "seq")), mb)
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
            _, (nll, weight) = self._loss(params, batch)
            return {"nll_sum": nll, "weight": weight}

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh):
            return self._train_step(state, batch)

    def eval_step(self, params, batch) -> dict:
        with jax.set_mesh(self.mesh):
            return self._eval_step(params, batch)

    def lower_train_step(self, state, batch) -> jax.stages.Lowered:
        """The train step lowered for `state` and `batch`, arrays or ShapeDtypeStructs (ahead-of-time compiles)."""
        with jax.set_mesh(self.mesh):
            return self._train_step.lower(state, batch)

    # ----------------------------------------------------------------------------------------------- data
    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of the global batch -> global arrays sharded over (data, fsdp)."""
        missing = [f for f in BATCH_FIELDS if f not in local_batch]
        if missing:
            raise KeyError(f"batch is missing fields {missing}; it has {sorted(local_batch)}")
        return {
            f: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local_batch[f]))
            for f in BATCH_FIELDS
        }


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

