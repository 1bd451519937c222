"""Llama-3.2-Vision (Mllama) configuration: the special tokens of its prompts, the text and
vision hyper-parameters read from a raw `config.json` dict, and the tiny config for tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

MODEL_TYPES = ("mllama",)


DEFAULT_ROPE_THETA = 500_000.0


DEFAULT_IMAGE_TOKEN_ID = 128256


EXTRA_EMBEDDING_ROWS = 8  # transformers' MllamaTextModel: nn.Embedding(vocab_size + 8, ...)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The language-model hyper-parameters of a raw Mllama `config.json` dict."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    cross_attention_layers: tuple[int, ...]
    rope: tuple[tuple[str, Any], ...]  # the rope parameters, as sorted (key, value) pairs


def text_config(config: Mapping[str, Any]) -> TextConfig:
    """The text config from `config["text_config"]` (published and transformers 5 spelling:
    `rope_scaling` + `rope_theta`, or `rope_parameters`). Raises ValueError for unsupported
    settings."""
    text = dict(config.get("text_config") or {})
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"text hidden_act {text['hidden_act']!r}; expected 'silu'")
    hidden, heads = int(text.get("hidden_size", 4096)), int(text.get("num_attention_heads", 32))
    num_layers = int(text.get("num_hidden_layers", 40))
    cross = tuple(
        sorted(int(i) for i in text.get("cross_attention_layers") or (3, 8, 13, 18, 23, 28, 33, 38))
    )
    if any(not 0 <= i < num_layers for i in cross):
        raise ValueError(f"cross_attention_layers {cross} outside the {num_layers} layers")
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope.setdefault("rope_theta", text.get("rope_theta", DEFAULT_ROPE_THETA))
    rope_type = rope.setdefault("rope_type", rope.pop("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"rope type {rope_type!r} is not supported; expected 'default' or 'llama3'"
        )
    return TextConfig(
        vocab_size=int(text.get("vocab_size", 128256)),
        hidden_size=hidden,
        intermediate_size=int(text.get("intermediate_size", 14336)),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or 8),
        head_dim=hidden // heads,  # transformers' Mllama attention always uses this
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        cross_attention_layers=cross,
        rope=tuple(sorted(rope.items())),
    )


DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


PATCH_MULTIPLE = 8  # transformers pads each tile's patch axis to a multiple of this


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision hyper-parameters of a `vision_config` dict (transformers' defaults)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_global_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    norm_eps: float
    max_num_tiles: int
    intermediate_layers: tuple[int, ...]
    num_aspect_ratios: int
    output_dim: int

    @property
    def num_patches(self) -> int:
        """Patches per tile, class token included."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_patches(self) -> int:
        return -(-self.num_patches // PATCH_MULTIPLE) * PATCH_MULTIPLE

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"vision_config.{name}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


def vision_config(config: Mapping[str, Any]) -> VisionConfig:
    """A `VisionConfig` from a raw `vision_config` dict. Raises ValueError for settings
    transformers' Mllama does not support or that disagree with each other."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"vision hidden_act {config['hidden_act']!r}; expected 'gelu'")
    hidden = int(config.get("hidden_size", 1280))
    num_layers = int(config.get("num_hidden_layers", 32))
    intermediate = tuple(
        int(i) for i in config.get("intermediate_layers_indices") or (3, 7, 15, 23, 30)
    )
    bad = [i for i in intermediate if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"intermediate_layers_indices {bad} outside the {num_layers} local layers")
    output_dim = int(config.get("vision_output_dim", 7680))
    if output_dim != hidden * (len(intermediate) + 1):
        raise ValueError(
            f"vision_output_dim={output_dim}; expected hidden_size * (1 + "
            f"len(intermediate_layers_indices)) = {hidden * (len(intermediate) + 1)}"
        )
    ratios = config.get("supported_aspect_ratios") or DEFAULT_ASPECT_RATIOS
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=int(config.get("intermediate_size", 5120)),
        num_layers=num_layers,
        num_global_layers=int(config.get("num_global_layers", 8)),
        num_heads=int(config.get("attention_heads", config.get("num_attention_heads", 16))),
        num_channels=int(config.get("num_channels", 3)),
        image_size=_as_int(config.get("image_size", 448), "image_size"),
        patch_size=_as_int(config.get("patch_size", 14), "patch_size"),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        max_num_tiles=int(config.get("max_num_tiles", 4)),
        intermediate_layers=intermediate,
        num_aspect_ratios=len(ratios),
        output_dim=output_dim,
    )


IMAGE_TOKEN = "<|image|>"


BOS_TOKEN = "<|begin_of_text|>"


HEADER_START, HEADER_END, END_OF_TURN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


PAD_TOKEN = "<|finetune_right_pad_id|>"  # Llama 3.2's pad token (pad_token_id 128004)


# The order a built-in tokenizer gives them ids 0, 1, ... (the pad token first).
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, HEADER_START, HEADER_END, END_OF_TURN, IMAGE_TOKEN)


def tiny_config(vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """A tiny random-weight Mllama config dict (loadable by `transformers.MllamaConfig`): text
    hidden 64, 4 layers with a cross-attention layer at 2, GQA 4 / 2 heads, llama3 rope; vision
    hidden 32, 2 local + 1 global layers, 28 px tiles of 14 px patches, up to 4 tiles.
    `overrides` replace top-level keys, or `text_config` / `vision_config` entries when given
    as dicts (merged)."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=[2],
        rms_norm_eps=1e-5,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        max_position_embeddings=4096,
        # ids of SPECIAL_TOKENS in a built-in tokenizer: pad 0, <|begin_of_text|> 1, <|eot_id|> 4
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=4,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=28,
        patch_size=14,
        max_num_tiles=4,
        intermediate_layers_indices=[0, 1],
        vision_output_dim=96,
    )
    text.update(overrides.pop("text_config", {}))
    vision.update(overrides.pop("vision_config", {}))
    config = dict(
        model_type="mllama",
        text_config=text,
        vision_config=vision,
        image_token_index=SPECIAL_TOKENS.index(IMAGE_TOKEN),
    )
    config.update(overrides)
    return config
