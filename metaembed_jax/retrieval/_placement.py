"""Host rows of `MultiVectorIndex`'s budget-major blocks, and their placement on a mesh.

The index keeps its vectors as a list of budget-major blocks ``[R, n_i, ...]`` (one per `add`,
or per file shard once loaded, possibly memory-mapped); candidate positions run through the
blocks in order. These helpers read candidate ranges across the blocks and place them on
devices, reading only what each process's own devices hold.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Bytes of host rows read and written into a device's shard at a time by `place_rows`: host
# memory then holds one such piece beside the placed array, never a second copy of it.
PLACE_BYTES = 64 << 20


def row_ranges(blocks: list[np.ndarray]) -> np.ndarray:
    """Start position of each budget-major block (and the total at the end)."""
    return np.cumsum([0] + [b.shape[1] for b in blocks])


def gather_columns(blocks, positions, r_c, ranges) -> np.ndarray:
    """The first r_c vectors of the candidates at sorted ``positions``: [r_c, S, D] float32."""
    pieces = []
    for block, low, high in zip(blocks, ranges[:-1], ranges[1:], strict=True):
        first, last = np.searchsorted(positions, (low, high))
        if first < last:
            pieces.append(np.asarray(block[:r_c, positions[first:last] - low], np.float32))
    return np.concatenate(pieces, axis=1)


def host_rows(blocks: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Candidates [start, stop) of the concatenation of budget-major ``blocks`` [R, n_i, ...]
    (along axis 1), as one contiguous array; candidates past the end are zeros."""
    pieces, offset = [], 0
    for block in blocks:
        low, high = max(start - offset, 0), min(stop - offset, block.shape[1])
        if low < high:
            pieces.append(np.asarray(block[:, low:high]))
        offset += block.shape[1]
    missing = (stop - start) - sum(piece.shape[1] for piece in pieces)
    if missing:
        first = blocks[0]
        pieces.append(np.zeros((first.shape[0], missing, *first.shape[2:]), first.dtype))
    return np.ascontiguousarray(pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1))


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(shard, piece, start):
    """``shard[:, start : start + n] = piece``, in place: the shard's buffer is donated."""
    return lax.dynamic_update_slice_in_dim(shard, piece, start, axis=1)


def place_rows(blocks: list[np.ndarray], rows: int, sharding: NamedSharding) -> jax.Array:
    """The budget-major ``blocks`` [R, n_i, ...] concatenated along the candidate axis,
    zero-padded to ``rows`` candidates, as one global array with ``sharding`` (split over the
    candidate axis).

    Only the candidates of this process's devices are read from the host arrays (which may be
    memmaps), `PLACE_BYTES` at a time, each piece written in place into its device's shard. So
    host memory holds one piece beside the placed array: concatenating a device's rows on the
    host first made a second full copy whenever they spanned several blocks (an index of many
    `add` calls); docs/experiments/2026-12-speed-work.md, "Index search", has the figures.
    """
    first = blocks[0]
    shape = (first.shape[0], rows, *first.shape[2:])
    step = max(1, PLACE_BYTES // max(1, first[:, :1].nbytes))
    shards = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        start, stop, _ = index[1].indices(rows)
        shard = jnp.zeros((shape[0], stop - start, *shape[2:]), first.dtype, device=device)
        for low in range(start, stop, step):
            piece = jax.device_put(host_rows(blocks, low, min(low + step, stop)), device)
            # Waiting for each write keeps one host piece alive at a time (dispatch would
            # otherwise run ahead with many of them).
            shard = _write_rows(shard, piece, np.int32(low - start)).block_until_ready()
        shards.append(shard)
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def replicate(array: np.ndarray, mesh: Mesh) -> np.ndarray | jax.Array:
    """A host array that every process holds identically, as the search kernels take it
    replicated on all devices of ``mesh``. On a mesh of this process's own devices that is the
    array itself: the jitted kernel places it as part of the call, which took ~70 us a call less
    than placing it first (a float32 (1, 1) search of 4000 x 256, 32 queries: ~0.46 -> 0.54 ms
    kernel time with a fresh placement each call; jax 0.10.2, CPU). A mesh spanning several
    processes needs one global array built from every process's copy."""
    array = np.asarray(array)
    if not mesh.is_multi_process:
        return array
    return jax.make_array_from_callback(array.shape, NamedSharding(mesh, P()), lambda i: array[i])
