"""Encoding for evaluation: items -> multi-vector embeddings, once, cached on disk.

An *item* is one query or candidate: `{"text": str, "image": bytes | str | PIL.Image | None}`
(PNG bytes as stored by the data builders, or a file path). The protocols only need an
`encode(items, side) -> [N, R, D]` callable; `ModelEncoder` is that callable for a MetaEmbed
model, and `EmbeddingCache` wraps any such callable so that a re-run (or another budget) reads
the embeddings back instead of encoding again: candidate embeddings are stored as a
`MultiVectorIndex`, query embeddings as a `.npy` file, both keyed by a fingerprint of the model
and of the items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from metaembed_jax import sharding
from metaembed_jax.models.processing import is_empty_image
from metaembed_jax.retrieval.index import MultiVectorIndex

Item = dict[str, Any]
Encode = Callable[[list[Item], str], np.ndarray]
SIDES = ("query", "candidate")


# ----------------------------------------------------------------------------- budgets


def budget_key(budget: Sequence[int]) -> str:
    """The label of a budget in tables and results.json: "(r_q, r_c)"."""
    return f"({int(budget[0])}, {int(budget[1])})"


# ----------------------------------------------------------------------------- items


def item_key(item: Item) -> tuple[str, str]:
    """A hashable identity of an item: its text and its image (path, or digest of its bytes)."""
    image = item.get("image")
    if is_empty_image(image):
        image_key = ""
    elif isinstance(image, bytes):
        image_key = "sha1:" + hashlib.sha1(image).hexdigest()
    elif isinstance(image, str | os.PathLike):
        image_key = "path:" + os.fspath(image)
    else:  # a PIL image
        image_key = "pil:" + hashlib.sha1(image.tobytes()).hexdigest()
    return item.get("text", "") or "", image_key


def unique_items(items: Sequence[Item]) -> tuple[list[Item], np.ndarray]:
    """Deduplicates items by `item_key`; returns (unique items, index of each item in them)."""
    positions: dict[tuple[str, str], int] = {}
    uniques, inverse = [], np.empty(len(items), np.int64)
    for i, item in enumerate(items):
        key = item_key(item)
        if key not in positions:
            positions[key] = len(uniques)
            uniques.append(item)
        inverse[i] = positions[key]
    return uniques, inverse


def items_fingerprint(items: Sequence[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        text, image = item_key(item)
        digest.update(text.encode("utf-8") + b"\x00" + image.encode("utf-8") + b"\x01")
    return digest.hexdigest()


# ----------------------------------------------------------------------------- cache


class EmbeddingCache:
    """Embeddings of evaluation items on disk under `directory`, reused across runs.

    Layout per set: `<directory>/<name>/{manifest.json, query.npy, candidate_index/}`. An entry
    is reused only when `model_fingerprint` and the items' fingerprint both match; otherwise it
    is re-encoded and overwritten.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        model_fingerprint: str = "",
        index_dtype: str = "float32",
    ):
        self.directory = Path(directory)
        self.model_fingerprint = model_fingerprint
        self.index_dtype = index_dtype

    def _paths(self, name: str, side: str) -> tuple[Path, Path]:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        base = self.directory / name
        data = base / ("candidate_index" if side == "candidate" else "query.npy")
        return base / f"{side}_manifest.json", data

    def _manifest(self, items: Sequence[Item]) -> dict:
        return {
            "model": self.model_fingerprint,
            "items": items_fingerprint(items),
            "count": len(items),
            "index_dtype": self.index_dtype,
        }

    def load(self, name: str, items: Sequence[Item], side: str):
        """The cached embeddings (np array for queries, MultiVectorIndex for candidates) or None.

        None (encode again) when nothing is cached, when the cache was made by another model or
        for other items, and, with a warning, when the manifest is unreadable or the query
        embeddings no longer match the digest recorded when they were stored.
        """
        manifest_path, data_path = self._paths(name, side)
        if not (manifest_path.exists() and data_path.exists()):
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            logging.warning(
                "ignoring cached %s embeddings of %s: bad manifest: %s", side, name, error
            )
            return None
        if not isinstance(manifest, dict):
            logging.warning("ignoring cached %s embeddings of %s: bad manifest", side, name)
            return None
        recorded = manifest.pop("sha256", None)
        if manifest != self._manifest(items):
            return None
        try:
            if side == "query":
                return _checked_queries(np.load(data_path), recorded, data_path)
            return MultiVectorIndex.load(str(data_path))
        except (OSError, EOFError, ValueError) as error:  # unreadable or altered: encode again
            logging.warning("ignoring cached %s embeddings of %s: %s", side, name, error)
            return None

    def store(self, name: str, items: Sequence[Item], side: str, embeddings: np.ndarray):
        """Writes embeddings; returns what `load` would return. The query manifest records the
        sha256 of the stored array (candidate indexes checksum their own shards)."""
        manifest_path, data_path = self._paths(name, side)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.unlink(missing_ok=True)  # an interrupted store is never read as valid
        manifest = self._manifest(items)
        if side == "query":
            stored = np.asarray(embeddings, np.float32)
            np.save(data_path, stored)
            manifest["sha256"] = array_digest(stored)
        else:
            stored = MultiVectorIndex.build(np.asarray(embeddings), dtype=self.index_dtype)
            stored.save(str(data_path))
        manifest_path.write_text(json.dumps(manifest, indent=1))
        return stored


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _checked_queries(array: np.ndarray, recorded: str | None, path: Path) -> np.ndarray:
    """The cached query array, or ValueError when it differs from what was stored."""
    if recorded is None:
        raise ValueError(f"{path}: no sha256 recorded for it (a cache written by an older version)")
    if array_digest(array) != recorded:
        raise ValueError(f"{path} changed since it was stored (sha256 differs)")
    return array


