"""From (texts, images) to Qwen2-VL model inputs ("features"), as HF's processor does.

Images go through transformers' `Qwen2VLImageProcessorPil` (resize to multiples of
`patch_size * merge_size` within [min_pixels, max_pixels], normalise, flatten patches).
`Qwen2_5_VLProcessor` needs torchvision, so the `<|image_pad|>` expansion is done here:
each image's single placeholder becomes `prod(image_grid_thw[i]) / merge_size**2` tokens.

Prompts (the reference MetaEmbed templates; prefix "Query: " for queries, "" for
candidates; one vision block per image, images before the text):
  text:        <|im_start|>user\\n{prefix}{text}<|im_end|><|endoftext|>
  image:       <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{prefix}Describe the
               image.<|im_end|><|endoftext|>
  interleaved: as image, with {prefix}{text} in place of "Describe the image."

Image layouts, `image_layout=`:
  "packed" (HF's, the default): `pixel_values [P, D]` = every image of the batch, in order;
      `image_grid_thw [N, 3]`.
  "per_example": `pixel_values [B, P_ex, D]` = each example's own patches then zero rows;
      `image_grid_thw [B, N_ex, 3]` = each example's images then zero rows. The batch is the
      leading axis of every array, so it shards over devices and processes like `input_ids`.

Static shapes: `input_ids` is left-padded to the smallest of `length_buckets` that fits; the
patch axis (P, or P_ex) is padded with zero rows to the smallest of `patch_buckets` that fits;
the image axis (N, or N_ex) is padded with zero rows to `max_images` rows. An input longer than
the largest bucket (or `max_length`) has its text truncated from the end (`truncation="text"`,
the default; image and template tokens are never cut) or raises (`truncation="error"`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from metaembed_jax.models.processing import (
    CANDIDATE_PREFIX,
    DEFAULT_LENGTH_BUCKETS,
    IMAGE_INSTRUCTION,
    QUERY_PREFIX,
    as_image_list,
    load_tokenizer,
    smallest_fitting,
)
from metaembed_jax.models.qwen2_vl.config import (
    IM_END,
    IM_START,
    IMAGE_PAD,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VISION_END,
    VISION_START,
)

SIDES = ("query", "candidate")
IMAGE_LAYOUTS = ("packed", "per_example")
_IMAGE_KEYS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses a longer side over 200 x the shorter


class QwenVLProcessor:
    """Texts + images -> left-padded, bucketed Qwen2-VL features (numpy).

    Args:
      tokenizer: a transformers tokenizer holding the Qwen special tokens.
      image_processor: a `Qwen2VLImageProcessorPil`; built from `min_pixels`/`max_pixels` if None.
      min_pixels, max_pixels: image area bounds (pixels) for the resize; None keeps the
        image processor's values (HF default 56*56 and 28*28*1280).
      length_buckets: allowed sequence lengths L; None pads to the batch's longest row.
      max_length: longest allowed row; default max(length_buckets) (None if no buckets: no limit).
      truncation: "text" (cut the end of the user text of a too-long row) or "error" (raise).
      patch_buckets: allowed sizes of the patch axis (P of the batch, or P_ex per example);
        None = no padding (per example: the largest example's count).
      max_images: pad the image axis of `image_grid_thw` (N of the batch, or N_ex per example)
        to this many rows (and always emit both image arrays, zero-sized/all-zero for text-only
        batches, so the batch structure is static); None = no padding (per example: the most
        images of any example), and text-only batches omit the image arrays.
      image_layout: "packed" (HF's) or "per_example" (see the module docstring).
      query_prefix, candidate_prefix, image_instruction: the prompt template pieces.
    """

    def __init__(
        self,
        tokenizer,
        image_processor: Qwen2VLImageProcessorPil | None = None,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
        max_length: int | None = None,
        truncation: str = "text",
        patch_buckets: Sequence[int] | None = None,
        max_images: int | None = None,
        query_prefix: str = QUERY_PREFIX,
        candidate_prefix: str = CANDIDATE_PREFIX,
        image_instruction: str = IMAGE_INSTRUCTION,
        image_layout: str = "packed",
    ):
        if image_layout not in IMAGE_LAYOUTS:
            raise ValueError(f"image_layout must be one of {IMAGE_LAYOUTS}, got {image_layout!r}")
        if truncation not in ("text", "error"):
            raise ValueError(f"truncation must be 'text' or 'error', got {truncation!r}")
        for name, buckets in (("length_buckets", length_buckets), ("patch_buckets", patch_buckets)):
            if buckets is not None and (not buckets or min(buckets) <= 0):
                raise ValueError(f"{name} must be None or positive sizes, got {buckets!r}")
        if max_images is not None and max_images <= 0:
            raise ValueError(f"max_images must be None or > 0, got {max_images}")
        if image_processor is None:
            image_processor = Qwen2VLImageProcessorPil()
        if min_pixels is not None or max_pixels is not None:
            image_processor = _with_pixel_bounds(image_processor, min_pixels, max_pixels)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.length_buckets = tuple(sorted(length_buckets)) if length_buckets else None
        if max_length is None and self.length_buckets:
            max_length = self.length_buckets[-1]
        self.max_length = max_length
        self.truncation = truncation
        self.patch_buckets = tuple(sorted(patch_buckets)) if patch_buckets else None
        self.max_images = max_images
        self.image_layout = image_layout
        self.prefixes = {"query": query_prefix, "candidate": candidate_prefix}
        self.image_instruction = image_instruction
        self.merge_size = int(image_processor.merge_size)
        self.patch_dim = 3 * image_processor.temporal_patch_size * image_processor.patch_size**2
        self.pad_token_id = _single_token_id(tokenizer, PAD_TOKEN)
        self.image_token_id = _single_token_id(tokenizer, IMAGE_PAD)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, min_pixels=None, max_pixels=None, **options
    ) -> QwenVLProcessor:
        """Loads the tokenizer (offline) and the image settings of a checkpoint/tokenizer dir.

        `preprocessor_config.json` (if present) gives patch/merge sizes, mean/std and pixel
        bounds; `min_pixels`/`max_pixels` override them. Other keyword options go to `__init__`,
        except `patch_size`, `temporal_patch_size` and `merge_size`, which override the image
        processor's (for tiny test models).

        Raises:
          FileNotFoundError: no tokenizer files in `path`.
        """
        image_kwargs = _read_image_config(path)
        for key in _IMAGE_KEYS:
            value = options.pop(key, None)
            if value is not None:
                image_kwargs[key] = value
        # The pixel bounds go to __init__, not to the image processor: arguments win.
        config_min, config_max = (
            image_kwargs.pop("min_pixels", None),
            image_kwargs.pop("max_pixels", None),
        )
        min_pixels = config_min if min_pixels is None else min_pixels
        max_pixels = config_max if max_pixels is None else max_pixels
        image_processor = Qwen2VLImageProcessorPil(**image_kwargs)
        return cls(
            load_tokenizer(path, SPECIAL_TOKENS),
            image_processor,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            **options,
        )

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer files and an HF-style `preprocessor_config.json` to `path`."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(os.fspath(path))
        size = self.image_processor.size
        config = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": int(size.shortest_edge),
            "max_pixels": int(size.longest_edge),
            "patch_size": int(self.image_processor.patch_size),
            "temporal_patch_size": int(self.image_processor.temporal_patch_size),
            "merge_size": self.merge_size,
            "image_mean": list(self.image_processor.image_mean),
            "image_std": list(self.image_processor.image_std),
        }
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(config, f, indent=2)

    # ----------------------------------------------------------------------------- prompts

    def build_prompt(self, text: str, num_images: int, side: str) -> tuple[str, tuple[int, int]]:
        """Template for one row: (prompt with one `<|image_pad|>` per image, text char span).

        The span locates `{text}` (not the prefix) in the prompt: truncation only cuts there.
        """
        prefix = self.prefixes[side]
        head = f"{IM_START}user\n" + f"{VISION_START}{IMAGE_PAD}{VISION_END}" * num_images
        if not text and num_images:
            text = self.image_instruction
        start = len(head) + len(prefix)
        return f"{head}{prefix}{text}{IM_END}{PAD_TOKEN}", (start, start + len(text))

    # ----------------------------------------------------------------------------- main call

    def __call__(
        self,
        texts: Sequence[str],
        images: Sequence | None = None,
        side: str = "query",
        row_ids: Sequence | None = None,
    ) -> dict[str, np.ndarray]:
        """Features for a batch.

        Args:
          texts: one string per example ("" when the example has only images).
          images: None, or one entry per example: a list of images (PIL, PNG/JPEG bytes, path or
            HWC uint8 array; may be empty), a single image, or None / b"".
          side: "query" (prefix "Query: ") or "candidate" (no prefix).
          row_ids: optional names of the rows, used in error messages (default: batch index).

        Returns:
          {"input_ids" int32 [B, L], "attention_mask" int32 [B, L]} plus, when the batch has an
          image or `max_images` is set, "pixel_values" float32 [P, C*T*ps*ps] and
          "image_grid_thw" int32 [N, 3] (per-example layout: [B, P_ex, C*T*ps*ps], [B, N_ex, 3]).

        Raises:
          ValueError: unknown side, length mismatch, an example with empty text and no image,
            too many images/patches for the buckets, a too-long row with truncation="error".
          BadRowError / FileNotFoundError: an image that cannot be decoded / found.
        """
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if images is not None and len(images) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(images)} image entries")
        if row_ids is None:
            row_ids = list(range(len(texts)))
        if not texts:
            raise ValueError("empty batch: expected at least one text")
        per_row = [
            as_image_list(None if images is None else images[i], row_ids[i])
            for i in range(len(texts))
        ]
        prompts, spans = [], []
        for i, text in enumerate(texts):
            text = "" if text is None else str(text)
            if not text.strip() and not per_row[i]:
                raise ValueError(f"row {row_ids[i]!r}: empty text and no image; nothing to embed")
            prompt, span = self.build_prompt(text.strip() and text, len(per_row[i]), side)
            prompts.append(prompt)
            spans.append(span)
        return self.encode_prompts(prompts, per_row, text_spans=spans, row_ids=row_ids)

    def encode_prompts(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Image.Image]],
        text_spans: Sequence[tuple[int, int]] | None = None,
        row_ids: Sequence | None = None,
    ) -> dict[str, np.ndarray]:
        """Lower level: prompts already templated, one `<|image_pad|>` per image of the row.

        Raises:
          ValueError: a row whose `<|image_pad|>` count differs from its number of images, or
            any other disagreement between image tokens and `image_grid_thw`.
        """
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
        row_ids = list(range(len(prompts))) if row_ids is None else row_ids
        flat_images = [image for row in images for image in row]
        pixel_values, grid = self.process_images(flat_images)
        tokens_per_image = self.num_image_tokens(grid).tolist()
        # offsets (to find the text to truncate) need a fast (Rust) tokenizer
        with_offsets = text_spans is not None and getattr(self.tokenizer, "is_fast", False)
        encoded = self.tokenizer(list(prompts), return_offsets_mapping=with_offsets)
        rows, image_index = [], 0
        for i, ids in enumerate(encoded["input_ids"]):
            num_images = len(images[i])
            found = sum(1 for t in ids if t == self.image_token_id)
            if found != num_images:
                raise ValueError(
                    f"row {row_ids[i]!r}: prompt has {found} {IMAGE_PAD} tokens but "
                    f"{num_images} images were given"
                )
            if with_offsets:
                offsets, span = encoded["offset_mapping"][i], text_spans[i]
            else:
                offsets, span = None, None
            counts = tokens_per_image[image_index : image_index + num_images]
            rows.append(self._fit_row(list(ids), offsets, span, counts, row_ids[i]))
            image_index += num_images
        features = self._pad_rows(rows)
        self._check_image_tokens(features["input_ids"], grid)
        if self.image_layout == "per_example":
            counts = [len(row_images) for row_images in images]
            return {**features, **self._per_example_images(pixel_values, grid, counts, row_ids)}
        return {**features, **self._pad_images(pixel_values, grid)}

    # ----------------------------------------------------------------------------- pieces

    @property
    def pixel_budget(self) -> int:
        """The most pixels one image is resized to (`max_pixels`)."""
        return int(self.image_processor.size.longest_edge)

    def fit_image(self, image: Image.Image) -> Image.Image:
        """`image` resized to the size the HF image processor gives it (`smart_resize`), so the
        processor then leaves it as it is (or, where that size is below `min_pixels`, as it is:
        see `fitted_size`); an image HF would resize beyond `max_pixels` (a side clamped to one
        merged patch) or refuse (aspect ratio over 200) gets the closest tile grid within the
        budget instead, its aspect ratio capped (`fitted_size`)."""
        size = self.image_processor.size
        height, width = fitted_size(
            image.height,
            image.width,
            int(self.image_processor.patch_size) * self.merge_size,
            int(size.shortest_edge),
            int(size.longest_edge),
        )
        if (height, width) == (image.height, image.width):
            return image
        return image.resize((width, height), resample=self.image_processor.resample)

    def process_images(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """HF image processing of a flat list (each image fitted first, see `fit_image`):
        (pixel_values [P, D] f32, grid [N, 3] int32)."""
        if not images:
            return np.zeros((0, self.patch_dim), np.float32), np.zeros((0, 3), np.int32)
        fitted = [self.fit_image(image) for image in images]
        out = self.image_processor(images=fitted, return_tensors="np")
        pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)
        return pixel_values, np.asarray(out["image_grid_thw"], dtype=np.int32)

    def num_image_tokens(self, image_grid_thw: np.ndarray) -> np.ndarray:
        """`<|image_pad|>` tokens per grid row (0 for zero padding rows)."""
        return np.prod(np.asarray(image_grid_thw), axis=-1) // self.merge_size**2

    def _fit_row(self, ids, offsets, span, counts, row) -> list[int]:
        """Truncates the row's text if the expanded row is too long, then expands image pads."""
        expanded_length = len(ids) + sum(c - 1 for c in counts)
        excess = 0 if self.max_length is None else expanded_length - self.max_length
        if excess > 0:
            if self.truncation == "error" or span is None:
                raise ValueError(
                    f"row {row!r}: {expanded_length} tokens exceed max_length={self.max_length} "
                    "(truncation='error'; raise max_length/length_buckets or shorten the text)"
                )
            removable = [
                k
                for k, (start, end) in enumerate(offsets)
                if start >= span[0] and end <= span[1] and ids[k] != self.image_token_id
            ]
            if len(removable) < excess:
                raise ValueError(
                    f"row {row!r}: {expanded_length} tokens exceed max_length={self.max_length} "
                    f"and only {len(removable)} text tokens can be cut (image tokens never are)"
                )
            drop = set(removable[len(removable) - excess :])
            ids = [t for k, t in enumerate(ids) if k not in drop]
        out, image_iter = [], iter(counts)
        for token in ids:
            out.extend([token] * next(image_iter) if token == self.image_token_id else [token])
        return out

    def _pad_rows(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        longest = max(len(r) for r in rows)
        length = longest
        if self.length_buckets:
            length = smallest_fitting(self.length_buckets, longest)
            if length is None:  # max_length above the largest bucket: pad to max_length
                length = longest
        input_ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        attention_mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            if row:
                input_ids[i, length - len(row) :] = row
                attention_mask[i, length - len(row) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _pad_images(self, pixel_values: np.ndarray, grid: np.ndarray) -> dict[str, np.ndarray]:
        if len(grid) == 0 and self.max_images is None:
            return {}
        if self.max_images is not None:
            if len(grid) > self.max_images:
                raise ValueError(
                    f"batch has {len(grid)} images, more than max_images={self.max_images}"
                )
            grid = np.concatenate([grid, np.zeros((self.max_images - len(grid), 3), np.int32)])
        num_patches = pixel_values.shape[0]
        if self.patch_buckets:
            target = smallest_fitting(self.patch_buckets, num_patches)
            if target is None:
                raise ValueError(
                    f"batch has {num_patches} image patches, more than the largest patch bucket "
                    f"{self.patch_buckets[-1]}; raise patch_buckets or lower max_pixels"
                )
            padding = np.zeros((target - num_patches, pixel_values.shape[1]), np.float32)
            pixel_values = np.concatenate([pixel_values, padding])
        return {"pixel_values": pixel_values, "image_grid_thw": grid.astype(np.int32)}

    def _per_example_images(self, pixel_values, grid, counts, row_ids) -> dict[str, np.ndarray]:
        """The batch's packed images regrouped per example: [B, P_ex, D] and [B, N_ex, 3]."""
        if len(grid) == 0 and self.max_images is None:
            return {}
        patches = np.prod(grid, axis=-1) if len(grid) else np.zeros(0, np.int64)
        image_ends = np.cumsum(counts)
        patch_ends = np.concatenate([[0], np.cumsum(patches)])[image_ends]
        patch_starts = np.concatenate([[0], patch_ends[:-1]])
        per_example = patch_ends - patch_starts
        most = int(per_example.max())
        num_images = max(counts) if self.max_images is None else self.max_images
        rows = most
        if self.patch_buckets:
            rows = smallest_fitting(self.patch_buckets, most)
            if rows is None:
                row = row_ids[int(np.argmax(per_example))]
                raise ValueError(
                    f"row {row!r} has {most} image patches, more than the largest patch bucket "
                    f"{self.patch_buckets[-1]} (per example); raise patch_buckets or lower "
                    "max_pixels"
                )
        out_pixels = np.zeros((len(counts), rows, pixel_values.shape[1]), np.float32)
        out_grid = np.zeros((len(counts), num_images, 3), np.int32)
        for b, count in enumerate(counts):
            if count > num_images:
                raise ValueError(
                    f"row {row_ids[b]!r} has {count} images, more than max_images={num_images}"
                )
            first = image_ends[b] - count
            out_grid[b, :count] = grid[first : first + count]
            out_pixels[b, : per_example[b]] = pixel_values[patch_starts[b] : patch_ends[b]]
        return {"pixel_values": out_pixels, "image_grid_thw": out_grid}

    def _check_image_tokens(self, input_ids: np.ndarray, grid: np.ndarray) -> None:
        found = int(np.sum(input_ids == self.image_token_id))
        expected = int(np.sum(self.num_image_tokens(grid)))
        if found != expected:
            raise ValueError(
                f"input_ids hold {found} {IMAGE_PAD} tokens but image_grid_thw {grid.tolist()} "
                f"needs {expected} (prod(grid) / merge_size**2 per image)"
            )


def fitted_size(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(height, width) to resize an image to before the HF image processor sees it, so that
    what the processor makes of it fits `max_pixels` and is never refused.

    Where transformers' `smart_resize` (sides multiples of `factor`, area in [min_pixels,
    max_pixels], aspect ratio kept as closely as it can) gives a size within those bounds, that
    size (the processor then leaves the image as it is). Where its size fits `max_pixels` but
    falls below `min_pixels` (its downscaling floors both sides when the bounds are close), the
    image's own size: the processor, given the image as it is, makes what it would make
    anyway, while an image resized to that size first would be scaled up again, past
    `max_pixels`. Where its size exceeds `max_pixels` (a side clamped to one `factor`) or it
    refuses the image (an aspect ratio over 200): the grid of `factor`-sized tiles within the
    bounds whose aspect ratio is closest to the image's (at most `MAX_ASPECT_RATIO`), the image
    squeezed.

    Raises ValueError when `max_pixels` is below one `factor` x `factor` tile.
    """
    most = max_pixels // factor**2
    if most < 1:
        raise ValueError(f"max_pixels={max_pixels} is below one {factor}x{factor} merged patch")
    height, width = max(1, int(height)), max(1, int(width))
    if max(height, width) / min(height, width) <= MAX_ASPECT_RATIO:
        fitted = smart_resize(height, width, factor, min_pixels, max_pixels)
        area = fitted[0] * fitted[1]
        if area <= max_pixels and max(fitted) / min(fitted) <= MAX_ASPECT_RATIO:
            return fitted if area >= min_pixels else (height, width)
    fewest = min(most, max(1, -(-min_pixels // factor**2)))
    aspect = math.log(width / height)
    best = None
    for rows in range(1, most + 1):  # tiles down; columns: the closest to the aspect ratio
        low, high = -(-fewest // rows), most // rows
        if low > high:
            continue
        columns = round(rows * width / height)
        columns = min(max(columns, -(-rows // MAX_ASPECT_RATIO)), rows * MAX_ASPECT_RATIO)
        columns = min(max(columns, low), high)
        if max(rows, columns) / min(rows, columns) > MAX_ASPECT_RATIO:
            continue
        score = (abs(math.log(columns / rows) - aspect), -rows * columns)
        if best is None or score < best[0]:
            best = (score, rows, columns)
    if best is None:  # no grid within the bounds and the aspect limit: one tile
        return factor, factor
    return best[1] * factor, best[2] * factor


def _single_token_id(tokenizer, token: str) -> int:
    encoded = tokenizer.encode(token, add_special_tokens=False)
    if len(encoded) != 1:
        raise ValueError(
            f"tokenizer does not encode {token!r} as one special token (got {encoded}); "
            "use a Qwen2-VL tokenizer (see metaembed_jax.data.tokenizer)"
        )
    return int(encoded[0])


def _with_pixel_bounds(image_processor, min_pixels, max_pixels) -> Qwen2VLImageProcessorPil:
    size = image_processor.size
    min_pixels = int(size.shortest_edge) if min_pixels is None else int(min_pixels)
    max_pixels = int(size.longest_edge) if max_pixels is None else int(max_pixels)
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    kwargs = {key: getattr(image_processor, key) for key in _IMAGE_KEYS}
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **kwargs)


def _read_image_config(path) -> dict:
    """Image settings from `preprocessor_config.json` (either HF spelling of the pixel bounds)."""
    config_path = os.path.join(os.fspath(path), "preprocessor_config.json")
    if not os.path.exists(config_path):
        return {}
    with open(config_path) as f:
        config = json.load(f)
    out = {key: config[key] for key in _IMAGE_KEYS if key in config}
    size = config.get("size") or {}
    min_pixels = config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    max_pixels = config.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    if min_pixels is not None:
        out["min_pixels"] = int(min_pixels)
    if max_pixels is not None:
        out["max_pixels"] = int(max_pixels)
    return out


def image_layout(data_config) -> str:
    """`config.data.image_layout` ("packed" for configs written before the field existed)."""
    layout = data_config.get("image_layout", "packed")
    if layout not in IMAGE_LAYOUTS:
        raise ValueError(f"config.data.image_layout={layout!r}: expected one of {IMAGE_LAYOUTS}")
    return layout


def make_processor(data_config, path: str | os.PathLike | None = None) -> QwenVLProcessor:
    """The family's processor factory: a QwenVLProcessor for the tokenizer / checkpoint dir `path`
    (default: the built-in tokenizer `<config.data.dir>/tokenizer`) with the image bounds, patch
    geometry, length buckets and image layout of `data_config`."""
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
