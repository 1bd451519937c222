"""Gradient caching (GradCache, Gao et al. 2021): one contrastive batch larger than memory.

With `config.train.grad_cache` and `grad_accum_steps = k`, the k micro-batches of a step form ONE
contrastive batch: every query is contrasted with every positive of the whole global batch, as in
a step without accumulation, while only one micro-batch's activations are alive at a time
(micro-batches of one shape run under `lax.scan`; of different shapes, unrolled, with no such
guarantee):

1. forward every micro-batch, keeping only its embeddings (nothing is differentiated, so no
   activations are stored);
2. the MMR loss of the global batch's embeddings and its gradient with respect to them (positives
   gathered across the batch axes as in the one-shot step, inside the same `mmr_loss`);
3. forward each micro-batch again under `jax.vjp` and pull its slice of those embedding gradients
   back to the parameters; the sum over micro-batches is the gradient of the global-batch loss.

Dropout: micro-batch i runs with the RNG streams the one-shot accumulation would give it (the
step's streams advanced by the i micro-batches before it), in both passes, so passes 1 and 3 draw
the same masks and the result is the exact gradient of the global loss under those masks. The
streams after the last micro-batch are carried to the next step, as without caching.

Cost: one extra forward per micro-batch (a forward is about a third of a forward and backward
without remat, a quarter with full remat, which already recomputes it once). The embeddings of
the global batch and their cached gradients are the only global-size tensors
(`B x (R_q + R_c + n_neg R_c) x D` float32 each).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from metaembed_jax.training.gradients import (
    embed_batch,
    embeddings_loss,
    merged_model,
    same_shapes,
    stack_micro_batches,
)
from metaembed_jax.training.state import TrainState


def _embed_micro(state: TrainState, params, other, micro):
    """(embeddings of one micro-batch, the RNG streams after its forward)."""
    model = merged_model(state, params, other)
    embeddings = embed_batch(model, micro)
    return embeddings, nnx.state(model, nnx.Not(nnx.Param))


def _micro_batch_size(micro) -> int:
    return int(micro["query"]["input_ids"].shape[0])


def _check_micro_batches(micro_batches: Sequence) -> None:
    sizes = [_micro_batch_size(micro) for micro in micro_batches]
    if len(set(sizes)) != 1:
        raise ValueError(f"grad_cache needs micro-batches of equal size; got sizes {sizes}")
    with_negatives = [micro.get("negative") is not None for micro in micro_batches]
    if len(set(with_negatives)) != 1:
        raise ValueError(
            f"grad_cache needs hard negatives in every micro-batch or in none; got {with_negatives}"
        )


def interleave(parts: Sequence[jax.Array]) -> jax.Array:
    """k arrays `[b, ...]` -> `[b * k, ...]`, row `j * k + i` = row j of part i.

    Stacking on axis 1 keeps the leading (batch-sharded) axis in place, so every device's rows
    of the global batch are the rows it already holds: no data moves between devices. The loss is
    a sum over queries, each against the set of all positives, so the row order does not change
    it (only the order of float summation).
    """
    stacked = jnp.stack(parts, axis=1)
    return stacked.reshape(stacked.shape[0] * stacked.shape[1], *stacked.shape[2:])


def deinterleave(whole: jax.Array, count: int) -> list[jax.Array]:
    """The inverse of `interleave`: `[b * k, ...]` -> k arrays `[b, ...]`."""
    split = whole.reshape(whole.shape[0] // count, count, *whole.shape[1:])
    return [split[:, i] for i in range(count)]


def _join(per_micro: Sequence[tuple]) -> tuple:
    """Per-micro-batch (queries, positives, negatives | None) -> the global batch's."""
    return tuple(
        None if parts[0] is None else interleave(parts) for parts in zip(*per_micro, strict=True)
    )


def _split(global_part: tuple, count: int) -> list[tuple]:
    """The inverse of `_join`: the global batch's tensors -> per-micro-batch tuples."""
    columns = [
        [None] * count if whole is None else deinterleave(whole, count) for whole in global_part
    ]
    return [tuple(column[i] for column in columns) for i in range(count)]


