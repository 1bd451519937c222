"""From (texts, images) to PaliGemma model inputs, laid out as transformers' PaliGemmaProcessor.

Row layout (PaliGemmaProcessor: image tokens, then `<bos>`, then the prompt, then "\\n"):
  `<image>` x (image_seq_length per image) `<bos>` {prefix}{text} `\\n`
with prefix "Query: " for queries and "" for candidates (the project's templates), and the
text "Describe the image." for an image without text. Images go through transformers'
`SiglipImageProcessorPil` (resize to image_size x image_size, rescale, normalise; no torchvision).
Rows are left-padded with `<pad>` to the smallest length bucket that fits; a too-long row loses
text tokens from the end of its text (never image or template tokens) or raises.

Image layouts (`image_layout`): "per_example" (default) `pixel_values [B, max_images, C, H, W]`,
each row's images then all-zero images; "packed" (transformers') `[N, C, H, W]`, every image of
the batch in order, zero images appended up to `max_images` per row. The model reads as many
images per row as its `<image>` tokens say, so padding images are never used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from transformers import SiglipImageProcessorPil

from metaembed_jax.models.paligemma.config import (
    BOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
)
from metaembed_jax.models.processing import (
    CANDIDATE_PREFIX,
    DEFAULT_LENGTH_BUCKETS,
    IMAGE_INSTRUCTION,
    QUERY_PREFIX,
    as_image_list,
    load_tokenizer,
    smallest_fitting,
)

FEATURE_KEYS = ("input_ids", "attention_mask", "pixel_values")
SIDES = ("query", "candidate")
IMAGE_LAYOUTS = ("per_example", "packed")
DEFAULT_IMAGE_SIZE = 224

__all__ = ["FEATURE_KEYS", "SPECIAL_TOKENS", "PaliGemmaInputProcessor", "make_processor"]


def _token_id(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"tokenizer does not encode {token!r} as one token (got {ids}); use a PaliGemma / "
            "Gemma tokenizer or the built-in one made for this family"
        )
    return int(ids[0])


class PaliGemmaInputProcessor:
    """Texts + images -> left-padded, bucketed PaliGemma features (numpy).

    Args:
      tokenizer: the checkpoint's tokenizer (holding `<bos>`, `<pad>` and `<image>`).
      image_size: side of the square images the vision tower takes (its config's image_size).
      image_processor: a `SiglipImageProcessorPil`; built for `image_size` if None.
      length_buckets / max_length / truncation: as the Qwen processor ("text" or "error").
      max_images: images per row the image axis is padded to (None: the most in the batch).
      image_layout: "per_example" or "packed" (module docstring).
      query_prefix, candidate_prefix, image_instruction: the prompt template pieces.
    """

    def __init__(
        self,
        tokenizer,
        image_size: int = DEFAULT_IMAGE_SIZE,
        image_processor: SiglipImageProcessorPil | None = None,
        *,
        length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
        max_length: int | None = None,
        truncation: str = "text",
        max_images: int | None = None,
        image_layout: str = "per_example",
        query_prefix: str = QUERY_PREFIX,
        candidate_prefix: str = CANDIDATE_PREFIX,
        image_instruction: str = IMAGE_INSTRUCTION,
    ):
        if image_layout not in IMAGE_LAYOUTS:
            raise ValueError(f"image_layout must be one of {IMAGE_LAYOUTS}, got {image_layout!r}")
        if truncation not in ("text", "error"):
            raise ValueError(f"truncation must be 'text' or 'error', got {truncation!r}")
        if image_processor is None:
            size = {"height": image_size, "width": image_size}
            image_processor = SiglipImageProcessorPil(size=size)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_size = int(image_size)
        # One token per 14x14 patch (PaliGemma's `image_seq_length`); the patch size is SigLIP's.
        self.patch_size = 14
        self.image_seq_length = (self.image_size // self.patch_size) ** 2
        self.length_buckets = tuple(sorted(length_buckets)) if length_buckets else None
        if max_length is None and self.length_buckets:
            max_length = self.length_buckets[-1]
        self.max_length = max_length
        self.truncation = truncation
        self.max_images = max_images
        self.image_layout = image_layout
        self.prefixes = {"query": query_prefix, "candidate": candidate_prefix}
        self.image_instruction = image_instruction
        self.pad_token_id = _token_id(tokenizer, PAD_TOKEN)
        self.image_token_id = _token_id(tokenizer, IMAGE_TOKEN)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer and a `preprocessor_config.json` (image size, seq length)."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(os.fspath(path))
        config = {
            "image_processor_type": "SiglipImageProcessor",
            "size": {"height": self.image_size, "width": self.image_size},
            "image_seq_length": self.image_seq_length,
            "image_mean": list(self.image_processor.image_mean),
            "image_std": list(self.image_processor.image_std),
        }
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(config, f, indent=2)

    def build_prompt(self, text: str, num_images: int, side: str) -> tuple[str, tuple[int, int]]:
        """One row's prompt and the char span of `{text}` in it (truncation cuts only there)."""
        head = IMAGE_TOKEN * (self.image_seq_length * num_images) + BOS_TOKEN + self.prefixes[side]
        if not text and num_images:
            text = self.image_instruction
        return f"{head}{text}\n", (len(head), len(head) + len(text))

    def __call__(self, texts, images=None, *, side: str = "query", row_ids=None):
        """Features `{"input_ids", "attention_mask"}` int32 `[B, L]` plus `pixel_values`
        float32 (layout: module docstring) when the batch has an image or `max_images` is set.

        Raises ValueError for an unknown side, mismatched lengths, a row with neither text nor
        image, too many images, or a too-long row with truncation="error"."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if not texts:
            raise ValueError("empty batch: expected at least one text")
        if images is not None and len(images) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(images)} image entries")
        row_ids = list(range(len(texts))) if row_ids is None else list(row_ids)
        per_row = [
            as_image_list(None if images is None else images[i], row_ids[i])
            for i in range(len(texts))
        ]
        rows = []
        for i, text in enumerate(texts):
            text = "" if text is None else str(text)
            if not text.strip() and not per_row[i]:
                raise ValueError(f"row {row_ids[i]!r}: empty text and no image; nothing to embed")
            prompt, span = self.build_prompt(text.strip() and text, len(per_row[i]), side)
            rows.append(self._encode_row(prompt, span, row_ids[i]))
        features = self._pad_rows(rows)
        features.update(self._images(per_row, row_ids))
        return features

    def _encode_row(self, prompt: str, span: tuple[int, int], row) -> list[int]:
        encoded = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        excess = 0 if self.max_length is None else len(ids) - self.max_length
        if excess <= 0:
            return ids
        cuttable = [
            k
            for k, (start, end) in enumerate(encoded["offset_mapping"])
            if start >= span[0] and end <= span[1] and ids[k] != self.image_token_id
        ]
        if self.truncation == "error" or len(cuttable) < excess:
            raise ValueError(
                f"row {row!r}: {len(ids)} tokens exceed max_length={self.max_length} and "
                f"{len(cuttable)} text tokens can be cut (truncation={self.truncation!r})"
            )
        drop = set(cuttable[len(cuttable) - excess :])
        return [t for k, t in enumerate(ids) if k not in drop]

    def _pad_rows(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        longest = max(len(r) for r in rows)
        length = smallest_fitting(self.length_buckets, longest) or longest
        input_ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        attention_mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            input_ids[i, length - len(row) :] = row
            attention_mask[i, length - len(row) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @property
    def pixel_budget(self) -> int:
        """The pixels of every image once resized: one `image_size` square."""
        return self.image_size**2

    def fit_image(self, image: Image.Image) -> Image.Image:
        """`image` resized to the square the SigLIP processor resizes every image to, with its
        resampling, so that the processor then leaves it as it is."""
        side = self.image_size
        if image.size == (side, side):
            return image
        return image.resize((side, side), resample=self.image_processor.resample)

    def process_images(self, images: Sequence[Any]) -> np.ndarray:
        """SigLIP processing of a flat list of PIL images: `[N, 3, S, S]` float32."""
        if not images:
            return np.zeros((0, 3, self.image_size, self.image_size), np.float32)
        out = self.image_processor(images=list(images), return_tensors="np")
        return np.asarray(out["pixel_values"], np.float32)

    def _images(self, per_row: list[list[Any]], row_ids) -> dict[str, np.ndarray]:
        counts = [len(row) for row in per_row]
        if not any(counts) and self.max_images is None:
            return {}
        slots = max(counts) if self.max_images is None else self.max_images
        for row, count in zip(row_ids, counts, strict=True):
            if count > slots:
                raise ValueError(f"row {row!r} has {count} images, more than max_images={slots}")
        pixels = self.process_images([image for row in per_row for image in row])
        shape = (3, self.image_size, self.image_size)
        if self.image_layout == "packed":
            padded = np.zeros((len(per_row) * slots, *shape), np.float32)
            padded[: len(pixels)] = pixels
            return {"pixel_values": padded}
        padded = np.zeros((len(per_row), slots, *shape), np.float32)
        start = 0
        for b, count in enumerate(counts):
            padded[b, :count] = pixels[start : start + count]
            start += count
        return {"pixel_values": padded}


def _image_size(path, data_config) -> int:
    """The square image side: `preprocessor_config.json` of `path` (a checkpoint's), else
    `sqrt(data_config.max_pixels)` (PaliGemma resizes every image to one square size, so the
    pixel budget names it: the demo's 56 * 56 -> 56 px)."""
    config_file = (
        None if path is None else os.path.join(os.fspath(path), "preprocessor_config.json")
    )
    if config_file and os.path.exists(config_file):
        with open(config_file) as f:
            size = json.load(f).get("size") or {}
        if "height" in size:
            return int(size["height"])
    side = math.isqrt(int(data_config.max_pixels))
    if side < 14:
        raise ValueError(
            f"config.data.max_pixels={data_config.max_pixels} is below one 14 px patch"
        )
    return side


def make_processor(data_config, path: str | os.PathLike | None = None) -> PaliGemmaInputProcessor:
    """The family's processor for `data_config` (length buckets, max_images, image layout) and
    the tokenizer at `path` (default: the built-in tokenizer `<data_config.dir>/tokenizer`).

    Raises FileNotFoundError when there are no tokenizer files."""
    path = os.path.join(data_config.dir, "tokenizer") if path is None else path
    return PaliGemmaInputProcessor(
        load_tokenizer(path, SPECIAL_TOKENS),
        _image_size(path, data_config),
        length_buckets=data_config.length_buckets,
        max_images=int(data_config.max_images) or None,
        image_layout=data_config.image_layout,
    )


def static_shapes(data_config, batch_size: int, *, multiple: int = 1, same_shapes: bool = False):
    """A callable that gives one side's features the family's static image shapes: always a
    `pixel_values` of `[B, max_images, 3, S, S]` (per example) or `[round_up(B * max_images,
    multiple), 3, S, S]` (packed), zeros where there is no image. Images have one fixed size, so
    `same_shapes` changes nothing here (lengths are bucketed by the pipeline)."""
    del same_shapes
    max_images = int(data_config.max_images)
    layout = data_config.image_layout

    def pad(features: dict[str, Any]) -> dict[str, Any]:
        if max_images == 0:
            if "pixel_values" in features:
                raise ValueError("a batch has images but config.data.max_images=0")
            return features
        batch = len(features["input_ids"])
        pixels = features.get("pixel_values")
        size = _image_size(None, data_config) if pixels is None else pixels.shape[-1]
        if layout == "packed":
            rows = -(-batch_size * max_images // multiple) * multiple
            target = (rows, 3, size, size)
        else:
            target = (batch, max_images, 3, size, size)
        out = np.zeros(target, np.float32)
        if pixels is not None:
            if pixels.shape[0] > target[0] or (layout != "packed" and pixels.shape[1] > max_images):
                raise ValueError(
                    f"pixel_values {pixels.shape} exceed the static shape {target} "
                    "(config.data.max_images)"
                )
            out[tuple(slice(0, n) for n in pixels.shape)] = pixels
        return {**features, "pixel_values": out}

    return pad
