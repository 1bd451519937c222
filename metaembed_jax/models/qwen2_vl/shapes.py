"""Static image shapes for Qwen2-VL batches: one compiled program per bucket, whatever the images.

The processor left-pads `input_ids` to a length bucket; `StaticShapes` zero-pads the image arrays
(per `config.data.image_layout`): per example, `pixel_values` `[B, P_ex, D]` with P_ex a patch
bucket and `image_grid_thw` `[B, max_images, 3]` (zero rows = no image); packed, `pixel_values`
rows to a patch bucket and `image_grid_thw` rows to `batch * max_images`, both rounded up to a
multiple of the process's batch shards so every array splits evenly over the devices.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from metaembed_jax.models.qwen2_vl.processing import image_layout


def static_shapes(
    data_config, batch_size: int, *, multiple: int = 1, same_shapes: bool = False
) -> StaticShapes:
    """The family's static-shape factory (`BackboneFamily.static_shapes`).

    `same_shapes` (several processes) refuses the packed layout for image data: each process can
    only place its own patches, so the global `pixel_values` would be per-process blocks
    `[real_0, pad_0, real_1, pad_1, ...]` while the backbone reads every patch past
    `sum(t*h*w)` of the whole grid as padding. Refused rather than mis-aligned.
    """
    if same_shapes and data_config.max_images > 0 and image_layout(data_config) == "packed":
        raise ValueError(
            f"{jax.process_count()} processes with image inputs (config.data.max_images="
            f"{data_config.max_images}) need config.data.image_layout='per_example': packed "
            "pixel_values / image_grid_thw would be laid out per process."
        )
    return StaticShapes(data_config, batch_size, multiple, same_shapes)


class StaticShapes:
    """Zero-pads a side's features so a batch of `batch_size` always has the same image shapes.

    Layout `config.data.image_layout` (see `processing.py`):
    - "per_example": pixel_values -> [B, patch bucket, patch_dim] (buckets per example),
      image_grid_thw -> [B, max_images, 3]. The features must already be per example (a
      processor built with `image_layout="per_example"`, as `make_processor` does).
    - "packed": pixel_values -> [patch bucket, patch_dim] (buckets for the whole batch),
      image_grid_thw -> [batch * max_images, 3], both rounded up to `multiple` rows.
    With `always_emit_pixels`, text-only batches get all-zero arrays of those shapes (one pytree
    structure for every step). `same_shapes`: always the largest patch bucket.
    """

    def __init__(self, data_config, batch_size: int, multiple: int = 1, same_shapes: bool = False):
        self.layout = image_layout(data_config)
        self.patch_dim = 3 * data_config.temporal_patch_size * data_config.patch_size**2
        self.max_images = int(data_config.max_images)
        per_image = _round_up(
            math.ceil(data_config.max_pixels / data_config.patch_size**2),
            data_config.merge_size**2,
        )
        if self.layout == "per_example":
            self.image_rows = self.max_images
            default, multiple = self.max_images * per_image, 1  # batch axis already divides
        else:
            self.image_rows = _round_up(batch_size * self.max_images, multiple)
            default = batch_size * self.max_images * per_image
        self.patch_buckets = tuple(
            _round_up(b, multiple) for b in sorted(data_config.patch_buckets or (default,))
        )
        if same_shapes:  # several processes: each must pick the same shape without talking
            self.patch_buckets = self.patch_buckets[-1:]
        self.always_emit_pixels = data_config.always_emit_pixels

    def __call__(self, features: dict[str, Any]) -> dict[str, Any]:
        features = {k: v for k, v in features.items() if v is not None}
        grid = features.get("image_grid_thw")
        if self.image_rows == 0:  # text-only data (max_images=0): no image arrays at all
            if grid is not None and np.asarray(grid).any():
                raise ValueError("a batch has images but config.data.max_images=0")
            features.pop("image_grid_thw", None)
            features.pop("pixel_values", None)
            return features
        if grid is None and not self.always_emit_pixels:
            return features
        if self.layout == "per_example":
            return self._per_example(features)
        grid = np.zeros((0, 3), np.int32) if grid is None else np.asarray(grid, np.int32)
        pixels = features.get("pixel_values")
        pixels = np.zeros((0, self.patch_dim), np.float32) if pixels is None else pixels
        pixels = self._check_pixels(pixels, 2)
        real_rows = int(np.prod(grid, axis=-1).sum()) if len(grid) else 0
        if len(pixels) < real_rows:
            raise ValueError(
                f"pixel_values has {len(pixels)} rows, image_grid_thw needs {real_rows}"
            )
        rows = self._bucket(real_rows)
        if len(grid) > self.image_rows:
            raise ValueError(
                f"batch has {len(grid)} images, more than batch * config.data.max_images "
                f"= {self.image_rows}"
            )
        # Rows past real_rows are the processor's own zero padding: safe to cut or extend.
        features["pixel_values"] = _pad_rows(pixels, rows)
        features["image_grid_thw"] = _pad_rows(grid, self.image_rows)
        return features

    def _per_example(self, features: dict[str, Any]) -> dict[str, Any]:
        batch = len(features["input_ids"])
        grid, pixels = features.get("image_grid_thw"), features.get("pixel_values")
        grid = np.zeros((batch, 0, 3), np.int32) if grid is None else np.asarray(grid, np.int32)
        pixels = np.zeros((batch, 0, self.patch_dim), np.float32) if pixels is None else pixels
        pixels = self._check_pixels(pixels, 3)
        if grid.ndim != 3 or len(grid) != batch or len(pixels) != batch:
            raise ValueError(
                f"image_grid_thw {grid.shape} / pixel_values {pixels.shape}: expected "
                f"[{batch}, N_ex, 3] / [{batch}, P_ex, D] (config.data.image_layout="
                "'per_example')"
            )
        real = np.prod(grid, axis=-1).sum(axis=-1)  # patches per example
        if (real > pixels.shape[1]).any():
            raise ValueError(
                f"pixel_values has {pixels.shape[1]} rows per example, image_grid_thw needs "
                f"{int(real.max())}"
            )
        if grid[:, self.image_rows :].any():
            raise ValueError(
                f"an example has more than config.data.max_images={self.image_rows} images"
            )
        rows = self._bucket(int(real.max()) if batch else 0)
        # Past each example's real patches / images there are only zeros: safe to cut or extend.
        features["pixel_values"] = _pad_axis1(pixels, rows)
        features["image_grid_thw"] = _pad_axis1(grid, self.image_rows)
        return features

    def _check_pixels(self, pixels, ndim: int) -> np.ndarray:
        pixels = np.asarray(pixels, np.float32)
        if pixels.ndim != ndim:
            hint = (
                "build the processor with image_layout='per_example' (make_processor does)"
                if self.layout == "per_example"
                else "use a processor with image_layout='packed'"
            )
            raise ValueError(
                f"pixel_values has shape {pixels.shape} but config.data.image_layout="
                f"{self.layout!r} needs {ndim} dims: {hint}"
            )
        if pixels.shape[-1] != self.patch_dim:
            raise ValueError(
                f"pixel_values rows have {pixels.shape[-1]} values, expected {self.patch_dim} "
                "(3 * temporal_patch_size * patch_size**2 of config.data)"
            )
        return pixels

    def _bucket(self, rows: int) -> int:
        for bucket in self.patch_buckets:
            if rows <= bucket:
                return bucket
        scope = "an example has" if self.layout == "per_example" else "batch has"
        raise ValueError(
            f"{scope} {rows} image patches, more than the largest patch bucket "
            f"{self.patch_buckets[-1]} (config.data.patch_buckets / max_pixels)"
        )


def _pad_axis1(array: np.ndarray, size: int) -> np.ndarray:
    return np.swapaxes(_pad_rows(np.swapaxes(array, 0, 1), size), 0, 1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    if len(array) > rows:
        array = array[:rows]
    padding = [(0, rows - len(array))] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, padding)
