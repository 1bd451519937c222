"""Matryoshka Multi-Vector Retrieval (MMR) loss and the paper's two baselines.

For every group `(r_q, r_c, w)` the late-interaction score of a query and a candidate uses only
the first `r_q` query vectors and the first `r_c` candidate vectors:
`s(q, c) = sum_{i<r_q} max_{j<r_c} <q_i, c_j>`. Each query's logits are its scores against every
positive of the global batch followed by its own hard negatives, divided by the temperature; the
target is its own positive. `loss = sum_g w_g * L_g / G`.

Under a mesh (`mesh=` given) the function runs per data shard with `jax.shard_map`: positives are
all-gathered across the batch axes (their gradient flows back through the gather as a
reduce-scatter), queries and hard negatives stay local, and the per-shard sums of cross-entropy
are `psum`-ed, so the result equals the single-device loss on the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from metaembed_jax import sharding
from metaembed_jax.scoring import default_chunk_size, maxsim, resolve_budget

Group = tuple[int, int, float]

# The paper's groups (r_q, r_c, weight): every prefix budget is trained at once.
MMR_GROUPS: tuple[Group, ...] = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0), (8, 16, 1.0), (16, 64, 1.0))
LOSS_VARIANTS = ("mmr", "nommr", "single")

# The loss's similarity blocks hold at most 128K floats (the size the demo's results were
# trained with), whatever the search's block size (`scoring.DEFAULT_BLOCK_ELEMENTS`, a speed knob
# of the index): chunking changes only rounding, but the demo recipe amplifies rounding into a
# different model, so a search setting must not change what training computes
# (docs/experiments/2026-12-06-demo-stability.md, "A search setting that retrained the demo").
LOSS_BLOCK_ELEMENTS = 1 << 17


def as_groups(groups: Sequence[Sequence[float]]) -> tuple[Group, ...]:
    """`(r_q, r_c, weight)` triples as (int, int, float); ValueError if malformed or empty."""
    if not groups:
        raise ValueError("loss groups are empty; expected at least one (r_q, r_c, weight)")
    for group in groups:
        if len(group) != 3:
            raise ValueError(f"loss group {group!r}; expected (r_q, r_c, weight)")
    return tuple((int(r_q), int(r_c), float(w)) for r_q, r_c, w in groups)


def groups_for_variant(variant: str, groups: Sequence[Sequence[float]] = MMR_GROUPS) -> tuple:
    """The groups a loss variant trains.

    "mmr": all `groups`; "nommr": only the last (full-budget) group, weight 1; "single": one group
    (1, 1) (used with the model's `readout="last_token"`, one vector per item).
    Raises ValueError for an unknown variant or an empty group list.
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"loss variant {variant!r}; expected one of {LOSS_VARIANTS}")
    groups = as_groups(groups)
    if variant == "nommr":
        return ((groups[-1][0], groups[-1][1], 1.0),)
    if variant == "single":
        return ((1, 1, 1.0),)
    return groups


def validate_groups(groups: Sequence[Sequence[float]], num_query: int, num_candidate: int):
    """Raise ValueError unless the groups are well formed (`as_groups`) and every one's budget
    fits in `num_query` x `num_candidate` vectors (`scoring.resolve_budget`)."""
    for group in as_groups(groups):
        try:
            resolve_budget(group[:2], num_query, num_candidate)
        except ValueError as error:
            raise ValueError(f"loss group {tuple(group)}: {error}") from None


def group_temperatures(temperature: float | Sequence[float], groups) -> tuple[float, ...]:
    """One temperature per group: `temperature` for all, or its entries (one per group)."""
    if isinstance(temperature, int | float):
        return (float(temperature),) * len(groups)
    temperatures = tuple(float(t) for t in temperature)
    if len(temperatures) != len(groups):
        raise ValueError(f"{len(temperatures)} temperatures for {len(groups)} loss groups")
    return temperatures


def _loss_maxsim(queries, candidates, budget):
    """`maxsim` chunked by the loss's own block bound, `LOSS_BLOCK_ELEMENTS`."""
    r_q, r_c = budget
    chunk = default_chunk_size(
        queries.shape[0] * r_q,
        r_c,
        candidates.shape[0],
        candidates.shape[2],
        candidates.dtype.itemsize,
        block_elements=LOSS_BLOCK_ELEMENTS,
    )
    return maxsim(queries, candidates, budget=budget, chunk_size=chunk)


