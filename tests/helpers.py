"""Test scaffolding shared by several test files (not part of the package): a tiny run config,
random Qwen2-VL batches, a small tokenizer, record / feature helpers.

Token ids follow the built-in tokenizer's layout for the Qwen2-VL family (special tokens first:
0 = pad, 3 = vision_start, 4 = vision_end, 6 = image_pad), so `qwen2_vl.tiny_config` fits both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from metaembed_jax.data.tokenizer import train_tokenizer
from metaembed_jax.models import qwen2_vl
from metaembed_jax.models.family import BackboneFamily, register_family
from metaembed_jax.models.processing import BadRowError, decode_image, is_empty_image
from metaembed_jax.models.qwen2_vl import config as tokens
from metaembed_jax.models.qwen2_vl.config import (
    IMAGE_PAD_ID,
    MERGE,
    PAD_ID,
    PATCH_SIZE,
    SPECIAL_TOKENS,
    TEMPORAL_PATCH,
    VISION_END_ID,
    VISION_START_ID,
)
from metaembed_jax.training.config import base_config

RECORD_FIELDS = (
    "query_text",
    "query_image",
    "positive_text",
    "positive_image",
    "negative_text",
    "negative_image",
    "task",
    "query_id",
    "positive_id",
    "negative_id",
)


def tiny_run_config(r_q: int = 16, r_c: int = 64, **hf_kwargs) -> ConfigDict:
    """The base config with a tiny random Qwen2.5-VL, float32, short schedule, small batch."""
    config = base_config()
    config.model.hf_config = ConfigDict(qwen2_vl.tiny_config(**hf_kwargs))
    config.model.num_query_tokens = r_q
    config.model.num_candidate_tokens = r_c
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 2
    config.train.steps = 4
    config.train.batch_size = 8
    config.train.log_every = 1
    config.train.progress_bar = False
    config.checkpoint.every = 2
    config.checkpoint.async_save = False
    config.lora.rank = 4
    config.lora.alpha = 8.0
    config.lora.dropout = 0.0
    return config


def _not_for_loading(*args, **kwargs):
    raise NotImplementedError("a loader-test family has no processor, shapes or tiny config")


def register_loader_family(name: str, build, rules, key_aliases=()) -> BackboneFamily:
    """Registers a family that only `load_hf` / `from_config` use (model type = `name`)."""
    return register_family(
        BackboneFamily(
            name=name,
            model_types=(name,),
            build=build,
            rules=rules,
            feature_keys=(),
            make_processor=_not_for_loading,
            static_shapes=_not_for_loading,
            tiny_config=_not_for_loading,
            key_aliases=tuple(key_aliases),
        )
    )


# ----------------------------------------------------------------------------- random batches


def random_side(
    rng: np.random.Generator,
    batch: int,
    length: int,
    vocab: int,
    image_every: int = 0,
    grid: tuple[int, int, int] = (1, 4, 4),
) -> dict:
    """Left-padded random features; every `image_every`-th example (0 = none) has one image."""
    input_ids = np.full((batch, length), PAD_ID, np.int32)
    mask = np.zeros((batch, length), np.int32)
    image_tokens = grid[0] * grid[1] * grid[2] // MERGE**2
    grids = []
    for b in range(batch):
        has_image = image_every and b % image_every == 0
        n_text = int(rng.integers(3, length - (image_tokens + 2 if has_image else 0) + 1))
        tokens = list(rng.integers(8, vocab, n_text))
        if has_image:
            tokens = [VISION_START_ID] + [IMAGE_PAD_ID] * image_tokens + [VISION_END_ID] + tokens
            grids.append(grid)
        tokens = tokens[:length]
        input_ids[b, length - len(tokens) :] = tokens
        mask[b, length - len(tokens) :] = 1
    features = {"input_ids": input_ids, "attention_mask": mask}
    if grids:
        patches = sum(t * h * w for t, h, w in grids)
        dim = 3 * TEMPORAL_PATCH * PATCH_SIZE**2
        features["pixel_values"] = rng.normal(size=(patches, dim)).astype(np.float32)
        # One grid row per example, as the pipeline emits: trailing all-zero rows = no image.
        grid_rows = np.zeros((batch, 3), np.int32)
        grid_rows[: len(grids)] = grids
        features["image_grid_thw"] = grid_rows
    return features


def random_batch(
    seed: int,
    batch: int = 8,
    length: int = 16,
    vocab: int = 96,
    negatives: bool = True,
    image_every: int = 0,
) -> dict:
    """A training batch {"query", "positive", "negative"?} of random features."""
    rng = np.random.default_rng(seed)
    out = {
        "query": random_side(rng, batch, length, vocab),
        "positive": random_side(rng, batch, length, vocab, image_every=image_every),
    }
    if negatives:
        out["negative"] = random_side(rng, batch, length, vocab, image_every=image_every)
    return out


class RandomBatches:
    """Deterministic iterator of random batches with the pipeline's get_state / set_state."""

    def __init__(self, seed: int = 0, **batch_kwargs):
        self.seed, self.index, self.batch_kwargs = seed, 0, batch_kwargs

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = random_batch(self.seed + self.index, **self.batch_kwargs)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


