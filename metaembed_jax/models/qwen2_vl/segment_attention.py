"""Attention of the Qwen vision tower within segments (frames, windows) of one packed patch
sequence: `[P, H, Dh]` queries, keys and values, `[P]` segment ids (runs of equal ids).

Three ways, one result (tests/test_qwen2_vl_vision.py checks them against each other):
- `blocked_attention` over the layout of `segment_blocks`: every segment starts a fresh block,
  and a query block attends only to its own segment's key blocks (cost linear in segments);
  it needs static bounds, and `within_segments` falls back when the inputs break them;
- `dense_attention`: every query against all P keys with a segment mask, in query chunks
  (O(P**2) compute, O(chunk * P) memory), the fallback of full-attention blocks;
- `local_attention`: each block of `span` queries against the rows around it, for segments of at
  most `span` consecutive rows (Qwen2.5-VL's windows), the fallback of window blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from metaembed_jax.models import layers

DENSE_QUERY_CHUNK = 512  # queries per step of full attention over a long packed sequence


def local_attention(query, key, value, segments, span: int) -> jax.Array:
    """Attention when every segment is a run of at most `span` consecutive rows (Qwen2.5-VL's
    windows after the window permutation). Each block of `span` queries attends only to the
    `3 * span - 2` rows around it, which hold every key of its segments: cost and memory are
    linear in P instead of quadratic. query/key/value [P, H, Dh], segments [P] -> [P, H, Dh].
    Longer runs (the padding segment) only see their neighbours: harmless, padding is dropped."""
    num = query.shape[0]
    blocks = -(-num // span)
    extra, halo = blocks * span - num, span - 1

    def pad(array, before, after, fill=0):
        widths = [(before, after)] + [(0, 0)] * (array.ndim - 1)
        return jnp.pad(array, widths, constant_values=fill)

    query = pad(query, 0, extra).reshape(blocks, span, *query.shape[1:])
    query_segments = pad(segments, 0, extra, -1).reshape(blocks, span)
    rows = jnp.arange(blocks)[:, None] * span + jnp.arange(span + 2 * halo)  # [blocks, span']
    key, value = (pad(a, halo, extra + halo)[rows] for a in (key, value))
    key_segments = pad(segments, halo, extra + halo, -2)[rows]
    mask = query_segments[:, None, :, None] == key_segments[:, None, None, :]
    out = layers.dot_product_attention(query, key, value, mask)
    return out.reshape(blocks * span, *out.shape[2:])[:num]


def dense_attention(query, key, value, segments, chunk: int | None = None) -> jax.Array:
    """Attention within segments over the whole packed sequence: [P, H, Dh] -> [P, H, Dh].
    Queries go `chunk` (default: DENSE_QUERY_CHUNK, read at trace time) at a time (a `lax.map`),
    so the scores take O(H * chunk * P) memory, not O(H * P**2), when many images are packed."""
    chunk = DENSE_QUERY_CHUNK if chunk is None else chunk
    num, heads, head_dim = query.shape
    if num <= chunk:
        mask = (segments[:, None] == segments[None, :])[None, None]
        return layers.dot_product_attention(query[None], key[None], value[None], mask)[0]
    blocks = -(-num // chunk)
    extra = blocks * chunk - num
    query = jnp.pad(query, ((0, extra), (0, 0), (0, 0))).reshape(blocks, chunk, heads, head_dim)
    query_segments = jnp.pad(segments, (0, extra), constant_values=-1).reshape(blocks, chunk)

    def one_chunk(args):
        chunk_query, chunk_segments = args
        mask = (chunk_segments[:, None] == segments[None, :])[None, None]
        return layers.dot_product_attention(chunk_query[None], key[None], value[None], mask)[0]

    out = jax.lax.map(one_chunk, (query, query_segments))
    return out.reshape(blocks * chunk, heads, head_dim)[:num]


class SegmentBlocks(NamedTuple):
    """Where each row of contiguous segments goes when every segment starts a fresh block of
    `block` rows (static shapes: `num_blocks` blocks, `keys_per_block` key blocks per query
    block). Built by `segment_blocks`; `fits` says whether this layout holds the segments."""

    # Close over it (the ints are static sizes): do not pass it through jit as an argument.
    dest: jax.Array  # [P] int32 row in the blocked layout; padding rows -> the dump row
    segments: jax.Array  # [num_blocks * block] int32 segment id per blocked row, -1 = empty
    first_block: jax.Array  # [num_blocks] int32 first block of each block's segment
    fits: jax.Array  # bool scalar
    block: int
    keys_per_block: int


def segment_blocks(
    segments: jax.Array, is_real: jax.Array, max_len: int, block: int, num_blocks: int
) -> SegmentBlocks:
    """The blocked layout for `segments` [P] (runs of equal ids, each at most `max_len` rows,
    padding rows `~is_real` left out). Each run fills `ceil(len / block)` blocks of its own, so a
    query block needs only the `ceil(max_len / block)` blocks from its run's first one: cost
    `num_blocks * block * max_len`, linear in the number of runs, not in their square."""
    num = segments.shape[0]
    row = jnp.arange(num, dtype=jnp.int32)
    is_start = jnp.concatenate([jnp.ones((1,), bool), segments[1:] != segments[:-1]])
    start = jax.lax.cummax(jnp.where(is_start, row, 0))
    is_end = jnp.concatenate([segments[1:] != segments[:-1], jnp.ones((1,), bool)])
    end = jax.lax.cummin(jnp.where(is_end, row, num), reverse=True)
    length, local = end - start + 1, row - start
    blocks_of_run = jnp.where(is_start & is_real, -(-length // block), 0)
    base = (jnp.cumsum(blocks_of_run) - blocks_of_run)[start]  # first block of each row's run
    total = jnp.sum(blocks_of_run)
    fits = (total <= num_blocks) & jnp.all(jnp.where(is_real, length, 0) <= max_len)
    dump = num_blocks * block
    dest = jnp.where(is_real & fits, base * block + local, dump).astype(jnp.int32)
    blocked_segments = jnp.full((dump + 1,), -1, jnp.int32).at[dest].set(segments)[:dump]
    first = jnp.zeros((num_blocks + 1,), jnp.int32).at[jnp.minimum(dest // block, num_blocks)]
    first_block = first.set(base)[:num_blocks]
    keys_per_block = -(-max_len // block)
    return SegmentBlocks(dest, blocked_segments, first_block, fits, block, keys_per_block)


def blocked_attention(
    query, key, value, blocks: SegmentBlocks, mask_segments: jax.Array | None = None
) -> jax.Array:
    """Attention within segments through the blocked layout of `segment_blocks` (which must
    fit): each block of queries against the key blocks of its own segment only, a few blocks
    per step of a `lax.map` (memory O(DENSE_QUERY_CHUNK * max_len) per step).
    query/key/value [P, H, Dh] -> [P, H, Dh]; padding rows give zeros.

    `mask_segments` [P] (ids >= 0, runs inside the layout's segments): attend within these
    finer segments instead (e.g. frames inside the blocks of whole examples); None = the
    layout's own segments."""
    num, heads, head_dim = query.shape
    block, width = blocks.block, blocks.keys_per_block
    num_blocks = blocks.first_block.shape[0]
    blocked_ids = blocks.segments
    if mask_segments is not None:  # empty blocked rows keep -1, as in the layout's own ids
        dump = num_blocks * block
        blocked_ids = jnp.full((dump + 1,), -1, jnp.int32).at[blocks.dest].set(mask_segments)
        blocked_ids = blocked_ids[:dump]

    def to_blocks(array, extra_blocks):
        rows = (num_blocks + extra_blocks) * block
        index = jnp.where(blocks.dest == num_blocks * block, rows, blocks.dest)  # dump row last
        out = jnp.zeros((rows + 1, heads, head_dim), array.dtype).at[index].set(array)
        return out[:rows].reshape(num_blocks + extra_blocks, block, heads, head_dim)

    query_blocks = to_blocks(query, 0)
    key_blocks, value_blocks = to_blocks(key, width), to_blocks(value, width)
    key_segments = jnp.concatenate([blocked_ids, jnp.full((width * block,), -2, jnp.int32)])
    key_segments = key_segments.reshape(num_blocks + width, block)
    query_segments = blocked_ids.reshape(num_blocks, block)

    def one_block(args):
        block_query, block_segments, first = args
        picks = first + jnp.arange(width)
        block_key = key_blocks[picks].reshape(width * block, heads, head_dim)
        block_value = value_blocks[picks].reshape(width * block, heads, head_dim)
        allowed = block_segments[:, None] == key_segments[picks].reshape(-1)[None, :]
        return layers.dot_product_attention(
            block_query[None], block_key[None], block_value[None], allowed[None, None]
        )[0]

    steps = max(1, DENSE_QUERY_CHUNK // block)
    out = jax.lax.map(
        one_block, (query_blocks, query_segments, blocks.first_block), batch_size=steps
    )
    flat = out.reshape(num_blocks * block, heads, head_dim)
    flat = jnp.concatenate([flat, jnp.zeros((1, heads, head_dim), flat.dtype)])  # the dump row
    return flat[blocks.dest]


def within_segments(query, key, value, segments, blocks: SegmentBlocks | None, fallback):
    """Blocked attention when `blocks` exists and fits these inputs, else `fallback()` (the
    quadratic or banded path, always correct): one branch of the `lax.cond` runs."""
    if blocks is None:
        return fallback()
    return jax.lax.cond(blocks.fits, lambda: blocked_attention(query, key, value, blocks), fallback)
