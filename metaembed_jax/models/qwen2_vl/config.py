"""Qwen2-VL / Qwen2.5-VL configuration: the special tokens (what the prompts use and the
built-in tokenizer must carry), the language model's hyper-parameters read from a checkpoint's
`config.json` in either spelling, and the one small config builder for tests, the demo and
benchmarks (`tiny_config`).

The built-in tokenizer puts a family's special tokens first, in the order of `SPECIAL_TOKENS`
(ids 0..7 here), so that `tiny_config` can hard-wire the ids the prompts produce.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# The pad token first: the built-in tokenizer pads with its first special token.
SPECIAL_TOKENS = (
    PAD_TOKEN,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    VISION_PAD,
    IMAGE_PAD,
    VIDEO_PAD,
)
# Their ids in the built-in tokenizer (position in SPECIAL_TOKENS).
PAD_ID, VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = (
    SPECIAL_TOKENS.index(token)
    for token in (PAD_TOKEN, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
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


MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


DEFAULT_ROPE_THETA = 1_000_000.0


DEFAULT_MROPE_SECTION = (16, 24, 24)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The language-model hyper-parameters, whichever way the checkpoint spells them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]


def _text_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """Text keys: the top level (published flat spelling), overridden by a nested `text_config`
    (transformers 5 writes the text keys only there)."""
    text = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    nested = config.get("text_config")
    if isinstance(nested, Mapping):
        text.update(nested)
    return text


def _rope_settings(text: Mapping[str, Any]) -> tuple[float, tuple[int, ...]]:
    """(theta, mrope_section) from `rope_parameters` (transformers 5) or the published
    `rope_scaling: {type: mrope, mrope_section}` with a top-level `rope_theta`."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"rope type {rope_type!r} is not supported; expected 'default' or 'mrope'")
    theta = float(rope.get("rope_theta", text.get("rope_theta", DEFAULT_ROPE_THETA)))
    section = tuple(int(n) for n in rope.get("mrope_section", DEFAULT_MROPE_SECTION))
    return theta, section


def text_config(config: Mapping[str, Any]) -> TextConfig:
    """The language-model config from a raw `config.json` dict in either spelling."""
    text = _text_dict(config)
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        if k not in text
    ]
    if missing:
        raise ValueError(f"Qwen2-VL config lacks text keys {missing} (top level or text_config)")
    if text.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported (no published Qwen-VL uses it)")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {text['hidden_act']!r} is not supported; expected 'silu'")
    num_heads = int(text["num_attention_heads"])
    hidden_size = int(text["hidden_size"])
    # transformers' Qwen2-VL attention always uses hidden_size // num_heads.
    head_dim = hidden_size // num_heads
    theta, section = _rope_settings(text)
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}")
    return TextConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=hidden_size,
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(text.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),  # transformers default
        rope_theta=theta,
        mrope_section=section,
    )


def model_type_of(config: Mapping[str, Any]) -> str:
    """The config's `model_type`, checked to be a Qwen-VL one."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a Qwen-VL type; expected {MODEL_TYPES}")
    return model_type
