"""grain input pipeline: sharded, shuffled, processed, statically shaped, checkpointable.

Training (`make_train_iterator`), per process:

  built split (ArrayRecord) -> records i = process_index, process_index + process_count, ...
  -> per-epoch seeded shuffle (a new order every epoch) -> repeat forever
  -> decode record (PNG -> PIL, checks; `read_threads` threads)
  -> batch of `global_batch_size / process_count` examples
  -> processor(texts, images, side) per side + zero-padding to static shapes
  -> [worker processes] -> prefetch -> global jax.Arrays on the mesh's batch axes.

The processor is any callable `processor(texts, images, side) -> features` (CONTRACTS.md), e.g.
`QwenVLProcessor`; it left-pads `input_ids` to a length bucket. This module pads the image side to
static shapes (`StaticShapes`, per `config.data.image_layout`): per example, `pixel_values`
`[B, P_ex, D]` with P_ex a patch bucket and `image_grid_thw` `[B, max_images, 3]` (zero rows = no
image); packed, `pixel_values` rows to a patch bucket and `image_grid_thw` rows to
`batch * max_images`, both rounded up to a multiple of the process's batch shards so every array
splits evenly over the devices.

The iterator's state (`get_state()`, a small JSON-able dict) restores the exact position: a
resumed run sees the batches it would have seen. The order depends on (seed, process_count,
num_workers); keep them fixed across a resume. With n > 0 workers grain deals the shuffled stream
out to the workers (element i to worker i mod n) and interleaves their batches: still
deterministic and exactly resumable, but epoch boundaries are then only approximate.

Several JAX processes: each contributes its own block of every array, so every array must lead
with the batch. `config.data.image_layout="per_example"` (the default) gives the image arrays
that form (`pixel_values [B, P_ex, D]`, `image_grid_thw [B, N_ex, 3]`; the backbone packs them
inside jit). The "packed" layout (one `[P, D]` block per batch) would become per-process blocks
(real patches, then padding) that the backbone misreads, so it is refused with several processes.
Every process must produce the same static shapes, and processes cannot agree on a bucket per
step without talking: with more than one process every batch is padded to the largest length and
patch bucket.

Bad rows are caught when a dataset is built (`builders` / `sources`, where
`config.data.skip_bad_rows` applies); a record that still fails here (e.g. a corrupted file)
always raises `BadRowError` naming the split and the record.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metaembed_jax.data import builders, sources
from metaembed_jax.sharding import batch_shards

Processor = Callable[..., dict[str, Any]]
_SIDES = (("query", "query"), ("positive", "candidate"), ("negative", "candidate"))


def _active_sides(hard_negatives: bool) -> tuple[tuple[str, str], ...]:
    """(example key, model side) pairs of a batch: the negative only with hard negatives."""
    return tuple((name, side) for name, side in _SIDES if name != "negative" or hard_negatives)


IMAGE_LAYOUTS = ("packed", "per_example")


def dataset_dir(data_config) -> Path:
    """Directory of the dataset `data_config.name` under `data_config.dir`."""
    dirs = builders.DATASET_DIRS
    if data_config.name not in dirs:
        raise ValueError(
            f"unknown config.data.name {data_config.name!r}: expected one of {sorted(dirs)}"
        )
    return Path(data_config.dir) / dirs[data_config.name]


# ----------------------------------------------------------------------------- records


class DecodeRecord:
    """Record (PNG bytes, texts) -> example {"query"|"positive"|"negative": (text, [PIL images])}.

    Raises BadRowError naming the source and record index for an undecodable image, an item with
    neither text nor image, or a missing negative when hard negatives are requested.
    """

    def __init__(self, source_name: str, hard_negatives: bool):
        self.source_name = source_name
        self.names = [name for name, _ in _active_sides(hard_negatives)]

    def __call__(self, index_and_record: tuple[int, dict[str, Any]]) -> dict[str, Any]:
        index, record = index_and_record
        example = {"index": index}
        for name in self.names:
            try:
                example[name] = self._item(record, name)
            except (sources.BadRowError, KeyError) as error:
                raise sources.BadRowError(f"{self.source_name}: record {index}: {error}") from error
        return example

    def _item(self, record: dict[str, Any], name: str) -> tuple[str, list]:
        text, data = record[f"{name}_text"], record[f"{name}_image"]
        if not text and not data:
            hint = " (set config.data.hard_negatives=False)" if name == "negative" else ""
            raise sources.BadRowError(f"{name} has an empty text and no image{hint}")
        if not data:
            return text, []
        try:
            return text, [sources.decode_png(data)]
        except OSError as error:
            raise sources.BadRowError(f"cannot decode {name}_image: {error}") from error


# ----------------------------------------------------------------------------- static shapes


class StaticShapes:
    """Zero-pads a side's features so a batch of `batch_size` always has the same image shapes.

    Layout `config.data.image_layout` (CONTRACTS.md):
    - "per_example": pixel_values -> [B, patch bucket, patch_dim] (buckets per example),
      image_grid_thw -> [B, max_images, 3]. The features must already be per example (a
      processor built with `image_layout="per_example"`, as `processor_from_config` does).
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
                "build the processor with image_layout='per_example' (processor_from_config does)"
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


