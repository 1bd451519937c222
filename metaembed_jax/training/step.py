"""The pure train step: `train_step(state, batch) -> (state, metrics)`.

Compiled once per batch structure with explicit in/out shardings and the state donated. A batch
is `{"query": features, "positive": features, "negative"?: features}`; a tuple of such batches is
gradient accumulation (gradients averaged over the micro-batches, each micro-batch its own
contrastive batch: in-batch negatives come from the micro-batch).
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
from metaembed_jax.losses import mmr_loss
from metaembed_jax.training.state import TrainState, state_shardings


def _features(features: dict[str, Any]) -> dict[str, Any]:
    # A side holds its backbone family's features (the pipeline keeps only `feature_keys`);
    # absent optional ones may be None.
    return {k: v for k, v in features.items() if v is not None}


def compute_loss(
    model: nnx.Module, batch: dict[str, Any], groups, temperature: float, mesh: Mesh | None
):
    """MMR loss of one (micro-)batch: queries vs the global positives and own hard negatives."""
    queries = model.embed(side="query", **_features(batch["query"]))  # [B, R_q, D]
    positives = model.embed(side="candidate", **_features(batch["positive"]))  # [B, R_c, D]
    negatives = None
    if batch.get("negative") is not None:
        negatives = model.embed(side="candidate", **_features(batch["negative"]))[:, None]
    return mmr_loss(
        queries, positives, negatives, groups=groups, temperature=temperature, mesh=mesh
    )


def _grads_one(state: TrainState, params, other, batch, groups, temperature, mesh):
    def loss_of(params):
        # Fresh Variable objects for the non-differentiated parts too: nnx transforms inside the
        # model (scan over layers) refuse Variables created at an outer trace level.
        frozen, rest = jax.tree.map(lambda x: x, (state.frozen, other))
        model = nnx.merge(state.graphdef, params, frozen, rest)
        loss, aux = compute_loss(model, batch, groups, temperature, mesh)
        # Dropout RNG streams advanced in the forward pass: carry them to the next step.
        new_other = nnx.state(model, nnx.Not(nnx.Param))
        return loss, (aux["group_losses"], new_other)

    (loss, (group_losses, other)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return loss, group_losses, grads, other


def train_step(
    state: TrainState, batch, *, groups, temperature: float, schedule, mesh: Mesh | None = None
):
    """One optimizer step. `batch` is one batch or a tuple of micro-batches (accumulation)."""
    micro_batches = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    other = state.other
    loss = group_losses = grads = None
    for micro in micro_batches:  # unrolled: micro-batches may differ in (static) shape
        m_loss, m_groups, m_grads, other = _grads_one(
            state, state.params, other, micro, groups, temperature, mesh
        )
        if grads is None:
            loss, group_losses, grads = m_loss, m_groups, m_grads
        else:
            loss, group_losses = loss + m_loss, group_losses + m_groups
            grads = jax.tree.map(jnp.add, grads, m_grads)
    count = len(micro_batches)
    if count > 1:
        loss, group_losses = loss / count, group_losses / count
        grads = jax.tree.map(lambda g: g / count, grads)
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
        temperature: float,
        schedule,
        mesh: Mesh | None = None,
    ):
        self.mesh = mesh
        self.groups = tuple(tuple(g) for g in groups)
        self.temperature = float(temperature)
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

    def __call__(self, state: TrainState, batch):
        # Tests and benchmarks hand every process the whole host batch.
        batch = sharding.put_batch(batch, self.mesh, whole=True)
        return self._jitted(state, batch)(state, batch)