def cached_gradients(
    state: TrainState,
    micro_batches: Sequence[dict],
    *,
    groups,
    temperature: float | Sequence[float],
    mesh: Mesh | None = None,
):
    """The global-batch MMR loss over all `micro_batches` and its parameter gradients.

    Takes the train state, k micro-batches of equal size (`{"query", "positive",
    "negative"?}`), the loss settings and the mesh (or None). Returns `(loss, group_losses
    [G], grads, other)`: the loss of the concatenated batch, its gradient with respect to
    `state.params` (a sum over micro-batches, not a mean) and the RNG streams after the step.
    Raises ValueError for micro-batches of unequal size or with negatives in only some of them.
    """
    _check_micro_batches(micro_batches)
    stacked = _stack(micro_batches)
    if stacked is not None:
        return _scanned(state, stacked, len(micro_batches), groups, temperature, mesh)
    return _unrolled(state, micro_batches, groups, temperature, mesh)


def _global_loss_and_grads(per_micro_or_joined, groups, temperature, mesh):
    """Pass 2: the global-batch loss, its group losses, and its gradient w.r.t. the embeddings."""

    def loss_of(embeddings):
        loss, aux = embeddings_loss(embeddings, groups, temperature, mesh)
        return loss, aux["group_losses"]

    (loss, group_losses), embedding_grads = jax.value_and_grad(loss_of, has_aux=True)(
        per_micro_or_joined
    )
    return loss, group_losses, embedding_grads


def _micro_grads(state, stream, micro, cotangent):
    """Pass 3 for one micro-batch: its forward again, pulled back with its embedding grads."""
    _, pull_back, _ = jax.vjp(
        lambda p: _embed_micro(state, p, stream, micro), state.params, has_aux=True
    )
    return pull_back(cotangent)[0]


def _stack(micro_batches: Sequence[dict]):
    """The micro-batches stacked on a new leading axis, or None if their shapes differ."""
    if not same_shapes(micro_batches):
        return None
    return stack_micro_batches(micro_batches)


def _scanned(state, stacked, count, groups, temperature, mesh):
    """Micro-batches of one shape under `lax.scan`: one micro-batch's activations are alive at
    a time (an unrolled loop lets XLA run them side by side: on CPU the k = 4 step kept 0.89x of
    the one-shot step's temporaries instead of about 1/4)."""

    def forward(other, micro):
        params = jax.tree.map(lambda x: x, state.params)  # fresh Variables inside the scan
        embeddings, new_other = _embed_micro(state, params, other, micro)
        return new_other, (embeddings, other)

    other, (embeddings, streams) = jax.lax.scan(forward, state.other, stacked)
    # [k, b, ...] -> [b, k, ...] -> [b * k, ...]: the layout of `interleave`.
    joined = jax.tree.map(lambda x: interleave(list(x)), embeddings)
    loss, group_losses, embedding_grads = _global_loss_and_grads(joined, groups, temperature, mesh)
    cotangents = jax.tree.map(lambda x: jnp.stack(deinterleave(x, count)), embedding_grads)

    def backward(grads, inputs):
        stream, micro, cotangent = inputs
        micro_grads = _micro_grads(state, stream, micro, cotangent)
        return jax.tree.map(jnp.add, grads, micro_grads), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, _ = jax.lax.scan(backward, zeros, (streams, stacked, cotangents))
    return loss, group_losses, grads, other


def _unrolled(state, micro_batches, groups, temperature, mesh):
    """Micro-batches of different shapes (e.g. length buckets): a Python loop."""
    count = len(micro_batches)
    streams, per_micro, other = [], [], state.other
    for micro in micro_batches:
        streams.append(other)
        embeddings, other = _embed_micro(state, state.params, other, micro)
        per_micro.append(embeddings)
    loss, group_losses, embedding_grads = _global_loss_and_grads(
        _join(per_micro), groups, temperature, mesh
    )
    grads = None
    for micro, stream, cotangent in zip(
        micro_batches, streams, _split(embedding_grads, count), strict=True
    ):
        micro_grads = _micro_grads(state, stream, micro, cotangent)
        grads = micro_grads if grads is None else jax.tree.map(jnp.add, grads, micro_grads)
    return loss, group_losses, grads, other
