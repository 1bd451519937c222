"""From (texts, images) to Mllama features, as transformers' `MllamaProcessor` builds them, plus
the family's static shapes.

Images go through transformers' `MllamaImageProcessorPil` (resize into a canvas of up to
`max_image_tiles` tiles, pad, normalise, split into tiles), one image at a time, and are stacked
as its `pack_images` / `build_aspect_ratio_mask` do: `pixel_values [B, images, tiles, 3, S, S]`,
`aspect_ratio_ids [B, images]` (0 = no image), `aspect_ratio_mask [B, images, tiles]` (tile 0
set for every image slot, as transformers does). The cross-attention mask comes from
transformers' own `get_cross_attention_token_mask` / `convert_sparse_cross_attention_mask_to_dense`
on the left-padded rows: each `<|image|>` token and the text after it see that image's tiles.

Prompt (prefix "Query: " for queries, "" for candidates; one `<|image|>` per image; an image
without text gets "Describe the image."):
  {<|image|>...}<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prefix}{text}<|eot_id|>
The images come first, where `MllamaProcessor` puts leading image tokens (before the BOS), so
that every real position of an image row sees an image: in transformers' Mllama a position that
sees no tile attends to every vision state of its row, padding image slots included, which
would make the embedding depend on the `max_images` bucket.

Static shapes: rows are left-padded to the smallest length bucket that fits (a row longer than
the largest raises, naming it); the image axis is padded to `max_images` (the tile axis is
always `max_image_tiles`: the vision model's positional tables are sized for it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import AutoTokenizer, MllamaImageProcessorPil
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from metaembed_jax.models.mllama.config import (
    BOS_TOKEN,
    END_OF_TURN,
    HEADER_END,
    HEADER_START,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
)
from metaembed_jax.models.processing import (
    CANDIDATE_PREFIX,
    IMAGE_INSTRUCTION,
    QUERY_PREFIX,
    as_image_list,
    smallest_fitting,
)

FEATURE_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "aspect_ratio_ids",
    "aspect_ratio_mask",
    "cross_attention_mask",
)
IMAGE_FEATURE_KEYS = FEATURE_KEYS[2:]
SIDES = ("query", "candidate")
DEFAULT_LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048)
# Llama-3.2-11B-Vision's image settings (transformers' `MllamaImageProcessorPil` defaults)
PUBLISHED_TILE_SIZE, PUBLISHED_MAX_TILES = 560, 4


def _token_id(tokenizer, token: str) -> int:
    encoded = tokenizer.encode(token, add_special_tokens=False)
    if len(encoded) != 1:
        raise ValueError(
            f"tokenizer does not encode {token!r} as one special token (got {encoded}); an "
            f"Mllama tokenizer with {SPECIAL_TOKENS} is expected"
        )
    return int(encoded[0])


class MllamaEmbedProcessor:
    """Texts + images -> left-padded, bucketed Mllama features (numpy), `family.Processor`.

    Args:
      tokenizer: the checkpoint's tokenizer (holding `SPECIAL_TOKENS`).
      image_processor: a `MllamaImageProcessorPil` (default: transformers' defaults, 560 px
        tiles, up to 4 tiles).
      length_buckets: allowed sequence lengths; None pads to the longest row.
      max_images: pad the image axis to this many slots and always emit the image arrays
        (zero-filled for a text-only batch); None: the batch's most images, and a text-only
        batch carries no image arrays.
    """

    def __init__(
        self,
        tokenizer,
        image_processor: MllamaImageProcessorPil | None = None,
        *,
        length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
        max_images: int | None = None,
        query_prefix: str = QUERY_PREFIX,
        candidate_prefix: str = CANDIDATE_PREFIX,
        image_instruction: str = IMAGE_INSTRUCTION,
    ):
        if max_images is not None and max_images <= 0:
            raise ValueError(f"max_images must be None or > 0, got {max_images}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor or MllamaImageProcessorPil()
        self.length_buckets = tuple(sorted(length_buckets)) if length_buckets else None
        self.max_images = max_images
        self.prefixes = {"query": query_prefix, "candidate": candidate_prefix}
        self.image_instruction = image_instruction
        self.max_tiles = int(self.image_processor.max_image_tiles)
        self.tile_size = int(self.image_processor.size.height)
        self.pad_token_id = _token_id(tokenizer, PAD_TOKEN)
        self.image_token_id = _token_id(tokenizer, IMAGE_TOKEN)
        for token in SPECIAL_TOKENS:
            _token_id(tokenizer, token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **options) -> MllamaEmbedProcessor:
        """Tokenizer and image settings (`preprocessor_config.json`) of a checkpoint dir,
        offline. `size` / `max_image_tiles` options override the image settings."""
        image_options = {k: options.pop(k) for k in ("size", "max_image_tiles") if k in options}
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
        config = os.path.join(os.fspath(path), "preprocessor_config.json")
        if os.path.exists(config):
            image_processor = MllamaImageProcessorPil.from_pretrained(
                os.fspath(path), local_files_only=True, **image_options
            )
        else:
            image_processor = MllamaImageProcessorPil(**image_options)
        return cls(tokenizer, image_processor, **options)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer files and `preprocessor_config.json` to `path`."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(os.fspath(path))
        self.image_processor.save_pretrained(os.fspath(path))

    def build_prompt(self, text: str, num_images: int, side: str) -> str:
        """The prompt of one row (see the module docstring)."""
        if not text and num_images:
            text = self.image_instruction
        head = IMAGE_TOKEN * num_images + f"{BOS_TOKEN}{HEADER_START}user{HEADER_END}\n\n"
        return f"{head}{self.prefixes[side]}{text}{END_OF_TURN}"

    def __call__(
        self,
        texts: Sequence[str],
        images: Sequence[Sequence[Any]] | None = None,
        *,
        side: str = "query",
        row_ids: Sequence[Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Features of one side of a batch (`FEATURE_KEYS`; image arrays as the class says).

        Raises ValueError for an unknown side, a row with neither text nor image, a row longer
        than the largest length bucket, or more images than `max_images`.
        """
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if images is not None and len(images) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(images)} image entries")
        row_ids = list(range(len(texts))) if row_ids is None else list(row_ids)
        per_row = [
            as_image_list(None if images is None else images[i], row_ids[i])
            for i in range(len(texts))
        ]
        prompts = []
        for i, text in enumerate(texts):
            text = (text or "").strip()
            if not text and not per_row[i]:
                raise ValueError(f"row {row_ids[i]!r}: empty text and no image; nothing to embed")
            prompts.append(self.build_prompt(text, len(per_row[i]), side))
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        features = self._pad_rows([list(ids) for ids in encoded], row_ids)
        slots = self.max_images if self.max_images is not None else max(map(len, per_row))
        if slots == 0:
            return features
        too_many = [row_ids[i] for i, row in enumerate(per_row) if len(row) > slots]
        if too_many:
            raise ValueError(f"rows {too_many} have more than max_images={slots} images")
        return {**features, **self._images(per_row, features["input_ids"], slots)}

    def _pad_rows(self, rows: list[list[int]], row_ids) -> dict[str, np.ndarray]:
        longest = max(len(row) for row in rows)
        length = longest
        if self.length_buckets:
            length = smallest_fitting(self.length_buckets, longest)
            if length is None:
                row = row_ids[int(np.argmax([len(r) for r in rows]))]
                raise ValueError(
                    f"row {row!r} has {longest} tokens, more than the largest length bucket "
                    f"{self.length_buckets[-1]}"
                )
        input_ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        attention_mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            input_ids[i, length - len(row) :] = row
            attention_mask[i, length - len(row) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @property
    def pixel_budget(self) -> int:
        """The pixels of the largest canvas an image is resized into: `max_tiles` tiles."""
        return self.tile_size**2 * self.max_tiles

    def fit_image(self, image: Image.Image) -> Image.Image:
        """`image` as it is: the Mllama processor fits any size and aspect ratio into its
        tile canvas itself (resize, then pad)."""
        return image

    def _images(self, per_row, input_ids: np.ndarray, slots: int) -> dict[str, np.ndarray]:
        batch, tiles, size = len(per_row), self.max_tiles, self.tile_size
        pixel_values = np.zeros((batch, slots, tiles, 3, size, size), np.float32)
        aspect_ratio_ids = np.zeros((batch, slots), np.int32)
        aspect_ratio_mask = np.zeros((batch, slots, tiles), np.int32)
        aspect_ratio_mask[:, :, 0] = 1  # transformers sets tile 0 of every image slot
        num_tiles = []
        for b, row_images in enumerate(per_row):
            num_tiles.append([])
            for i, image in enumerate(row_images):
                out = self.image_processor(images=[[image]], return_tensors="np")
                count = int(out["num_tiles"][0][0])
                pixel_values[b, i] = out["pixel_values"][0, 0]
                aspect_ratio_ids[b, i] = out["aspect_ratio_ids"][0, 0]
                aspect_ratio_mask[b, i] = out["aspect_ratio_mask"][0, 0]
                num_tiles[b].append(count)
        token_masks = [
            get_cross_attention_token_mask(list(ids), self.image_token_id) for ids in input_ids
        ]
        cross = np.zeros((batch, input_ids.shape[1], slots, tiles), np.int32)
        if any(token_masks):
            dense = convert_sparse_cross_attention_mask_to_dense(
                token_masks, num_tiles, tiles, input_ids.shape[1]
            )
            cross[:, :, : dense.shape[2]] = dense
        return {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
            "cross_attention_mask": cross,
        }


def make_processor(data_config, path: str | os.PathLike | None = None) -> MllamaEmbedProcessor:
    """The family's processor for a data config: the tokenizer / image settings of `path` (a
    checkpoint or tokenizer dir; default: the built-in tokenizer `<config.data.dir>/tokenizer`),
    the config's length buckets and `max_images`, and `data_config.mllama_tile_size` /
    `mllama_max_tiles` when non-zero (tiny models; 0: the checkpoint's image settings)."""
    path = Path(data_config.dir) / "tokenizer" if path is None else path
    options = {}
    if data_config.mllama_tile_size:
        side = int(data_config.mllama_tile_size)
        options["size"] = {"height": side, "width": side}
    if data_config.mllama_max_tiles:
        options["max_image_tiles"] = int(data_config.mllama_max_tiles)
    max_images = int(data_config.max_images) or None
    return MllamaEmbedProcessor.from_pretrained(
        path,
        length_buckets=tuple(data_config.length_buckets) or None,
        max_images=max_images,
        **options,
    )


class StaticShapes:
    """Pads one side's features to the family's static image shapes: the image axis to
    `max_images` slots; a text-only batch gets zero image arrays (one pytree structure for
    every step) when `always_emit_pixels`. The tile axis and tile size are fixed by the
    processor (the model's `max_num_tiles`, `image_size`)."""

    def __init__(self, data_config, batch_size: int, multiple: int = 1, same_shapes: bool = False):
        del batch_size, multiple, same_shapes  # one image shape for every batch already
        self.max_images = int(data_config.max_images)
        self.always_emit_pixels = bool(data_config.always_emit_pixels)
        # 0 = the published checkpoint's tiles (what its preprocessor_config.json holds)
        self.tiles = int(data_config.mllama_max_tiles or PUBLISHED_MAX_TILES)
        self.tile_size = int(data_config.mllama_tile_size or PUBLISHED_TILE_SIZE)

    def __call__(self, features: dict[str, Any]) -> dict[str, Any]:
        features = {k: v for k, v in features.items() if v is not None}
        has_images = "pixel_values" in features
        if self.max_images == 0 or (not has_images and not self.always_emit_pixels):
            if has_images and np.asarray(features["aspect_ratio_ids"]).any():
                raise ValueError("a batch has images but config.data.max_images=0")
            return {k: v for k, v in features.items() if k not in IMAGE_FEATURE_KEYS}
        batch, length = np.shape(features["input_ids"])
        if not has_images:
            features.update(self._empty(batch, length))
        images = np.shape(features["pixel_values"])[1]
        if images > self.max_images:
            raise ValueError(
                f"a batch has {images} image slots, more than config.data.max_images="
                f"{self.max_images}"
            )
        for key in IMAGE_FEATURE_KEYS:
            axis = 2 if key == "cross_attention_mask" else 1
            features[key] = _pad_axis(np.asarray(features[key]), axis, self.max_images)
        features["aspect_ratio_mask"][:, images:, 0] = 1  # as transformers pads image slots
        return features

    def _empty(self, batch: int, length: int) -> dict[str, np.ndarray]:
        size, tiles = self.tile_size, self.tiles
        mask = np.zeros((batch, 0, tiles), np.int32)
        return {
            "pixel_values": np.zeros((batch, 0, tiles, 3, size, size), np.float32),
            "aspect_ratio_ids": np.zeros((batch, 0), np.int32),
            "aspect_ratio_mask": mask,
            "cross_attention_mask": np.zeros((batch, length, 0, tiles), np.int32),
        }


def _pad_axis(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, size - array.shape[axis])
    return np.pad(array, widths)


def static_shapes(data_config, batch_size: int, *, multiple: int = 1, same_shapes: bool = False):
    """The family's `static_shapes` (see `family.BackboneFamily`)."""
    return StaticShapes(data_config, batch_size, multiple, same_shapes)
