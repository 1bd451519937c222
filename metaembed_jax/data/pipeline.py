"""grain input pipeline: sharded, shuffled, processed, statically shaped, checkpointable.

Training (`make_train_iterator`), per process:

  built split (ArrayRecord) -> records i = process_index, process_index + process_count, ...
  -> per-epoch seeded shuffle (a new order every epoch) -> repeat forever
  -> decode record (PNG -> PIL, checks; `read_threads` threads)
  -> batch of `global_batch_size / process_count` examples
  -> processor(texts, images, side) per side + the family's static shapes
  -> [worker processes] -> prefetch -> global jax.Arrays on the mesh's batch axes.

The backbone family of the configured model (`model_family(config)`, `models/family.py`) gives
the processor (`make_processor(config)`: texts + images -> the family's features, `input_ids`
left-padded to a length bucket), the static image shapes (`family.static_shapes`: one compiled
program per bucket) and the feature keys a batch carries. This module names no feature of any
family.

The iterator's state (`get_state()`, a small JSON-able dict) restores the exact position: a
resumed run sees the batches it would have seen. The order depends on (seed, process_count,
num_workers); keep them fixed across a resume. With n > 0 workers grain deals the shuffled stream
out to the workers (element i to worker i mod n) and interleaves their batches: still
deterministic and exactly resumable, but epoch boundaries are then only approximate.

Several JAX processes: each contributes its own block of every array, so every array must lead
with the batch (the family's static shapes refuse layouts that do not). Every process must
produce the same static shapes, and processes cannot agree on a bucket per step without talking:
with more than one process every batch is padded to the largest length and patch bucket.

Bad rows are caught when a dataset is built (`builders` / `sources`, where
`config.data.skip_bad_rows` applies); a record that still fails here (e.g. a corrupted file)
always raises `BadRowError` naming the split and the record.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from metaembed_jax import sharding
from metaembed_jax.data import builders
from metaembed_jax.models.family import BackboneFamily, Processor, family_for
from metaembed_jax.models.hub import resolve_checkpoint
from metaembed_jax.models.processing import BadRowError, decode_image
from metaembed_jax.models.rules import read_config

_SIDES = (("query", "query"), ("positive", "candidate"), ("negative", "candidate"))


def _active_sides(hard_negatives: bool) -> tuple[tuple[str, str], ...]:
    """(example key, model side) pairs of a batch: the negative only with hard negatives."""
    return tuple((name, side) for name, side in _SIDES if name != "negative" or hard_negatives)


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
            except (BadRowError, KeyError) as error:
                raise BadRowError(f"{self.source_name}: record {index}: {error}") from error
        return example

    def _item(self, record: dict[str, Any], name: str) -> tuple[str, list]:
        text, data = record[f"{name}_text"], record[f"{name}_image"]
        if not text and not data:
            hint = " (set config.data.hard_negatives=False)" if name == "negative" else ""
            raise BadRowError(f"{name} has an empty text and no image{hint}")
        if not data:
            return text, []
        return text, [decode_image(data, f"{name}_image")]


class Collate:
    """List of decoded examples -> {"query": features, "positive": ..., "negative"?: ...}.

    `static_shapes` pads a side's features to the family's static shapes; `feature_keys` are
    the features a side keeps (the family's). `length`: left-pad `input_ids` / `attention_mask`
    (the text features every family has) to this many positions (several processes: the largest
    length bucket, so every process builds the same global shape)."""

    def __init__(
        self,
        processor: Processor,
        static_shapes: Callable[[dict[str, Any]], dict[str, Any]],
        feature_keys: Sequence[str],
        hard_negatives: bool,
        length: int | None = None,
    ):
        self.processor = processor
        self.static_shapes = static_shapes
        self.feature_keys = tuple(feature_keys)
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
            features = self.static_shapes(dict(features))
            kept = {key: features[key] for key in self.feature_keys if key in features}
            batch[name] = self._pad_length(kept)
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


def model_family(config) -> BackboneFamily:
    """The backbone family of the model a run config describes: `config.json` of
    `config.init_from`, else `config.model.hf_config` (their `model_type`).

    Raises ValueError for a model type no registered family handles."""
    if config.init_from:
        return family_for(read_config(resolve_checkpoint(config.init_from)))
    return family_for(config.model.hf_config.to_dict())


RUN_TOKENIZER_DIR = "tokenizer"  # a from-scratch run's copy of the built-in tokenizer


def make_processor(config, family: BackboneFamily | None = None, workdir=None) -> Processor:
    """The processor of a run: its family's, on the checkpoint's tokenizer (`config.init_from`)
    or, for a from-scratch run, the copy training saved in `<workdir>/tokenizer` (so a run
    directory moved to another machine still loads), else the built-in one
    (`<config.data.dir>/tokenizer`).

    Raises FileNotFoundError when that tokenizer directory does not exist."""
    family = model_family(config) if family is None else family
    path = resolve_checkpoint(config.init_from)
    if not path and workdir is not None and os.path.isdir(os.path.join(workdir, RUN_TOKENIZER_DIR)):
        path = os.path.join(workdir, RUN_TOKENIZER_DIR)
    path = path or os.path.join(config.data.dir, "tokenizer")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"no tokenizer at {path!r}: build the dataset first (metaembed data"
            " --config <config>) or set config.init_from"
        )
    return family.make_processor(config.data, path)


# ----------------------------------------------------------------------------- training


def batch_shards_per_process(mesh: Mesh | None, batch_axes: Sequence[str]) -> int:
    """Number of distinct batch slices held by this process's devices (1 without a mesh)."""
    if mesh is None:
        return 1
    return max(1, sharding.batch_shards(mesh, batch_axes) // jax.process_count())


def build_train_dataset(
    source,
    processor: Processor,
    data_config,
    *,
    family: BackboneFamily,
    local_batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    multiple: int = 1,
    source_name: str = "",
    same_shapes: bool = False,
) -> grain.IterDataset:
    """The per-process grain dataset of host batches (numpy) for shard `shard_index`, padded to
    the static shapes of `family`.

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
    static_shapes = family.static_shapes(
        data_config, local_batch_size, multiple=multiple, same_shapes=same_shapes
    )
    collate = Collate(
        processor,
        static_shapes,
        family.feature_keys,
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
        return sharding.put_batch(batch, self.mesh, self.batch_axes)

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
    return local_batch_size, multiple


def make_train_iterator(
    data_config,
    processor: Processor,
    *,
    family: BackboneFamily,
    mesh: Mesh | None,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    source=None,
    same_shapes: bool = False,
) -> TrainIterator:
    """The training iterator for `data_config` (config.data).

    Args:
      data_config: config.data (see metaembed_jax/data/config.py).
      processor: the family's processor, (texts, images, side) -> features.
      family: the backbone family (static shapes, feature keys) of the model trained.
      mesh: device mesh; batches become global jax.Arrays on it (None: numpy host batches).
      global_batch_size: examples per step over all processes.
      seed: shuffle seed, used when config.data.shuffle_seed is None.
      process_index, process_count: shard to read (default: this JAX process of all).
      source: a random-access record source overriding the configured dataset (tests).
      same_shapes: pad every batch to the largest length and patch bucket (always with several
        processes). The training loop asks for it under gradient accumulation: the micro-batches
        of one step then share their shapes, so a step compiles once, not once per combination
        of per-micro-batch buckets (a gradient-cached demo step recompiled on most steps, ~1 min
        each).

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
        family=family,
        local_batch_size=local_batch_size,
        seed=shuffle_seed,
        shard_index=process_index,
        shard_count=process_count,
        multiple=multiple,
        source_name=repr(source),
        same_shapes=same_shapes or process_count > 1,
    )
    logging.info(
        "train pipeline: %s, shard %d/%d, %d examples/process/step",
        source,
        process_index,
        process_count,
        local_batch_size,
    )
    return TrainIterator(dataset, mesh, data_config.batch_axes)
