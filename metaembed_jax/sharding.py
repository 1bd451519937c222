"""Device mesh, the one table of logical-axis rules, and multi-process start-up.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose devices also split the
parameters and optimizer state along `embed`), `tensor` (Megatron-style split of heads / MLP /
vocab). The batch is split over `data` x `fsdp`. Parameters carry logical axis names (see
`models/layers.py`); `LOGICAL_AXIS_RULES` maps each name to a mesh axis. A dimension that the mesh
axis does not divide, or a mesh axis already used by another dimension of the same array, is
replicated instead, so one table serves every model size and mesh shape.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# GSPMD ("auto") axes: shardings are placed by the rules and propagated by XLA; the one explicit
# collective (the positives' all-gather in the loss) runs under shard_map.
AUTO_AXES = (AxisType.Auto,) * len(MESH_AXES)

# logical name -> mesh axis (or tuple of axes, or None = replicated), for the names every
# backbone shares; a family may add rules for names of its own (`BackboneFamily.axis_rules`,
# registered with `register_axis_rules`), and `axis_rules()` is the table in force.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),  # hidden size: FSDP splits weights along it
    ("mlp", "tensor"),  # MLP intermediate
    ("heads", "tensor"),  # attention heads (q / o projections)
    ("kv_heads", "tensor"),  # key/value heads
    ("vocab", "tensor"),  # embedding table / lm head rows
    ("layers", None),  # stacked-layer axis (scanned, never split)
    ("norm", None),  # norm scales are tiny
    ("meta", None),  # meta-token table rows
    ("batch", BATCH_AXES),  # the leading axis of batches
    ("vision_embed", "fsdp"),  # a vision tower's width, split like `embed`
    ("vision_mlp", "tensor"),  # a vision tower's MLP intermediate, like `mlp`
    ("vision_patch", None),  # flattened patch pixels (the patch embedding's input)
)
_REGISTERED: list[tuple[str, Any]] = []


def register_axis_rules(rules: Sequence[tuple[str, Any]]) -> None:
    """Add logical-axis rules (a backbone family's names of its own) to `axis_rules()`."""
    _REGISTERED.extend(rule for rule in rules if rule not in _REGISTERED)


def axis_rules() -> tuple[tuple[str, Any], ...]:
    """`LOGICAL_AXIS_RULES` plus the registered rules."""
    return LOGICAL_AXIS_RULES + tuple(_REGISTERED)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") from `{data, fsdp, tensor}` sizes.

    One size may be -1: it takes all the remaining devices. Raises ValueError when the sizes do
    not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: at most one -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: sizes must be >= 1 or -1"
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: {len(devices)} devices are not "
                f"divisible by {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} "
            f"devices; {len(devices)} are available"
        )
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        # Topology-aware ordering on real accelerators (ICI rings on TPU).
        return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=AUTO_AXES)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=AUTO_AXES)


def mesh_context(mesh: Mesh | None):
    """`jax.set_mesh(mesh)` (nothing for None): the mesh in context while a step is traced, where
    layers that place kernels under `jax.shard_map` (Pallas attention) find it
    (`jax.sharding.get_abstract_mesh()`). Enter it around the call or lowering of a jitted
    function: jax refuses it inside one."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def present_batch_axes(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> tuple[str, ...]:
    """The batch axes (`data`, `fsdp` by default) that `mesh` has."""
    return tuple(a for a in axes if a in mesh.shape)


def batch_shards(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> int:
    """How many ways the batch is split (product of the batch axes' sizes)."""
    return int(np.prod([mesh.shape[a] for a in present_batch_axes(mesh, axes)]))


def logical_to_spec(
    axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> P:
    """PartitionSpec for an array of `shape` whose dims have logical names `axes` (rules:
    default `axis_rules()`).

    Unknown names raise ValueError (a typo would silently replicate a huge weight otherwise).
    """
    if axes is None:
        return P()
    table = dict(axis_rules() if rules is None else rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape and a not in used)
        ways = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or ways == 1 or size % ways:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def variable_axes(variable: nnx.Variable) -> Sequence[str | None] | None:
    """The logical axis names of a variable (flax keeps them as `out_sharding`), or None."""
    axes = variable.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)


def state_shardings(state: Any, mesh: Mesh, rules=None) -> Any:
    """NamedShardings with the structure of `state` (an nnx.State, or a pytree containing some).

    Variables are placed from their logical axis names; anything without names is replicated.
    """

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            spec = logical_to_spec(variable_axes(leaf), np.shape(leaf.get_value()), mesh, rules)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: Any, mesh: Mesh, rules=None) -> Any:
    """`state` moved onto the mesh following the logical-axis rules."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def put_batch(
    batch: Any, mesh: Mesh | None, axes: Sequence[str] = BATCH_AXES, *, whole: bool = False
) -> Any:
    """Host (numpy) arrays of a batch -> global jax.Arrays, dim 0 split over the batch `axes`
    of `mesh` (those it has); jax.Arrays pass unchanged, and without a mesh everything does.

    `whole=False` (the input pipeline): each process passes its own block of rows and the global
    array is the blocks in process order. `whole=True` (tests, benchmarks, evaluation): every
    process passes the same whole batch and keeps its shards of it.
    """
    if mesh is None:
        return batch
    present = present_batch_axes(mesh, axes)
    placement = NamedSharding(mesh, P(present if present else None))

    def put(x):
        if isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        global_shape = x.shape if whole else None
        return jax.make_array_from_process_local_data(placement, x, global_shape)

    return jax.tree.map(put, batch)


def initialize_distributed(enabled: bool | None = None, **kwargs) -> bool:
    """Start `jax.distributed` for a multi-process run; returns whether it did.

    `enabled=None` starts it only when a cluster environment is recognised (a coordinator address
    in JAX_COORDINATOR_ADDRESS, SLURM with several tasks, Open MPI, or a multi-host TPU slice).
    On CPU the cross-process collectives use gloo. `kwargs` go to `jax.distributed.initialize`
    (coordinator_address, num_processes, process_id, local_device_ids).
    """
    if enabled is None:
        env = os.environ
        enabled = bool(
            kwargs
            or env.get("JAX_COORDINATOR_ADDRESS")
            or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        )
    if not enabled:
        return False
    # Must be set before the backend starts; harmless on GPU/TPU (only the CPU client reads it).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