def image_layout(data_config) -> str:
    """`config.data.image_layout` ("packed" for configs written before the field existed)."""
    layout = data_config.get("image_layout", "packed")
    if layout not in IMAGE_LAYOUTS:
        raise ValueError(f"config.data.image_layout={layout!r}: expected one of {IMAGE_LAYOUTS}")
    return layout


def _pad_axis1(array: np.ndarray, size: int) -> np.ndarray:
    return np.swapaxes(_pad_rows(np.swapaxes(array, 0, 1), size), 0, 1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    if len(array) > rows:
        array = array[:rows]
    padding = [(0, rows - len(array))] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, padding)


class Collate:
    """List of decoded examples -> {"query": features, "positive": ..., "negative"?: ...}.

    `length`: left-pad `input_ids` / `attention_mask` to this many positions (several processes:
    the largest length bucket, so every process builds the same global shape)."""

    def __init__(
        self,
        processor: Processor,
        static_shapes: StaticShapes,
        hard_negatives: bool,
        length: int | None = None,
    ):
        self.processor = processor
        self.static_shapes = static_shapes
        self.sides = _active_sides(hard_negatives)
        self.row_ids = _accepts(processor, "row_ids")
        self.length = length
        self.pad_token_id = int(getattr(processor, "pad_token_id", 0))

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = {}
        # Record indices name the rows in the processor's own error messages.
        extra = {"row_ids": [example["index"] for example in examples]} if self.row_ids else {}
        for name, side in self.sides:
            texts = [example[name][0] for example in examples]
            images = [example[name][1] for example in examples]
            has_images = any(images)
            features = self.processor(texts, images if has_images else None, side=side, **extra)
            batch[name] = self._pad_length(self.static_shapes(dict(features)))
        return batch

    def _pad_length(self, features: dict[str, Any]) -> dict[str, Any]:
        if self.length is None:
            return features
        length = features["input_ids"].shape[1]
        if length > self.length:
            raise ValueError(
                f"input_ids has {length} positions, more than the largest length bucket "
                f"{self.length} (config.data.length_buckets)"
            )
        extra = ((0, 0), (self.length - length, 0))  # left padding, as the processor's
        features["input_ids"] = np.pad(
            features["input_ids"], extra, constant_values=self.pad_token_id
        )
        features["attention_mask"] = np.pad(features["attention_mask"], extra)
        return features


