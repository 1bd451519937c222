"""Qwen2-VL / Qwen2.5-VL checkpoint keys -> parameter paths of `modeling.Qwen2VLBackbone`.

The language model's table is here; the vision tower's (`vision.vision_rules`) depends on the
tower's config. Keys are matched after `KEY_ALIASES` rewrote transformers' in-memory layout to the
published one, so both `save_pretrained` layouts reach the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metaembed_jax.models.qwen2_vl.modeling import model_type_of
from metaembed_jax.models.qwen2_vl.vision import vision_rules
from metaembed_jax.models.rules import Rule

_LAYER = r"model\.layers\.(?P<layer>\d+)\."

LANGUAGE_RULES = (
    Rule(r"model\.embed_tokens\.weight", "embed_tokens"),
    Rule(r"model\.norm\.weight", "norm.scale"),
    Rule(
        _LAYER + r"self_attn\.(?P<p>q|k|v)_proj\.weight",
        "layers.self_attn.{p}_proj.kernel",
        "linear",
    ),
    Rule(_LAYER + r"self_attn\.(?P<p>q|k|v)_proj\.bias", "layers.self_attn.{p}_proj.bias"),
    Rule(_LAYER + r"self_attn\.o_proj\.weight", "layers.self_attn.o_proj.kernel", "linear"),
    Rule(_LAYER + r"mlp\.(?P<p>gate|up|down)_proj\.weight", "layers.mlp.{p}_proj.kernel", "linear"),
    Rule(_LAYER + r"(?P<n>input|post_attention)_layernorm\.weight", "layers.{n}_layernorm.scale"),
    # MetaEmbed reads hidden states, never logits: the LM head is deliberately not loaded.
    Rule(r"lm_head\.weight", None),
)

# transformers' in-memory layout (`model.language_model.*`, `model.visual.*`) -> the published one.
KEY_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))
# ... and back: the rules' keys -> transformers' in-memory module names (PEFT's names).
IN_MEMORY_ALIASES = (("model.", "model.language_model."), ("visual.", "model.visual."))


def qwen2_vl_rules(config: Mapping[str, Any]) -> list[Rule]:
    """Language-model rules + the vision tower's, for a raw config dict."""
    vision = vision_rules(dict(config.get("vision_config") or {}), model_type_of(config))
    return [*LANGUAGE_RULES, *vision]