# ----------------------------------------------------------------------------- tokenizer

# Fixed text: covers the template words and common captions.
TEST_CORPUS = (
    "Query: a large red circle at the top left and a small blue square in the center.",
    "Describe the image. A small green triangle at the bottom right.",
    "make the yellow star purple. move the black cross to the top. remove the orange diamond.",
    "What was the revenue of Valoria in 2019? Founded in 1987. Staff 420. Profit Year Table",
    "The quick brown fox jumps over the lazy dog 0123456789, with the word cat.",
)


def build_test_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 320):
    """A tiny Qwen2-VL-family tokenizer trained on a fixed corpus, saved to `out_dir`, returned."""
    return train_tokenizer(TEST_CORPUS * 4, out_dir, SPECIAL_TOKENS, vocab_size=vocab_size)


# ----------------------------------------------------------------------------- records, features

# config.json field -> special token, for a model config that fits a tokenizer.
_CONFIG_FIELDS = {
    "pad_token_id": tokens.PAD_TOKEN,
    "bos_token_id": tokens.PAD_TOKEN,  # Qwen2-VL configs use <|endoftext|> as bos as well
    "eos_token_id": tokens.IM_END,
    "im_start_token_id": tokens.IM_START,
    "vision_start_token_id": tokens.VISION_START,
    "vision_end_token_id": tokens.VISION_END,
    "image_token_id": tokens.IMAGE_PAD,
    "video_token_id": tokens.VIDEO_PAD,
}


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the special tokens a Qwen2-VL model config needs, by config field name.

    Raises:
      ValueError: if a token is missing from the vocabulary or not a single token.
    """
    ids = {}
    for field, token in _CONFIG_FIELDS.items():
        encoded = tokenizer.encode(token, add_special_tokens=False)
        token_id = tokenizer.convert_tokens_to_ids(token)
        if len(encoded) != 1 or token_id is None or encoded[0] != token_id:
            raise ValueError(
                f"tokenizer has no single special token {token!r} (encodes to {encoded}); "
                "a Qwen2-VL tokenizer with the vision special tokens is expected"
            )
        ids[field] = int(token_id)
    return ids


def load_image(data: Any):
    """An RGB PIL image, or None for "no image" (None, b"")."""
    return None if is_empty_image(data) else decode_image(data)


def process_records(processor, records: Sequence[dict], side_key: str) -> dict[str, np.ndarray]:
    """Features for one side ("query" / "positive" / "negative") of training records.

    Uses `{side_key}_text`, `{side_key}_image` (PNG bytes, b"" when absent) and names rows by
    `query_id` in errors; "query" is encoded as a query, the others as candidates.
    """
    texts, images, ids = [], [], []
    for i, record in enumerate(records):
        text, image = _record_side(record, side_key, i)
        texts.append(text)
        images.append(image)
        ids.append(record.get("query_id", i))
    side = "query" if side_key == "query" else "candidate"
    return processor(texts, images, side=side, row_ids=ids)


def _record_side(record: dict, side_key: str, index) -> tuple[str, list]:
    row = record.get("query_id") or index  # rows are named by their query id
    for field in (f"{side_key}_text", f"{side_key}_image"):
        if field not in record:
            raise BadRowError(f"row {row!r}: missing column {field!r}")
    text, image = record[f"{side_key}_text"], record[f"{side_key}_image"]
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    text = text or ""
    field = f"{side_key}_image"
    if record.get(f"{side_key}_id"):
        field += f" of {record[f'{side_key}_id']!r}"
    images = [] if is_empty_image(image) else [decode_image(image, f"row {row!r}: {field}")]
    if not text.strip() and not images:
        raise BadRowError(f"row {row!r}: {side_key} has empty text and no image")
    return text, images


def check_features(features: dict, image_token_id: int, merge_size: int = 2) -> None:
    """Validates Qwen2-VL features (shapes, image tokens vs grid); ValueError naming the rule."""
    input_ids, mask = features.get("input_ids"), features.get("attention_mask")
    if input_ids is None or mask is None:
        raise ValueError("features need 'input_ids' and 'attention_mask'")
    if input_ids.ndim != 2 or input_ids.shape != mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} / attention_mask {mask.shape}: need [B, L]")
    grid, pixel_values = features.get("image_grid_thw"), features.get("pixel_values")
    if grid is None:
        grid = np.zeros((0, 3), np.int32)
    # Packed [N, 3] checks the batch as one; per-example [B, N_ex, 3] checks each row.
    per_example = grid.ndim == 3
    if per_example and len(grid) != len(input_ids):
        raise ValueError(f"image_grid_thw {grid.shape} must lead with the batch {len(input_ids)}")
    grids = grid if per_example else grid[None]
    tokens = ((input_ids == image_token_id) & (mask == 1)).reshape(len(grids), -1).sum(-1)
    for b, (example_grid, found) in enumerate(zip(grids, tokens, strict=True)):
        where = f"row {b}: " if per_example else ""
        patches = int(np.sum(np.prod(example_grid, axis=-1)))
        if found != patches // merge_size**2:
            raise ValueError(
                f"{where}{found} image tokens in input_ids, image_grid_thw needs "
                f"{patches // merge_size**2}"
            )
        rows = None if pixel_values is None else pixel_values.shape[int(per_example)]
        if rows is not None and rows < patches:
            raise ValueError(f"{where}pixel_values has {rows} rows, image_grid_thw needs {patches}")


def iterate_features(
    items: Sequence[dict[str, Any]],
    processor,
    side: str,
    batch_size: int,
    data_config,
) -> Iterator[tuple[dict[str, Any], int]]:
    """Batched Qwen2-VL features for a list of items: yields (features, num_valid).

    items: dicts with "text" (str) and "image" (PNG bytes, PIL image, b"" or None). Every batch
    has `batch_size` rows (the last is filled by repeating its last item; use only the first
    `num_valid` outputs) and the static image shapes of training batches.
    """
    if side not in ("query", "candidate"):
        raise ValueError(f"side={side!r}: expected 'query' or 'candidate'")
    static_shapes = qwen2_vl.FAMILY.static_shapes(data_config, batch_size)
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        num_valid = len(chunk)
        chunk += [chunk[-1]] * (batch_size - num_valid)
        texts = [item.get("text") or "" for item in chunk]
        images = [[] if is_empty_image(i.get("image")) else [i["image"]] for i in chunk]
        features = processor(texts, images if any(images) else None, side=side)
        yield static_shapes(dict(features)), num_valid


# ----------------------------------------------------------------------------- command line


def exit_status(argv: Sequence[str]) -> int:
    """The exit status `metaembed ARGV` ends with (what the console script passes to exit)."""
    from metaembed_jax.cli.main import main

    try:
        return main(list(argv))
    except SystemExit as stop:
        return 0 if stop.code is None else stop.code


def run_process(command: Sequence[str], timeout: float = 600, **kwargs):
    """`command` as a real process in the repository with the tests' environment (CPU, offline,
    the package importable); returns the CompletedProcess (text stdout / stderr)."""
    import subprocess

    from tests.paths import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        list(command), env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
