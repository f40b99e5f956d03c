"""Meshes, logical axis rules and multi-process start-up.

Parameters and the main activations carry *logical* axis names (`("embed", "mlp")`); one table of rules in the
config maps each logical name to mesh axes (`data`, `fsdp`, `tensor`). `logical_to_spec` applies the table;
`shard_activation` constrains an activation inside a jitted function when rules are active.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# The mesh axes, outermost first. `data` is pure data parallelism, `fsdp` shards parameters and optimiser state
# along with the batch, `tensor` shards heads and the MLP width.
MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes. One table maps every parameter and main activation (MaxText-style).
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("m3jax_axis_rules", default=None)


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
    """Resolves the -1 axis of `mesh_cfg` (data/fsdp/tensor sizes) against `num_devices`."""
    sizes = {ax: int(mesh_cfg[ax]) for ax in MESH_AXES}
    fixed = int(np.prod([n for n in sizes.values() if n != -1]))
    for ax, n in sizes.items():
        if n == -1:
            sizes[ax] = num_devices // fixed
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise ValueError(f"config.mesh: axes {sizes} do not multiply to the {num_devices} devices")
    return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) over `devices` (default: all global devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[ax] for ax in MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; an unknown name is an error naming it."""
    if logical_axes is None:
        return PartitionSpec()
    table = {name: target for name, target in rules}
    used: set[str] = set()
    out = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in config.logical_axis_rules")
        target = table[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis may shard only one dimension of an array: later dimensions give way.
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*out)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
    """Activates `rules` for `shard_activation` calls traced inside the block."""
    token = _ACTIVE_RULES.set(tuple((n, tuple(t) if isinstance(t, list) else t) for n, t in rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> Rules | None:
    """The logical axis rules active here (`axis_rules`), or None."""
    return _ACTIVE_RULES.get()


def shard_activation(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding when rules and a mesh are active; a no-op otherwise."""
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def tree_shardings(logical_specs, mesh: Mesh, rules: Rules):
    """A tree of PartitionSpecs of logical names -> a tree of NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules)),
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def initialize_distributed(dist_cfg) -> None:
    """Starts `jax.distributed` when several processes take part; a no-op for a single process.

    An explicit coordinator (address + num_processes + process_id in the config) wins; otherwise JAX's own
    cluster detection handles Cloud TPU pods and SLURM (`SLURM_JOB_ID` with more than one task).
    """
    explicit = bool(dist_cfg.coordinator_address)
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (explicit or slurm or tpu_pod):
        return
    if dist_cfg.cpu_collectives:  # used only by the CPU backend (multi-process tests and CPU clusters)
        jax.config.update("jax_cpu_collectives_implementation", dist_cfg.cpu_collectives)
    if explicit:
        if dist_cfg.num_processes < 1 or dist_cfg.process_id < 0:
            raise ValueError(
                "config.distributed: coordinator_address is set, so num_processes and process_id must be too "
                f"(got num_processes={dist_cfg.num_processes}, process_id={dist_cfg.process_id})"
            )
        jax.distributed.initialize(
            coordinator_address=dist_cfg.coordinator_address,
            num_processes=dist_cfg.num_processes,
            process_id=dist_cfg.process_id,
        )
    else:  # JAX's own cluster detection fills in the coordinator, process count and id
        jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order: a collective that every process of the run must call (with one
    process, just `[data]`)."""
    if jax.process_count() == 1:
        return [data]
    from jax.experimental import multihost_utils

    lengths = multihost_utils.process_allgather(np.asarray([len(data)], np.int32)).reshape(-1)
    buf = np.zeros(int(lengths.max()), np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    every = multihost_utils.process_allgather(buf).reshape(len(lengths), -1)
    return [bytes(every[i, :n]) for i, n in enumerate(lengths)]
