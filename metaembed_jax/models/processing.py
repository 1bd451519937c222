"""What every family's processor shares: the one image decoder, the image-list and bucket
helpers, and loading a tokenizer offline. The data pipeline and the builders use the decoder too.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# The reference's prompt pieces, shared by every family's template: the query prefix, the
# candidate prefix, and the instruction an image row without text carries.
QUERY_PREFIX = "Query: "
CANDIDATE_PREFIX = ""
IMAGE_INSTRUCTION = "Describe the image."
# Sequence lengths a processor left-pads to by default (the smallest that fits).
DEFAULT_LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


class BadRowError(ValueError):
    """A row (of an input file, a built split or a batch) cannot be turned into a record or into
    model inputs: an undecodable image, a missing column, an item with neither text nor image.
    The message names the file / split and the row."""


def open_image(data: Any, what: str) -> Image.Image:
    """The fully decoded PIL image (its own mode and format) of encoded bytes, a file path, a
    numpy HWC array or a PIL image.

    Raises:
      FileNotFoundError: a path that does not exist.
      BadRowError: bytes that do not decode as an image, an array that is not a uint8 [H, W(, C)]
        image, or an unsupported type (naming `what`).
    """
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, np.ndarray):
        return _array_image(data, what)
    if isinstance(data, (str, os.PathLike)):
        if not os.path.exists(data):
            raise FileNotFoundError(f"{what}: image file {os.fspath(data)!r} does not exist")
        data = Path(data).read_bytes()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRowError(f"{what}: expected image bytes, a path or a PIL image, got {type(data)}")
    try:
        image = Image.open(io.BytesIO(bytes(data)))
        image.load()  # decode now: a corrupt or truncated file fails here, with `what` named
    except Exception as error:  # PIL raises several types for corrupt data
        raise BadRowError(f"cannot decode {what} ({len(data)} bytes): {error}") from error
    return image


def _array_image(array: np.ndarray, what: str) -> Image.Image:
    """A PIL image of a uint8 [H, W] or [H, W, C] (C = 1, 3, 4) array; BadRowError otherwise
    (PIL takes other arrays too, as 1-row or float images that are not what was meant)."""
    channels_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))
    if array.dtype != np.uint8 or not channels_ok or 0 in array.shape:
        raise BadRowError(
            f"{what}: a numpy image must be a uint8 array of shape [H, W] or [H, W, C] with C = "
            f"1, 3 or 4, got {array.dtype} {array.shape}"
        )
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def decode_image(data: Any, what: str = "image") -> Image.Image:
    """An RGB PIL image from PNG/JPEG bytes, a file path, a numpy HWC array or a PIL image: the
    one image decoder of the data side (builders, input pipeline, processors, evaluation).

    Raises FileNotFoundError for a missing file and BadRowError naming `what` for bytes that do
    not decode.
    """
    image = open_image(data, what)
    # convert() copies even RGB -> RGB; the decoded image is already independent of the file.
    return image if image.mode == "RGB" else image.convert("RGB")


def is_empty_image(data: Any) -> bool:
    """None and empty bytes / strings (what the builders store for a text-only item): no image."""
    return data is None or (isinstance(data, (bytes, bytearray, str)) and len(data) == 0)


def as_image_list(entry, row) -> list[Image.Image]:
    """One example's images (an entry, a list of entries, or none) as RGB PIL images."""
    if is_empty_image(entry):
        return []
    if isinstance(entry, (list, tuple)):
        return [
            decode_image(item, f"row {row!r}: image") for item in entry if not is_empty_image(item)
        ]
    return [decode_image(entry, f"row {row!r}: image")]


def smallest_fitting(buckets: Sequence[int] | None, size: int) -> int | None:
    """Smallest bucket >= size; None when no bucket fits (or there are no buckets)."""
    for bucket in sorted(buckets or ()):
        if bucket >= size:
            return bucket
    return None


def load_tokenizer(
    path: str | os.PathLike, special_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Loads a tokenizer directory offline (`AutoTokenizer`), checking that each of
    `special_tokens` (the family's) is one known token.

    Raises:
      FileNotFoundError: if `path` holds no tokenizer files.
      ValueError: if one of `special_tokens` is not a single known token.
    """
    path = os.fspath(path)
    if not os.path.isdir(path) or not any(
        os.path.exists(os.path.join(path, name))
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json, ...) in {path!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    for token in special_tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        token_id = tokenizer.convert_tokens_to_ids(token)
        if len(encoded) != 1 or token_id is None or encoded[0] != token_id:
            raise ValueError(
                f"tokenizer in {path!r} has no single special token {token!r} (encodes to "
                f"{encoded}); expected a tokenizer of the configured backbone family (a built-in "
                "tokenizer built for another family lacks its tokens: use another data.dir)"
            )
    return tokenizer
