"""Qwen2-VL / Qwen2.5-VL checkpoint keys -> parameter paths of `modeling.Qwen2VLBackbone`.

The language model's table, and the vision tower's (`vision_rules`), which depends on the
tower's config. Keys are matched after `KEY_ALIASES` rewrote transformers' in-memory layout to the
published one, so both `save_pretrained` layouts reach the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from metaembed_jax.models.qwen2_vl.config import model_type_of
from metaembed_jax.models.qwen2_vl.vision import parse_vision_config
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


def vision_rules(
    vision_config: Mapping[str, Any],
    model_type: str,
    prefix: str = "visual",
    target_prefix: str = "visual",
) -> list[Rule]:
    """Rules mapping HF vision keys (`{prefix}.patch_embed.proj.weight`, `{prefix}.blocks.{i}.…`,
    `{prefix}.merger.…`) to a `VisionTower` mounted at `target_prefix` ("" = the tower itself)."""
    config = parse_vision_config(vision_config, model_type)
    key = re.escape(prefix) + r"\." if prefix else ""
    target = f"{target_prefix}." if target_prefix else ""
    block = key + r"blocks\.(?P<layer>\d+)\."
    with_bias = ["attn.qkv", "attn.proj"]
    with_bias += (
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        if config.model_type == "qwen2_5_vl"
        else ["mlp.fc1", "mlp.fc2"]
    )
    norms = ["norm1", "norm2"]
    rules = [
        Rule(key + r"patch_embed\.proj\.weight", target + "patch_embed.kernel", "conv_to_linear")
    ]
    for name in with_bias:
        pattern = block + re.escape(name)
        rules.append(Rule(pattern + r"\.weight", f"{target}blocks.{name}.kernel", "linear"))
        rules.append(Rule(pattern + r"\.bias", f"{target}blocks.{name}.bias"))
    for name in norms:
        rules.append(Rule(block + name + r"\.weight", f"{target}blocks.{name}.scale"))
    merger = key + r"merger\."
    rules.append(Rule(merger + r"ln_q\.weight", target + "merger.ln_q.scale"))
    for index, name in (("0", "fc1"), ("2", "fc2")):
        rules.append(
            Rule(merger + rf"mlp\.{index}\.weight", f"{target}merger.{name}.kernel", "linear")
        )
        rules.append(Rule(merger + rf"mlp\.{index}\.bias", f"{target}merger.{name}.bias"))
    if config.model_type == "qwen2_vl":  # LayerNorm biases
        for name in norms:
            rules.append(Rule(block + name + r"\.bias", f"{target}blocks.{name}.bias"))
        rules.append(Rule(merger + r"ln_q\.bias", target + "merger.ln_q.bias"))
    return rules
