"""PaliGemma / PaliGemma 2 hyper-parameters from a raw `config.json` dict, and a tiny config.

Published PaliGemma configs spell only what differs from transformers' defaults (e.g.
`paligemma-3b-pt-224`'s `text_config` has no `head_dim`, `rope_theta` or `hidden_act`), so every
missing key takes the default of transformers' `GemmaConfig` / `Gemma2Config` /
`SiglipVisionConfig` (5.23), written out below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

MODEL_TYPES = ("paligemma",)
# Gemma's special tokens, in the order of their ids in Gemma's tokenizer (pad 0, eos 1, bos 2);
# the built-in tokenizer gives them ids 0..3 in this order, so `tiny_config` hard-wires them.
PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, IMAGE_TOKEN = "<pad>", "<eos>", "<bos>", "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, IMAGE_TOKEN)
TEXT_MODEL_TYPES = ("gemma", "gemma2")
DEFAULT_IMAGE_TOKEN_ID = 256000  # PaliGemmaConfig.image_token_index
SLIDING, FULL = "sliding_attention", "full_attention"

# transformers 5.23 defaults of the keys published configs leave out.
_GEMMA_DEFAULTS = dict(
    head_dim=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    num_attention_heads=16,
    num_key_value_heads=16,
)
_GEMMA2_DEFAULTS = dict(
    _GEMMA_DEFAULTS,
    num_attention_heads=8,
    num_key_value_heads=4,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
)
_SIGLIP_DEFAULTS = dict(
    hidden_size=1152,
    intermediate_size=4096,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_channels=3,
    image_size=224,
    patch_size=14,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
# activation name -> jax.nn.gelu's `approximate`
ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True, "gelu": False}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Gemma / Gemma 2 decoder. `layer_types[i]` is "sliding_attention" or "full_attention"
    (all full for Gemma); `attn_scale` multiplies attention scores (Gemma: `head_dim**-0.5`,
    Gemma 2: `query_pre_attn_scalar**-0.5`); `final_logit_softcapping` only touches logits, which
    MetaEmbed never computes, so it is kept for the record and unused."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    gelu_approximate: bool
    attn_scale: float
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    sliding_window: int | None
    layer_types: tuple[str, ...]

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The SigLIP vision tower (no pooling head: PaliGemma reads its last hidden states)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    gelu_approximate: bool
    projection_dim: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2


def _activation(name: str, model_type: str) -> bool:
    if model_type == "gemma" and name == "gelu":
        # transformers' GemmaConfig rewrites the legacy "gelu" to the tanh approximation.
        name = "gelu_pytorch_tanh"
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} is not supported; expected one of {list(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def _rope_theta(text: Mapping[str, Any], default: float) -> float:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported; expected 'default'")
    return float(rope.get("rope_theta", text.get("rope_theta", default)))


def _layer_types(text: Mapping[str, Any], num_layers: int, is_gemma2: bool) -> tuple[str, ...]:
    if not is_gemma2:
        return (FULL,) * num_layers
    # Gemma2Config's default: layer i slides when i is even (0, 2, ...), the odd ones are global.
    types = text.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
    types = tuple(types)
    if len(types) != num_layers or not set(types) <= {SLIDING, FULL}:
        raise ValueError(
            f"layer_types {list(types)} must name {num_layers} layers, each {SLIDING!r} or {FULL!r}"
        )
    return types


def text_config(config: Mapping[str, Any]) -> TextConfig:
    """The decoder config of a raw PaliGemma `config.json` dict (its `text_config`).

    Raises ValueError for a text model type other than gemma / gemma2, a missing size key, an
    unsupported activation or rope type."""
    text = dict(config.get("text_config") or {})
    model_type = text.get("model_type", "gemma")
    if model_type not in TEXT_MODEL_TYPES:
        raise ValueError(
            f"text_config model_type {model_type!r}; expected one of {TEXT_MODEL_TYPES}"
        )
    is_gemma2 = model_type == "gemma2"
    defaults = _GEMMA2_DEFAULTS if is_gemma2 else _GEMMA_DEFAULTS
    missing = [
        k for k in ("hidden_size", "intermediate_size", "num_hidden_layers") if k not in text
    ]
    if missing:
        raise ValueError(f"PaliGemma text_config lacks {missing}")
    num_heads = int(text.get("num_attention_heads", defaults["num_attention_heads"]))
    head_dim = int(text.get("head_dim") or defaults["head_dim"])
    activation = text.get("hidden_activation") if is_gemma2 else text.get("hidden_act")
    cap = {
        k: text.get(k, defaults.get(k))
        for k in ("attn_logit_softcapping", "final_logit_softcapping")
    }
    scalar = float(text.get("query_pre_attn_scalar", defaults.get("query_pre_attn_scalar", 0)))
    num_layers = int(text["num_hidden_layers"])
    return TextConfig(
        model_type=model_type,
        vocab_size=int(text.get("vocab_size", config.get("vocab_size", 257152))),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(text.get("num_key_value_heads") or defaults["num_key_value_heads"]),
        head_dim=head_dim,
        rms_norm_eps=float(text.get("rms_norm_eps", defaults["rms_norm_eps"])),
        rope_theta=_rope_theta(text, defaults["rope_theta"]),
        attention_bias=bool(text.get("attention_bias", False)),
        gelu_approximate=_activation(activation or "gelu_pytorch_tanh", model_type),
        attn_scale=scalar**-0.5 if is_gemma2 else head_dim**-0.5,
        attn_logit_softcapping=cap["attn_logit_softcapping"],
        final_logit_softcapping=cap["final_logit_softcapping"],
        sliding_window=text.get("sliding_window", defaults.get("sliding_window"))
        if is_gemma2
        else None,
        layer_types=_layer_types(text, num_layers, is_gemma2),
    )


def vision_config(config: Mapping[str, Any]) -> VisionConfig:
    """The SigLIP tower config of a raw PaliGemma `config.json` dict (its `vision_config`)."""
    vision = {**_SIGLIP_DEFAULTS, **dict(config.get("vision_config") or {})}
    projection_dim = int(config.get("projection_dim", vision.get("projection_dim", 2048)))
    result = VisionConfig(
        hidden_size=int(vision["hidden_size"]),
        intermediate_size=int(vision["intermediate_size"]),
        num_layers=int(vision["num_hidden_layers"]),
        num_heads=int(vision["num_attention_heads"]),
        num_channels=int(vision["num_channels"]),
        image_size=int(vision["image_size"]),
        patch_size=int(vision["patch_size"]),
        layer_norm_eps=float(vision["layer_norm_eps"]),
        gelu_approximate=_activation(vision["hidden_act"], "siglip"),
        projection_dim=projection_dim,
    )
    if result.hidden_size % result.num_heads:
        raise ValueError(
            f"vision hidden_size {result.hidden_size} not divisible by {result.num_heads} heads"
        )
    return result


def image_token_id(config: Mapping[str, Any]) -> int:
    return int(
        config.get("image_token_index", config.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID))
    )


def tiny_config(vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """A small PaliGemma `config.json` dict (random weights; transformers loads it).

    Takes the vocabulary size and overrides: `text_model_type="gemma2"` for a Gemma 2 decoder,
    `image_token_id` (default 3, the built-in tokenizer's `<image>`), `image_size` (default 28),
    or any text-config key (e.g. `num_hidden_layers=1`). Returns a dict that
    `transformers.PaliGemmaConfig(**d)` accepts.
    """
    overrides = dict(overrides)
    text_model_type = overrides.pop("text_model_type", "gemma")
    image_token = int(overrides.pop("image_token_id", SPECIAL_TOKENS.index(IMAGE_TOKEN)))
    image_size = int(overrides.pop("image_size", 28))
    if text_model_type not in TEXT_MODEL_TYPES:
        raise ValueError(f"text_model_type {text_model_type!r}; expected one of {TEXT_MODEL_TYPES}")
    text = dict(
        model_type=text_model_type,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    if text_model_type == "gemma2":
        text.update(num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=4)
        text.update(attn_logit_softcapping=2.0, final_logit_softcapping=30.0)
    text.update(overrides)
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        vision_use_head=False,
    )
    return dict(
        model_type="paligemma",
        text_config=text,
        vision_config=vision,
        image_token_index=image_token,
        projection_dim=text["hidden_size"],
        vocab_size=vocab_size,
    )
