"""Tiny configs and synthetic batches for tests and benchmarks (no dataset, no tokenizer files).

Token ids follow the built-in tokenizer's layout (special tokens first: 0 = pad, 3 =
vision_start, 4 = vision_end, 6 = image_pad), so the same tiny model config fits both.
"""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict

from metaembed_jax.training.config import base_config

PAD_ID, VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = 0, 3, 4, 6, 7
PATCH_SIZE, TEMPORAL_PATCH, MERGE = 14, 2, 2


def tiny_hf_config(
    vocab_size: int = 96,
    hidden: int = 32,
    layers: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 1,
) -> dict:
    """A Qwen2.5-VL config dict with the built-in tokenizer's special-token ids."""
    heads = max(2, hidden // 16)
    return {
        "model_type": "qwen2_5_vl",
        "image_token_id": IMAGE_PAD_ID,
        "video_token_id": VIDEO_PAD_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2),
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(hidden // heads)},
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": TEMPORAL_PATCH,
            "window_size": 56,
            "fullatt_block_indexes": [vision_depth - 1],
            "in_channels": 3,
        },
    }


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen splits head_dim / 2 rotary frequencies over (t, h, w) as 1/4, 3/8, 3/8 (16, 24, 24).
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_config(r_q: int = 16, r_c: int = 64, **hf_kwargs) -> ConfigDict:
    """The base config with a tiny random Qwen2.5-VL, float32, short schedule, small batch."""
    config = base_config()
    config.model.hf_config = ConfigDict(tiny_hf_config(**hf_kwargs))
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
