"""Compiled search kernels of `MultiVectorIndex` (budget-major blocks, sharded over a mesh).

A placed block is ``vectors [R, n, D]`` (``R >= r_c``: the whole stored block, or only the
prefix a streamed search placed) and, for int8, ``scales [R, n]``, split over every axis of the
mesh along ``n``. Each device scores its rows and keeps a local top-k; one all-gather + top-k
merges them. Ties go to the lower position everywhere (shards and blocks are merged in position
order), so results do not depend on the mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from metaembed_jax.scoring import chunked_scores, compute_dtype, score_block


def mesh_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)


def merge(values, positions, k):
    """Global top-k of per-part lists concatenated in position order (ties: earlier part)."""
    best, order = lax.top_k(values, k)
    return best, jnp.take_along_axis(positions, order, axis=1)


def merge_pairs(first, second, k):
    """Merge two (values, positions) top lists; ``first`` holds the lower positions."""
    values = jnp.concatenate([first[0], second[0]], axis=1)
    positions = jnp.concatenate([first[1], second[1]], axis=1)
    return merge(values, positions, min(k, values.shape[1]))


# Rows of scores are cut into blocks of this many for `top_k_by_blocks`: the fastest on CPU among
# 8-256 (docs/experiments/2026-12-speed-work.md, "Index search").
TOP_K_BLOCK = 32


def top_k_by_blocks(values, k, block: int = TOP_K_BLOCK, *, candidates_first: bool = False):
    """``lax.top_k(values, k)`` for [Nq, n], the same values and indices (ties: lower index),
    computed from the k blocks of ``block`` entries with the largest maxima: only those can hold
    a top-k entry (an entry of another block has k block maxima above it or tied at lower
    positions). XLA's CPU top-k is slow on long rows; this reads them once for the block maxima
    and sorts only k * block entries.

    With ``candidates_first`` the scores come as [n, Nq] (the orientation of the single-vector
    kernel below) and are read in place: only the block maxima [n / block, Nq] are transposed.
    """
    n, rows = values.shape if candidates_first else values.shape[::-1]
    count = -(-n // block)
    if count <= k:
        return lax.top_k(values.T if candidates_first else values, k)
    if candidates_first:
        padded = jnp.pad(values, ((0, count * block - n), (0, 0)), constant_values=-jnp.inf)
        blocks = padded.reshape(count, block, rows)
        _, chosen = lax.top_k(blocks.max(axis=1).T, k)
    else:
        padded = jnp.pad(values, ((0, 0), (0, count * block - n)), constant_values=-jnp.inf)
        blocks = padded.reshape(rows, count, block)
        _, chosen = lax.top_k(blocks.max(axis=2), k)
    chosen = jnp.sort(chosen, axis=1)  # position order, so ties keep resolving to lower indices
    if candidates_first:
        candidates = blocks[chosen, :, jnp.arange(rows)[:, None]]  # [Nq, k, block]
    else:
        candidates = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1)
    best, order = lax.top_k(candidates.reshape(rows, k * block), k)
    return best, jnp.take_along_axis(chosen, order // block, axis=1) * block + order % block


def _local_top_k(scores, positions, limit, k):
    """Top-k of one device's scores [Nq, n]; positions >= limit (padding) never win."""
    scores = jnp.where(positions < limit, scores, -jnp.inf)
    best, order = top_k_by_blocks(scores, min(k, scores.shape[1]))
    return best, jnp.take_along_axis(positions, order, axis=1)


def _gather_merge(values, positions, axes, k):
    values = lax.all_gather(values, axes, axis=1, tiled=True)
    positions = lax.all_gather(positions, axes, axis=1, tiled=True)
    return merge(values, positions, k)


def _jit_sharded(local, mesh, axes, has_mask, has_scales, *, num_replicated):
    """`local(queries, query_mask, block, scales, *replicated)` jitted under shard_map: the
    candidate block (and its scales) split along their candidate axis over the mesh axes,
    everything else replicated, outputs (the merged top-k) replicated."""
    shard_spec = P(None, axes)  # [R, n, D] and [R, n]: candidates are the second axis
    in_specs = (P(), P() if has_mask else None, shard_spec, shard_spec if has_scales else None)
    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(*in_specs, *([P()] * num_replicated)),
            out_specs=(P(), P()),
            check_vma=False,
        )
    )


