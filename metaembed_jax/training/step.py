"""The pure train step: `train_step(state, batch) -> (state, metrics)`.

Compiled once per batch structure with explicit in/out shardings and the state donated. A batch
is `{"query": features, "positive": features, "negative"?: features}`; a tuple of such batches is
gradient accumulation (gradients averaged over the micro-batches, each micro-batch its own
contrastive batch: in-batch negatives come from the micro-batch), or, with `grad_cache=True`,
one contrastive batch over all the micro-batches computed in pieces (`grad_cache.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metaembed_jax import sharding
from metaembed_jax.losses import group_temperatures
from metaembed_jax.training.grad_cache import cached_gradients
from metaembed_jax.training.gradients import (
    compute_loss,
    merged_model,
    same_shapes,
    stack_micro_batches,
)
from metaembed_jax.training.state import TrainState, state_shardings


def _grads_one(state: TrainState, params, other, batch, groups, temperature, mesh):
    def loss_of(params):
        model = merged_model(state, params, other)
        loss, aux = compute_loss(model, batch, groups, temperature, mesh)
        # Dropout RNG streams advanced in the forward pass: carry them to the next step.
        new_other = nnx.state(model, nnx.Not(nnx.Param))
        return loss, (aux["group_losses"], new_other)

    (loss, (group_losses, other)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return loss, group_losses, grads, other


def _unrolled_grads(state, micro_batches, groups, temperature, mesh):
    """Summed (loss, group losses, grads) and the last RNG state, micro-batches one by one in
    the program (they may differ in static shape)."""
    other = state.other
    loss = group_losses = grads = None
    for micro in micro_batches:
        m_loss, m_groups, m_grads, other = _grads_one(
            state, state.params, other, micro, groups, temperature, mesh
        )
        if grads is None:
            loss, group_losses, grads = m_loss, m_groups, m_grads
        else:
            loss, group_losses = loss + m_loss, group_losses + m_groups
            grads = jax.tree.map(jnp.add, grads, m_grads)
    return loss, group_losses, grads, other


def _scanned_grads(state, micro_batches, groups, temperature, mesh):
    """As `_unrolled_grads` for micro-batches of one shape, with a `lax.scan` over them: the
    program holds one micro-batch's forward and backward, so compile time does not grow with
    the number of micro-batches."""
    stacked = stack_micro_batches(micro_batches)

    def body(carry, micro):
        loss, group_losses, grads, other = carry
        m_loss, m_groups, m_grads, other = _grads_one(
            state, state.params, other, micro, groups, temperature, mesh
        )
        grads = jax.tree.map(jnp.add, grads, m_grads)
        return (loss + m_loss, group_losses + m_groups, grads, other), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    initial = (jnp.zeros((), jnp.float32), jnp.zeros((len(groups),), jnp.float32), zeros)
    (loss, group_losses, grads, other), _ = jax.lax.scan(body, (*initial, state.other), stacked)
    return loss, group_losses, grads, other


def train_step(
    state: TrainState,
    batch,
    *,
    groups,
    temperature: float | Sequence[float],
    schedule,
    mesh: Mesh | None = None,
    grad_cache: bool = False,
):
    """One optimizer step. `batch` is one batch or a tuple of micro-batches (accumulation);
    `grad_cache`: the micro-batches form one contrastive batch (see `grad_cache.py`)."""
    micro_batches = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    if grad_cache:
        # Imported here: grad_cache builds on this module's helpers.

        loss, group_losses, grads, other = cached_gradients(
            state, micro_batches, groups=groups, temperature=temperature, mesh=mesh
        )
        return _apply_gradients(state, loss, group_losses, grads, other, schedule)
    if len(micro_batches) > 1 and same_shapes(micro_batches):
        loss, group_losses, grads, other = _scanned_grads(
            state, micro_batches, groups, temperature, mesh
        )
    else:
        loss, group_losses, grads, other = _unrolled_grads(
            state, micro_batches, groups, temperature, mesh
        )
    count = len(micro_batches)
    if count > 1:
        loss, group_losses = loss / count, group_losses / count
        grads = jax.tree.map(lambda g: g / count, grads)
    return _apply_gradients(state, loss, group_losses, grads, other, schedule)


def _apply_gradients(state: TrainState, loss, group_losses, grads, other, schedule):
    """The optimizer update of `grads` and the step's metrics."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "group_losses": group_losses,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, params=params, other=other, opt_state=opt_state)
    return new_state, metrics


# Jitted steps by (batch structure and shardings, loss settings, schedule, mesh): shared by every
# TrainStep of the process, so a resumed run in the same process does not compile again.
_COMPILED: dict[Any, Any] = {}


class TrainStep:
    """`step(state, batch) -> (state, metrics)`: the jitted `train_step`, compiled per batch
    structure with explicit shardings (state as placed by the rules, donated; metrics replicated).
    """

    def __init__(
        self,
        state: TrainState,
        *,
        groups: Sequence,
        temperature: float | Sequence[float],
        schedule,
        mesh: Mesh | None = None,
        grad_cache: bool = False,
    ):
        self.mesh = mesh
        self.grad_cache = bool(grad_cache)
        self.groups = tuple(tuple(g) for g in groups)
        self.temperature = group_temperatures(temperature, self.groups)
        self.schedule = schedule
        self.state_shardings = None if mesh is None else state_shardings(state, mesh)
        # The part of the compile-cache key fixed for this TrainStep (the state's structure does
        # not change from step to step): built once, not on every step.
        self._fixed_key = (
            jax.tree.structure(state),
            self.groups,
            self.temperature,
            self.schedule,
            mesh,
            self.grad_cache,
        )

    def _jitted(self, state, batch):
        shardings = jax.tree.map(lambda x: x.sharding, batch) if self.mesh is not None else None
        key = (
            self._fixed_key,
            jax.tree.structure(batch),
            None if shardings is None else tuple(jax.tree.leaves(shardings)),
        )
        if key in _COMPILED:
            return _COMPILED[key]
        fn = functools.partial(
            train_step,
            groups=self.groups,
            temperature=self.temperature,
            schedule=self.schedule,
            mesh=self.mesh,
            grad_cache=self.grad_cache,
        )
        if self.mesh is None:
            jitted = jax.jit(fn, donate_argnums=0)
        else:
            replicated = NamedSharding(self.mesh, P())
            jitted = jax.jit(
                fn,
                in_shardings=(self.state_shardings, shardings),
                out_shardings=(self.state_shardings, replicated),
                donate_argnums=0,
            )
        _COMPILED[key] = jitted
        return jitted

    def lower(self, state: TrainState, batch):
        """The step for `batch`'s structure lowered without running it: `.compile()` it ahead
        of time (`metaembed compile`). `state` and `batch` may be `jax.ShapeDtypeStruct`s
        carrying the shardings the step is compiled for (the batch's own, the state's by the
        rules)."""
        with sharding.mesh_context(self.mesh):  # Pallas attention's shard_map reads it
            return self._jitted(state, batch).lower(state, batch)

    def __call__(self, state: TrainState, batch):
        # Tests and benchmarks hand every process the whole host batch.
        batch = sharding.put_batch(batch, self.mesh, whole=True)
        with sharding.mesh_context(self.mesh):  # Pallas attention's shard_map reads it
            return self._jitted(state, batch)(state, batch)