def _group_cross_entropy_sums(q, pos_all, neg, targets, groups, temperature):
    """Per-group sums (over the local queries) of InfoNCE cross-entropy: `[G]` float32.

    q `[b, R_q, D]` local queries, pos_all `[B, R_c, D]` all positives, neg `[b, n, R_c, D]` or
    None (each query's own hard negatives), targets `[b]` index of each query's positive in pos_all,
    temperature one per group.
    """
    sums = []
    for (r_q, r_c, _), tau in zip(groups, temperature, strict=True):
        q_g = q[:, :r_q]
        logits = _loss_maxsim(q_g, pos_all, (r_q, r_c))  # [b, B]
        if neg is not None:
            budget = (r_q, r_c)
            own = jax.vmap(lambda query, negs, b=budget: _loss_maxsim(query[None], negs, b)[0])
            logits = jnp.concatenate([logits, own(q_g, neg)], axis=1)  # [b, B + n]
        logits = logits / tau
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(log_probs, targets[:, None], axis=1)[:, 0]
        sums.append(-jnp.sum(picked))
    return jnp.stack(sums)


def _check_shapes(q, pos, neg):
    if q.ndim != 3 or pos.ndim != 3 or q.shape[0] != pos.shape[0] or q.shape[2] != pos.shape[2]:
        raise ValueError(
            f"q {q.shape} and pos {pos.shape}: expected [B, R_q, D] and [B, R_c, D] with equal B, D"
        )
    if neg is not None and (
        neg.ndim != 4 or neg.shape[0] != q.shape[0] or neg.shape[2:] != pos.shape[1:]
    ):
        raise ValueError(
            f"neg {neg.shape}: expected [B, n_neg, R_c, D] = [{q.shape[0]}, n, "
            f"{pos.shape[1]}, {pos.shape[2]}]"
        )


def mmr_loss(
    q: jax.Array,
    pos: jax.Array,
    neg: jax.Array | None = None,
    groups: Sequence[Sequence[float]] = MMR_GROUPS,
    temperature: float | Sequence[float] = 0.03,
    *,
    mesh: Mesh | None = None,
    batch_axes: tuple[str, ...] = sharding.BATCH_AXES,
) -> tuple[jax.Array, dict]:
    """Matryoshka multi-vector InfoNCE loss.

    Args:
      q: query embeddings `[B, R_q, D]` (global batch).
      pos: positive candidate embeddings `[B, R_c, D]`; row b is query b's positive.
      neg: hard negatives `[B, n_neg, R_c, D]` (query b's own), or None.
      groups: `(r_q, r_c, weight)` budgets; each must fit in R_q x R_c.
      temperature: softmax temperature tau, or one per group.
      mesh: if given, compute per data shard (positives all-gathered over `batch_axes`).
      batch_axes: mesh axes the batch dimension is sharded over (those of size 1 are fine).
    Returns:
      `(loss, aux)`: scalar float32 `sum_g w_g L_g / G`; aux["group_losses"] `[G]` (unweighted).
    Raises:
      ValueError: a group larger than the vectors, mismatched shapes, or a batch that does not
        divide over the batch axes.
    """
    _check_shapes(q, pos, neg)
    groups = as_groups(groups)
    validate_groups(groups, q.shape[1], pos.shape[1])
    temperature = group_temperatures(temperature, groups)
    weights = jnp.asarray([w for _, _, w in groups], jnp.float32)
    batch = q.shape[0]
    if mesh is None:
        targets = jnp.arange(batch)
        sums = _group_cross_entropy_sums(q, pos, neg, targets, groups, temperature)
    else:
        sums = _sharded_group_sums(q, pos, neg, groups, temperature, mesh, batch_axes)
    group_losses = sums / batch
    loss = jnp.sum(weights * group_losses) / len(groups)
    return loss, {"group_losses": group_losses}


def _sharded_group_sums(q, pos, neg, groups, temperature, mesh, batch_axes):
    """`_group_cross_entropy_sums` on the global batch, computed shard by shard."""
    axes = sharding.present_batch_axes(mesh, batch_axes)
    shards = sharding.batch_shards(mesh, batch_axes)
    if q.shape[0] % shards:
        raise ValueError(
            f"batch {q.shape[0]} is not divisible by the {shards} shards of mesh axes {axes}"
        )
    batch_spec = P(axes)

    def local(q_local, pos_local, neg_local):
        # Positives of every shard, in global batch order; the gather is differentiable.
        pos_all = jax.lax.all_gather(pos_local, axes, axis=0, tiled=True)
        offset = jax.lax.axis_index(axes) * q_local.shape[0]
        targets = offset + jnp.arange(q_local.shape[0])
        sums = _group_cross_entropy_sums(q_local, pos_all, neg_local, targets, groups, temperature)
        return jax.lax.psum(sums, axes)

    neg_spec = None if neg is None else batch_spec
    fn = jax.shard_map(local, mesh=mesh, in_specs=(batch_spec, batch_spec, neg_spec), out_specs=P())
    return fn(q, pos, neg)