@functools.lru_cache(maxsize=64)
def exhaustive_fn(mesh, r_q, r_c, k, chunk_size, has_scales, has_mask):
    """Jitted sharded exhaustive search of one block: -> (scores [Nq, k], positions [Nq, k])."""
    axes = mesh_axes(mesh)

    def local(queries, query_mask, block, scales, offset, limit):
        n_local = block.shape[1]
        positions = offset + lax.axis_index(axes) * n_local + jnp.arange(n_local)
        if _single_vector_case(block, r_q, r_c, chunk_size, has_scales, has_mask):
            values, order = _single_vector_top_k(queries, block, positions < limit, k)
            return _gather_merge(values, positions[order], axes, k)
        scores = chunked_scores(
            queries,
            block,
            query_mask,
            None,
            scales,
            r_q=r_q,
            r_c=r_c,
            chunk_size=chunk_size,
            vector_major=True,
        )
        positions = jnp.broadcast_to(positions, scores.shape)
        values, positions = _local_top_k(scores, positions, limit, k)
        return _gather_merge(values, positions, axes, k)

    return _jit_sharded(local, mesh, axes, has_mask, has_scales, num_replicated=2)


def _single_vector_case(block, r_q, r_c, chunk_size, has_scales, has_mask) -> bool:
    """A float32 (1, 1) search of all local candidates in one chunk, without masks or scales:
    scored candidates-first by `_single_vector_top_k`."""
    one_chunk = chunk_size >= block.shape[1]
    plain = not (has_scales or has_mask)
    return (r_q, r_c) == (1, 1) and one_chunk and plain and block.dtype == jnp.float32


def _single_vector_top_k(queries, block, valid, k):
    """Top-k of ``queries[:, 0]`` against ``block[0]`` [n, D] by dot product, invalid rows never
    win -> (values [Nq, k], local indices [Nq, k]).

    The product is taken as ``block[0] @ queries[:, 0].T`` ([n, Nq]), not the transpose: XLA:CPU
    runs that orientation faster at the index's shapes (docs/experiments/2026-12-speed-work.md,
    "Index search"), and the blocked top-k reads it in place.
    The scores are the same floats either way (one dot product per pair)."""
    scores = lax.dot_general(
        block[0], queries[:, 0], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    scores = jnp.where(valid[:, None], scores, -jnp.inf)
    return top_k_by_blocks(scores, min(k, block.shape[1]), candidates_first=True)


def _rerank_one(query, query_mask, block, scales, local_positions, *, r_q, r_c):
    """Exact scores of one query [R_q, D] against its own gathered candidates -> [S]."""
    candidates = block[:r_c, local_positions]  # one gather of [r_c, S, D]
    if candidates.dtype == jnp.uint16:
        candidates = lax.bitcast_convert_type(candidates, jnp.bfloat16)
    dtype = compute_dtype(query.dtype, candidates.dtype)
    return score_block(
        query[:r_q].astype(dtype),
        None if query_mask is None else query_mask[None, :r_q],
        candidates,
        None,
        None if scales is None else scales[:r_c, local_positions],
        num_queries=1,
        r_q=r_q,
        dtype=dtype,
        vector_major=True,
    )[0]


@functools.lru_cache(maxsize=64)
def rerank_fn(mesh, r_q, r_c, k, has_scales, has_mask):
    """Jitted sharded exact rerank of a shortlist [Nq, S] (global positions): each device
    scores the shortlisted candidates it owns, then one global merge."""
    axes = mesh_axes(mesh)

    def local(queries, query_mask, block, scales, offset, limit, shortlist):
        n_local = block.shape[1]
        start = offset + lax.axis_index(axes) * n_local
        # Sorted positions: ties of the exact scores then resolve to the lower position.
        shortlist = jnp.sort(shortlist, axis=1)
        local_positions = shortlist - start
        owned = (local_positions >= 0) & (local_positions < n_local) & (shortlist < limit)
        local_positions = jnp.clip(local_positions, 0, n_local - 1)
        rerank = functools.partial(_rerank_one, block=block, scales=scales, r_q=r_q, r_c=r_c)
        masks = query_mask if query_mask is not None else jnp.zeros(queries.shape[0])
        scores = lax.map(
            lambda args: rerank(
                args[0], args[1] if query_mask is not None else None, local_positions=args[2]
            ),
            (queries, masks, local_positions),
        )
        values, positions = merge(jnp.where(owned, scores, -jnp.inf), shortlist, k)
        return _gather_merge(values, positions, axes, k)

    return _jit_sharded(local, mesh, axes, has_mask, has_scales, num_replicated=3)


@functools.partial(jax.jit, static_argnames=("r_q", "r_c", "chunk_size"))
def full_precision_scores(queries, query_mask, candidates, *, r_q, r_c, chunk_size):
    """Exact float32 scores [Nq, S] of every query against gathered float32 candidates
    [r_c, S, D] (the rescoring step of a quantised index), ``chunk_size`` candidates at a time."""
    return chunked_scores(
        queries,
        candidates,
        query_mask,
        None,
        None,
        r_q=r_q,
        r_c=r_c,
        chunk_size=chunk_size,
        vector_major=True,
    )
