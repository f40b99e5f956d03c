"""Building a model's parameters: abstractly, concretely, on a mesh. The one place every job gets them.

Parameters are a pure dict (`nnx.to_pure_dict`), the form checkpoints, the train state and exporters use; the
model's structure is one cached `graphdef` per `ModelConfig`, so `model_from(cfg, params)` is a cheap
`nnx.merge`. Each parameter carries logical axis names (`("embed", "mlp")`); `param_shardings` maps them to a
mesh through the config's logical axis rules (`m3jax.parallel`). Everything here works inside or outside a mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from m3jax import parallel
from m3jax.model.config import ModelConfig
from m3jax.model.transformer import Transformer

Params = dict[str, Any]


@functools.cache
def _abstract(cfg: ModelConfig):
    # jax.eval_shape, not nnx.eval_shape: under an active mesh the latter would shard the abstract parameters by
    # their logical names, which are not mesh axes (the rules map them).
    structure = {}

    def build():
        structure["graph"], state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
        return state

    state = jax.eval_shape(build)
    return structure["graph"], nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The model's structure (cached per config): `nnx.merge(graphdef(cfg), params)` is the model."""
    return _abstract(cfg)[0]


def abstract_params(cfg: ModelConfig) -> Params:
    """Every parameter as a `jax.ShapeDtypeStruct` (float32), nothing allocated."""
    return _abstract(cfg)[1]


def param_specs(cfg: ModelConfig) -> Params:
    """Every parameter's logical axis names as a `PartitionSpec` of logical names (map them with the rules)."""
    return _abstract(cfg)[2]


def model_from(cfg: ModelConfig, params: Params) -> Transformer:
    """The `Transformer` holding `params` (a pure dict; traced values are fine)."""
    return nnx.merge(graphdef(cfg), params)


def init_params(cfg: ModelConfig, seed: int) -> Params:
    """Fresh float32 parameters as a pure dict. Under `jax.jit(..., out_shardings=param_shardings(...))` they are
    created sharded (`init_on_mesh`)."""
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: parallel.Rules = parallel.DEFAULT_LOGICAL_AXIS_RULES):
    """Each parameter's `NamedSharding` on `mesh`, as the logical axis rules place it."""
    return parallel.tree_shardings(param_specs(cfg), mesh, tuple(tuple(r) for r in rules))


def abstract_on_mesh(cfg: ModelConfig, mesh: Mesh | None = None,
                     rules: parallel.Rules = parallel.DEFAULT_LOGICAL_AXIS_RULES) -> Params:
    """`abstract_params` carrying shardings: the restore target of a checkpoint's parameters. Without a mesh,
    everything on the first local device."""
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: sharding, abstract_params(cfg))
    else:
        shardings = param_shardings(cfg, mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_params(cfg),
                        shardings)


def init_on_mesh(cfg: ModelConfig, seed: int, mesh: Mesh,
                 rules: parallel.Rules = parallel.DEFAULT_LOGICAL_AXIS_RULES) -> Params:
    """Fresh parameters created directly in their shards on `mesh`."""
    with jax.set_mesh(mesh):
        return jax.jit(functools.partial(init_params, cfg, seed), out_shardings=param_shardings(cfg, mesh, rules))()


def param_count(params: Params) -> int:
    """Number of parameters of a tree (arrays or ShapeDtypeStructs)."""
    return int(sum(x.size for x in jax.tree.leaves(params)))
