"""The one small Qwen2-VL / Qwen2.5-VL config builder, for tests, the demo and benchmarks.

`tiny_config()` returns a `config.json`-style dict (transformers 5's nested spelling) that
transformers loads (`AutoConfig.for_model(**config)`) and `load_hf` / `from_config` build. Its
special-token ids are the built-in tokenizer's (`tokens.py`: 0 = pad, 3 = vision_start, ...), so
the same config fits a tokenizer built for this family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metaembed_jax.models.qwen2_vl.tokens import (
    IMAGE_PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
)

PATCH_SIZE, TEMPORAL_PATCH, MERGE = 14, 2, 2


def tiny_config(
    vocab_size: int = 96,
    *,
    model_type: str = "qwen2_5_vl",
    hidden: int = 32,
    layers: int = 2,
    head_dim: int = 16,
    vision_hidden: int = 32,
    vision_depth: int = 1,
    text: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A small random-weight Qwen-VL config dict.

    Args:
      vocab_size: text vocabulary (0 = "the tokenizer's", filled in by the training run).
      model_type: "qwen2_5_vl" (windowed RMSNorm vision tower) or "qwen2_vl" (LayerNorm tower).
      hidden / layers: the language model's width and depth.
      head_dim: width of an attention head (heads: hidden / head_dim, at least 2; half as many
        key/value heads). Qwen2.5-VL's is 128; 16 keeps tests' tiny models multi-headed.
      vision_hidden / vision_depth: the vision tower's width and depth.
      text / vision: entries that replace those of `text_config` / `vision_config`.
      overrides: top-level entries (e.g. `image_token_id`) that replace the defaults.
    """
    heads = max(2, hidden // head_dim)
    section = _mrope_section(hidden // heads)
    text_config = {
        "model_type": f"{model_type}_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": 1e4},
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config = {
        "model_type": model_type,
        "image_token_id": IMAGE_PAD_ID,
        "video_token_id": VIDEO_PAD_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "text_config": {**text_config, **(text or {})},
        "vision_config": {**_vision_config(model_type, hidden, vision_hidden, vision_depth)},
    }
    config["vision_config"].update(vision or {})
    config.update(overrides)
    return config


def _vision_config(model_type: str, hidden: int, vision_hidden: int, depth: int) -> dict:
    common = {
        "model_type": model_type,
        "depth": depth,
        "num_heads": 2,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL_PATCH,
        "in_channels": 3,
    }
    if model_type == "qwen2_vl":
        # Qwen2-VL: `embed_dim` is the tower's width, `hidden_size` its output (the LM's width).
        return {**common, "embed_dim": vision_hidden, "hidden_size": hidden, "mlp_ratio": 2}
    return {
        **common,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "out_hidden_size": hidden,
        "window_size": 56,
        "fullatt_block_indexes": [depth - 1],
    }


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen splits head_dim / 2 rotary frequencies over (t, h, w) as 1/4, 3/8, 3/8 (16, 24, 24).
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]
