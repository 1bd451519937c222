"""Checkpoint-key rules for Mllama: the published `Llama-3.2-11B-Vision(-Instruct)` layout
(`language_model.model.layers.N.*`, `vision_model.*`, `multi_modal_projector.*`, also what
transformers 5's `save_pretrained` writes) and, through `KEY_ALIASES`, transformers' in-memory
layout (`model.language_model.layers.N.*`, `model.vision_model.*`, `lm_head.weight`).

Decoder layer N goes to the self-attention block that holds it (`self_blocks.B`, stacked, at
index N - first layer of the block: `Rule.layer_offset`) or to its cross-attention layer
(`cross_layers.C`), following `modeling.layer_plan`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metaembed_jax.models.mllama.config import text_config
from metaembed_jax.models.mllama.modeling import layer_plan
from metaembed_jax.models.rules import Rule

# transformers' in-memory names -> the published ones (the rules below are written for those).
KEY_ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
# ... and back: the rules' keys -> transformers' in-memory module names (PEFT's names).
IN_MEMORY_ALIASES = tuple((new, old) for old, new in KEY_ALIASES)

_TEXT = r"language_model\.model\."
_MLP = r"mlp\.(?P<p>gate|up|down)_proj\.weight"
_NORMS = r"(?P<n>input|post_attention)_layernorm\.weight"


def _layer_alternation(first: int, count: int) -> str:
    return "(?P<layer>" + "|".join(str(i) for i in range(first, first + count)) + ")"


def _self_block_rules(block: int, first: int, count: int) -> list[Rule]:
    layer = _TEXT + r"layers\." + _layer_alternation(first, count) + r"\."
    target = f"self_blocks.{block}."
    return [
        Rule(
            layer + r"self_attn\.(?P<p>q|k|v|o)_proj\.weight",
            target + "self_attn.{p}_proj.kernel",
            "linear",
            layer_offset=first,
        ),
        Rule(layer + _MLP, target + "mlp.{p}_proj.kernel", "linear", layer_offset=first),
        Rule(layer + _NORMS, target + "{n}_layernorm.scale", layer_offset=first),
    ]


def _cross_layer_rules(index: int, layer: int) -> list[Rule]:
    prefix = _TEXT + rf"layers\.{layer}\."
    target = f"cross_layers.{index}."
    return [
        Rule(
            prefix + r"cross_attn\.(?P<p>q|k|v|o)_proj\.weight",
            target + "cross_attn.{p}_proj.kernel",
            "linear",
        ),
        Rule(prefix + r"cross_attn\.(?P<p>q|k)_norm\.weight", target + "cross_attn.{p}_norm.scale"),
        Rule(prefix + r"cross_attn_(?P<g>attn|mlp)_gate", target + "cross_attn_{g}_gate"),
        Rule(prefix + _MLP, target + "mlp.{p}_proj.kernel", "linear"),
        Rule(prefix + _NORMS, target + "{n}_layernorm.scale"),
    ]


_VISION_LAYER = r"vision_model\.(?P<stack>transformer|global_transformer)\.layers\.(?P<layer>\d+)\."

VISION_RULES = (
    Rule(
        r"vision_model\.patch_embedding\.weight",
        "vision_model.patch_embedding.kernel",
        "conv_to_linear",
    ),
    Rule(r"vision_model\.class_embedding", "vision_model.class_embedding"),
    Rule(
        r"vision_model\.gated_positional_embedding\.(?P<p>embedding|gate)",
        "vision_model.gated_positional_embedding.{p}",
    ),
    Rule(
        r"vision_model\.gated_positional_embedding\.tile_embedding\.weight",
        "vision_model.gated_positional_embedding.tile_embedding",
    ),
    Rule(
        r"vision_model\.(?P<t>pre|post)_tile_positional_embedding\.embedding\.weight",
        "vision_model.{t}_tile_positional_embedding.embedding",
    ),
    Rule(
        r"vision_model\.(?P<t>pre|post)_tile_positional_embedding\.gate",
        "vision_model.{t}_tile_positional_embedding.gate",
    ),
    Rule(r"vision_model\.layernorm_(?P<n>pre|post)\.weight", "vision_model.layernorm_{n}.scale"),
    Rule(r"vision_model\.layernorm_(?P<n>pre|post)\.bias", "vision_model.layernorm_{n}.bias"),
    Rule(
        _VISION_LAYER + r"self_attn\.(?P<p>q|k|v|o)_proj\.weight",
        "vision_model.{stack}.self_attn.{p}_proj.kernel",
        "linear",
    ),
    Rule(
        _VISION_LAYER + r"mlp\.(?P<p>fc1|fc2)\.weight",
        "vision_model.{stack}.mlp.{p}.kernel",
        "linear",
    ),
    Rule(_VISION_LAYER + r"mlp\.(?P<p>fc1|fc2)\.bias", "vision_model.{stack}.mlp.{p}.bias"),
    Rule(
        _VISION_LAYER + r"(?P<n>input|post_attention)_layernorm\.weight",
        "vision_model.{stack}.{n}_layernorm.scale",
    ),
    Rule(
        _VISION_LAYER + r"(?P<n>input|post_attention)_layernorm\.bias",
        "vision_model.{stack}.{n}_layernorm.bias",
    ),
    Rule(_VISION_LAYER + r"gate_(?P<g>attn|ffn)", "vision_model.{stack}.gate_{g}"),
)

FIXED_RULES = (
    Rule(_TEXT + r"embed_tokens\.weight", "embed_tokens"),
    Rule(_TEXT + r"norm\.weight", "norm.scale"),
    Rule(r"multi_modal_projector\.weight", "multi_modal_projector.kernel", "linear"),
    Rule(r"multi_modal_projector\.bias", "multi_modal_projector.bias"),
    # MetaEmbed reads hidden states, never logits: the LM head is deliberately not loaded.
    Rule(r"language_model\.lm_head\.weight", None),
)


def mllama_rules(config: Mapping[str, Any]) -> list[Rule]:
    """Every rule for a raw Mllama config dict (the decoder's depend on its layer plan)."""
    rules = [*FIXED_RULES, *VISION_RULES]
    blocks = crosses = 0
    for kind, first, count in layer_plan(text_config(config)):
        if kind == "self":
            rules += _self_block_rules(blocks, first, count)
            blocks += 1
        else:
            rules += _cross_layer_rules(crosses, first)
            crosses += 1
    return rules