def _accepts(function: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def processor_from_config(data_config, path: str | os.PathLike | None = None):
    """QwenVLProcessor for `path` (default: the built-in tokenizer `<config.data.dir>/tokenizer`)
    with the image bounds, patch geometry and length buckets of `data_config`."""
    from metaembed_jax.data.processing import QwenVLProcessor

    path = Path(data_config.dir) / "tokenizer" if path is None else path
    return QwenVLProcessor.from_pretrained(
        path,
        min_pixels=data_config.min_pixels,
        max_pixels=data_config.max_pixels,
        length_buckets=tuple(data_config.length_buckets),
        patch_size=data_config.patch_size,
        temporal_patch_size=data_config.temporal_patch_size,
        merge_size=data_config.merge_size,
        image_layout=image_layout(data_config),
    )


# ----------------------------------------------------------------------------- training


def batch_shards_per_process(mesh: Mesh | None, batch_axes: Sequence[str]) -> int:
    """Number of distinct batch slices held by this process's devices (1 without a mesh)."""
    if mesh is None:
        return 1
    return max(1, batch_shards(mesh, batch_axes) // jax.process_count())


def build_train_dataset(
    source,
    processor: Processor,
    data_config,
    *,
    local_batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    multiple: int = 1,
    source_name: str = "",
    same_shapes: bool = False,
) -> grain.IterDataset:
    """The per-process grain dataset of host batches (numpy) for shard `shard_index`.

    `same_shapes`: pad every batch to the largest length and patch bucket (several processes
    must build arrays of one global shape; they cannot agree on a bucket per step)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, {shard_count})")
    indices = grain.MapDataset.range(len(source))[shard_index::shard_count]
    if len(indices) == 0:
        raise ValueError(f"shard {shard_index}/{shard_count} of {source_name} is empty")
    records = indices.shuffle(seed=seed).repeat(None).map(_ReadRecord(source))
    decoded = records.map(DecodeRecord(source_name, data_config.hard_negatives))
    read = grain.ReadOptions(
        num_threads=data_config.read_threads, prefetch_buffer_size=2 * local_batch_size
    )
    collate = Collate(
        processor,
        StaticShapes(data_config, local_batch_size, multiple, same_shapes),
        data_config.hard_negatives,
        max(data_config.length_buckets) if same_shapes and data_config.length_buckets else None,
    )
    dataset = decoded.to_iter_dataset(read).batch(
        local_batch_size, drop_remainder=True, batch_fn=collate
    )
    if data_config.num_workers > 0:
        _allow_grain_workers()
        options = grain.MultiprocessingOptions(
            num_workers=data_config.num_workers, per_worker_buffer_size=data_config.prefetch
        )
        return dataset.mp_prefetch(options)
    return grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=data_config.prefetch
    )


class _ReadRecord:
    # A class, not a lambda: grain pickles the pipeline into its worker processes.
    def __init__(self, source):
        self.source = source

    def __call__(self, index: int) -> tuple[int, dict[str, Any]]:
        return index, self.source[index]


def _allow_grain_workers() -> None:
    # grain's worker processes read absl flags; outside absl.app.run they are not parsed yet.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainIterator:
    """Iterator of training batches with checkpointable state.

    `next(it)` -> {"query": features, "positive": features, "negative"?: features}: global
    jax.Arrays sharded on the mesh's batch axes (numpy host batches when built without a mesh).
    `get_state()` / `set_state(state)`: exact position, a JSON-able dict.
    """

    def __init__(self, dataset: grain.IterDataset, mesh: Mesh | None, batch_axes: Sequence[str]):
        self._iterator = iter(dataset)
        self.mesh = mesh
        # grain's prefetch threads / worker processes otherwise complain at interpreter exit.
        atexit.register(_close_if_alive, weakref.ref(self))
        self.batch_axes = tuple(axis for axis in batch_axes if mesh is None or axis in mesh.shape)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        # Copy out of grain's shared-memory arrays (worker output) so their segments are freed
        # now, not at interpreter exit.
        batch = jax.tree.map(np.array, next(self._iterator))
        return batch if self.mesh is None else to_global(batch, self.mesh, self.batch_axes)

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def _close_if_alive(reference: weakref.ref) -> None:
    iterator = reference()
    if iterator is not None:
        iterator.close()


def to_global(tree: Any, mesh: Mesh, batch_axes: Sequence[str]) -> Any:
    """Host-local arrays -> global jax.Arrays, dim 0 sharded over `batch_axes` of `mesh`.

    Every process passes its own block; the global array is the blocks in process order.
    """
    spec = PartitionSpec(tuple(batch_axes) if batch_axes else None)
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def _check_batch(data_config, mesh, global_batch_size: int, process_count: int) -> tuple[int, int]:
    """(per-process batch size, batch shards per process), or a ValueError saying what fails."""
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} not divisible by {process_count} processes"
        )
    local_batch_size = global_batch_size // process_count
    multiple = batch_shards_per_process(mesh, data_config.batch_axes)
    if local_batch_size % multiple:
        raise ValueError(
            f"per-process batch {local_batch_size} not divisible by its {multiple} batch shards "
            f"(mesh axes {tuple(data_config.batch_axes)})"
        )
    packed = image_layout(data_config) == "packed"
    if mesh is not None and jax.process_count() > 1 and data_config.max_images > 0 and packed:
        # Packed, each process can only place its own patches: the global pixel_values would be
        # per-process blocks [real_0, pad_0, real_1, pad_1, ...], while the backbone reads
        # patches past sum(t*h*w) of the whole grid as padding. Refuse rather than mis-align.
        raise ValueError(
            f"{jax.process_count()} processes with image inputs (config.data.max_images="
            f"{data_config.max_images}) need config.data.image_layout='per_example': packed "
            "pixel_values / image_grid_thw would be laid out per process."
        )
    return local_batch_size, multiple


def make_train_iterator(
    data_config,
    processor: Processor,
    *,
    mesh: Mesh | None,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    source=None,
) -> TrainIterator:
    """The training iterator of CONTRACTS.md for `data_config` (config.data).

    Args:
      data_config: config.data (see metaembed_jax/data/config.py).
      processor: callable (texts, images, side) -> features, e.g. QwenVLProcessor.
      mesh: device mesh; batches become global jax.Arrays on it (None: numpy host batches).
      global_batch_size: examples per step over all processes.
      seed: shuffle seed, used when config.data.shuffle_seed is None.
      process_index, process_count: shard to read (default: this JAX process of all).
      source: a random-access record source overriding the configured dataset (tests).

    Raises:
      ValueError: batch size not divisible by processes / batch shards; FileNotFoundError: the
      dataset is not built.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_batch_size, multiple = _check_batch(data_config, mesh, global_batch_size, process_count)
    if source is None:
        source = builders.open_pairs(dataset_dir(data_config), data_config.train_split)
    shuffle_seed = seed if data_config.shuffle_seed is None else data_config.shuffle_seed
    dataset = build_train_dataset(
        source,
        processor,
        data_config,
        local_batch_size=local_batch_size,
        seed=shuffle_seed,
        shard_index=process_index,
        shard_count=process_count,
        multiple=multiple,
        source_name=repr(source),
        same_shapes=process_count > 1,
    )
    logging.info(
        "train pipeline: %s, shard %d/%d, %d examples/process/step",
        source,
        process_index,
        process_count,
        local_batch_size,
    )
    return TrainIterator(dataset, mesh, data_config.batch_axes)


# ----------------------------------------------------------------------------- evaluation


def iterate_features(
    items: Sequence[dict[str, Any]],
    processor: Processor,
    side: str,
    batch_size: int,
    data_config,
) -> Iterator[tuple[dict[str, Any], int]]:
    """Batched features for a list of items (evaluation): yields (features, num_valid).

    items: dicts with "text" (str) and "image" (PNG bytes, PIL image, b"" or None). Every batch
    has `batch_size` rows (the last is filled by repeating its last item; use only the first
    `num_valid` outputs) and the static image shapes of training batches.
    """
    if side not in ("query", "candidate"):
        raise ValueError(f"side={side!r}: expected 'query' or 'candidate'")
    static_shapes = StaticShapes(data_config, batch_size)
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        num_valid = len(chunk)
        chunk += [chunk[-1]] * (batch_size - num_valid)
        texts = [item.get("text") or "" for item in chunk]
        images = [_item_images(item) for item in chunk]
        features = processor(texts, images if any(images) else None, side=side)
        yield static_shapes(dict(features)), num_valid


def _item_images(item: dict[str, Any]) -> list:
    image = item.get("image")
    if image is None or (isinstance(image, bytes) and not image):
        return []
    return [sources.decode_png(image) if isinstance(image, bytes) else image]
