"""Qwen2-VL / Qwen2.5-VL multimodal rotary embedding (M-RoPE): 3-D position ids and cos/sin.

`rope_index` is a vectorised, jit-able transcription of transformers' `get_rope_index` for images
(static shapes; grid values may be traced). Per real (attention-mask 1) token, a running text
position `start` counts the text tokens before it plus `max(h, w) / merge` for every image that
ended before it. A text token gets `(start, start, start)`; the k-th token of an image with
merged grid `(t, h, w)` gets `start + (k // (h*w), k // w % h, k % w)` where `start` is the
position at that image's first token. Padding positions get 0, as in transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def locate_in_runs(counts: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Items laid out as consecutive runs of `counts[i]` items (images of patches or tokens,
    examples of patches): the run holding each position of `index`, and the position within it.

    Zero-count runs (padding rows) are skipped (`side="right"`); positions past the end land in
    the last run. Used by every Qwen layout computation that maps a flat row to its image.
    """
    ends = jnp.cumsum(counts)
    run = jnp.minimum(jnp.searchsorted(ends, index, side="right"), counts.shape[0] - 1)
    return run, index - (ends - counts)[run]


def image_token_layout(
    input_ids: jax.Array, image_grid_thw: jax.Array, image_token_id: int, spatial_merge_size: int
) -> dict[str, jax.Array]:
    """Where each `<|image_pad|>` token sits among the images of the batch.

    input_ids `[B, L]`; image_grid_thw `[N, 3]`, or per example `[B, N_ex, 3]` (flattened to
    `[B * N_ex, 3]`: the same images in the same order; zero rows = no image). Image tokens are
    assigned to images in batch order (row-major over `[B, L]`), as transformers' iterator over
    the grids does. Returns `[B, L]` arrays: `is_image`, `ordinal` (index among all image
    tokens of the batch = row of the merged vision features), `local` (index within its image),
    and the image's merged `grid_h`, `grid_w` and token `count`.
    """
    batch, length = input_ids.shape
    is_image = input_ids == image_token_id
    ordinal = (jnp.cumsum(is_image.reshape(-1).astype(jnp.int32)) - 1).reshape(batch, length)
    grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
    grid_t = grid[:, 0]
    grid_h = grid[:, 1] // spatial_merge_size
    grid_w = grid[:, 2] // spatial_merge_size
    counts = grid_t * grid_h * grid_w  # image tokens per image; 0 for padding rows
    image, local = locate_in_runs(counts, ordinal)
    return {
        "is_image": is_image,
        "ordinal": ordinal,
        "local": local,
        "grid_h": grid_h[image],
        "grid_w": grid_w[image],
        "count": counts[image],
    }


def rope_index(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    image_grid_thw: jax.Array | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> jax.Array:
    """3-D M-RoPE position ids `[3, B, L]` int32, equal to transformers' `get_rope_index`
    (images; Qwen2-VL and Qwen2.5-VL agree for images: the temporal step of a still image is 1).

    `image_grid_thw`: packed `[N, 3]` or per-example `[B, N_ex, 3]` (docs/design.md).
    Text-only inputs (`image_grid_thw` None or empty) get ordinary 1-D positions counted over
    real tokens (left padding skipped), repeated on the 3 axes.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    real = jnp.asarray(attention_mask).astype(bool)
    # [N, 3] (packed) or [B, N_ex, 3] (per example): both flatten to the packed grid order.
    if image_grid_thw is None or np.size(image_grid_thw) == 0:
        text_positions = jnp.cumsum(real.astype(jnp.int32), axis=1) - 1
        text_positions = jnp.where(real, text_positions, 0)
        return jnp.broadcast_to(text_positions, (3, *input_ids.shape)).astype(jnp.int32)

    layout = image_token_layout(input_ids, image_grid_thw, image_token_id, spatial_merge_size)
    is_image = layout["is_image"] & real
    local, grid_h, grid_w = layout["local"], layout["grid_h"], layout["grid_w"]
    plane = jnp.maximum(grid_h * grid_w, 1)
    width = jnp.maximum(grid_w, 1)
    offset_t = jnp.where(is_image, local // plane, 0)
    offset_h = jnp.where(is_image, local % plane // width, 0)
    offset_w = jnp.where(is_image, local % width, 0)
    # How far the running position advances after each token: 1 per text token, max(h, w) at
    # the last token of an image, 0 inside an image and at padding.
    is_last = local == layout["count"] - 1
    advance = jnp.where(
        is_image, jnp.where(is_last, jnp.maximum(grid_h, grid_w), 0), real.astype(jnp.int32)
    )
    start = jnp.cumsum(advance, axis=1) - advance  # exclusive prefix sum per row
    positions = jnp.stack([start + offset_t, start + offset_h, start + offset_w])
    return jnp.where(real[None], positions, 0).astype(jnp.int32)


def mrope_frequency_axes(mrope_section: Sequence[int]) -> np.ndarray:
    """For each rotary frequency (head_dim / 2 of them), which position axis (t, h, w) drives it:
    section i of `mrope_section` uses axis i % 3 (transformers' `recomposition_frequencies`)."""
    return np.concatenate([np.full(n, i % 3, np.int32) for i, n in enumerate(mrope_section)])


def mrope_cos_sin(
    position_ids: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, L, 1, head_dim]` float32 for `layers.apply_rotary` from `[3, B, L]` ids."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    axes = mrope_frequency_axes(mrope_section)
    per_frequency = jnp.asarray(position_ids)[axes]  # [head_dim / 2, B, L]
    freqs = jnp.moveaxis(per_frequency, 0, -1).astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)
