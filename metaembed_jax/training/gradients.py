"""What the plain train step (`step.py`) and the gradient-cached one (`grad_cache.py`) share:
embedding a batch, its MMR loss, the model of a train state with given parameters, and stacking
micro-batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from metaembed_jax.losses import mmr_loss
from metaembed_jax.training.state import TrainState


def side_features(features: dict[str, Any]) -> dict[str, Any]:
    """One side's features without the absent (None) optional ones."""
    # A side holds its backbone family's features (the pipeline keeps only `feature_keys`);
    # absent optional ones may be None.
    return {k: v for k, v in features.items() if v is not None}


def embed_batch(model: nnx.Module, batch: dict[str, Any]):
    """(queries `[B, R_q, D]`, positives `[B, R_c, D]`, negatives `[B, 1, R_c, D]` or None)."""
    queries = model.embed(side="query", **side_features(batch["query"]))
    positives = model.embed(side="candidate", **side_features(batch["positive"]))
    negatives = None
    if batch.get("negative") is not None:
        negatives = model.embed(side="candidate", **side_features(batch["negative"]))[:, None]
    return queries, positives, negatives


def embeddings_loss(embeddings, groups, temperature: float | Sequence[float], mesh: Mesh | None):
    """MMR loss of `embed_batch`'s output: queries vs the global positives and own negatives."""
    queries, positives, negatives = embeddings
    return mmr_loss(
        queries, positives, negatives, groups=groups, temperature=temperature, mesh=mesh
    )


def compute_loss(
    model: nnx.Module,
    batch: dict[str, Any],
    groups,
    temperature: float | Sequence[float],
    mesh: Mesh | None,
):
    """MMR loss of one (micro-)batch: queries vs the global positives and own hard negatives."""
    return embeddings_loss(embed_batch(model, batch), groups, temperature, mesh)


def merged_model(state: TrainState, params, other) -> nnx.Module:
    """The model of `state` with `params` and `other` (RNG streams) in place of its own.

    Fresh Variable objects for the non-differentiated parts too: nnx transforms inside the model
    (scan over layers) refuse Variables created at an outer trace level.
    """
    frozen, rest = jax.tree.map(lambda x: x, (state.frozen, other))
    return nnx.merge(state.graphdef, params, frozen, rest)


def same_shapes(micro_batches) -> bool:
    first = micro_batches[0]
    shapes = [jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), b) for b in micro_batches]
    same_structure = all(jax.tree.structure(b) == jax.tree.structure(first) for b in micro_batches)
    return same_structure and all(s == shapes[0] for s in shapes)


def stack_micro_batches(micro_batches):
    """Micro-batches of one shape (`same_shapes`) stacked on a new leading axis, for a scan."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *micro_batches)