def encode_items(
    encode: Encode,
    items: Sequence[Item],
    side: str,
    name: str,
    cache: EmbeddingCache | None = None,
):
    """Encodes `items` on `side` through `cache` when given.

    Returns `[N, R_q, D]` float32 numpy for queries and a `MultiVectorIndex` for candidates.
    """
    if cache is not None:
        cached = cache.load(name, items, side)
        if cached is not None:
            return cached
    embeddings = np.asarray(encode(list(items), side), np.float32)
    if embeddings.ndim != 3 or embeddings.shape[0] != len(items):
        raise ValueError(
            f"encode({len(items)} items, {side!r}) must return [N, R, D] with N={len(items)}, "
            f"got shape {embeddings.shape}"
        )
    if cache is not None:
        return cache.store(name, items, side, embeddings)
    if side == "query":
        return embeddings
    return MultiVectorIndex.build(embeddings, dtype="float32")


# ----------------------------------------------------------------------------- model encoder


def embed_step(graphdef: nnx.GraphDef, side: str):
    """The jitted encode step of one side: `(model state, features) -> [B, R, D]` embeddings
    of the MetaEmbed model `graphdef` describes (`ModelEncoder`'s; `metaembed compile` compiles
    it ahead of time). Call it under `sharding.mesh_context(mesh)` for sharded arrays."""

    def embed(state, features):
        return nnx.merge(graphdef, state).embed(side=side, **features)

    return jax.jit(embed)


class ModelEncoder:
    """`encode(items, side) -> [N, R, D]` for a MetaEmbed model, batched and jitted.

    Items are sorted by modality and text length so batches share shapes (one compiled program
    per processor bucket) and carry little padding; the last batch is padded by repeating an
    item so every batch has `batch_size` rows. With a `mesh`, the batch dimension of
    `input_ids` / `attention_mask` is sharded over `batch_axes` (those present in the mesh;
    `batch_size` must divide by their size) and the model state keeps its own placement.
    `pad_features` (e.g. `data.pipeline.StaticShapes`) pads image arrays to fixed shapes, so
    that image batches do not each compile a program. `num_calls` counts encoded batches (tests
    use it to prove a cached run encodes nothing).
    """

    def __init__(
        self,
        model,
        processor,
        batch_size: int = 16,
        mesh=None,
        batch_axes: Sequence[str] = ("data", "fsdp"),
        progress: bool = True,
        pad_features: Callable[[dict], dict] | None = None,
    ):
        model.eval()  # dropout (LoRA) off
        self.graphdef, self.state = nnx.split(model)
        self.processor = processor
        self.batch_size = int(batch_size)
        self.progress = progress
        self.pad_features = pad_features
        self.num_calls = 0
        self.num_vectors = {side: model.num_vectors(side) for side in SIDES}
        self.mesh, self.batch_axes = mesh, tuple(batch_axes)
        if mesh is not None:
            shards = sharding.batch_shards(mesh, batch_axes)
            if self.batch_size % shards:
                raise ValueError(
                    f"eval batch size {self.batch_size} must be a multiple of the {shards} "
                    f"devices of mesh axes {sharding.present_batch_axes(mesh, batch_axes)}"
                )
        self._embed = {side: embed_step(self.graphdef, side) for side in SIDES}

    def __call__(self, items: list[Item], side: str) -> np.ndarray:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if not items:
            raise ValueError(f"nothing to encode on side {side!r}: empty item list")
        order = sorted(
            range(len(items)),
            key=lambda i: (
                not is_empty_image(items[i].get("image")),
                len(items[i].get("text") or ""),
            ),
        )
        outputs = []
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(
            starts, desc=f"encode {side} items", disable=not self.progress, leave=False
        ):
            batch = order[start : start + self.batch_size]
            padded = batch + [batch[-1]] * (self.batch_size - len(batch))
            texts = [items[i].get("text") or "" for i in padded]
            images = [_image_or_none(items[i].get("image")) for i in padded]
            has_images = any(image is not None for image in images)
            features = self.processor(texts, images if has_images else None, side=side)
            if self.pad_features is not None:
                features = self.pad_features(dict(features))
            features = {k: v for k, v in features.items() if v is not None}
            # Every array leads with the batch (the family's static shapes see to it).
            features = sharding.put_batch(features, self.mesh, self.batch_axes, whole=True)
            with sharding.mesh_context(self.mesh):  # Pallas attention's shard_map reads it
                embeddings = self._embed[side](self.state, features)
            self.num_calls += 1
            outputs.append(np.asarray(embeddings, np.float32)[: len(batch)])
        stacked = np.concatenate(outputs)
        result = np.empty_like(stacked)
        result[np.asarray(order)] = stacked
        return result


def _image_or_none(image):
    # Not `image or None`: the truth value of a numpy image is an error.
    return None if is_empty_image(image) else image
