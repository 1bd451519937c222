"""PaliGemma / PaliGemma 2 checkpoint keys -> parameter paths of `modeling.PaliGemmaBackbone`
(the decoder's table and the SigLIP tower's and projector's). The rules spell transformers 5's
in-memory layout; `KEY_ALIASES` rewrites every published / saved layout to it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metaembed_jax.models.rules import Rule

_BLOCK = r"model\.vision_tower\.encoder\.layers\.(?P<layer>\d+)\."


VISION_RULES = (
    Rule(
        r"model\.vision_tower\.embeddings\.patch_embedding\.weight",
        "visual.patch_embed.kernel",
        "conv_to_linear",
    ),
    Rule(r"model\.vision_tower\.embeddings\.patch_embedding\.bias", "visual.patch_embed.bias"),
    Rule(
        r"model\.vision_tower\.embeddings\.position_embedding\.weight", "visual.position_embedding"
    ),
    Rule(
        _BLOCK + r"self_attn\.(?P<p>q_proj|k_proj|v_proj|out_proj)\.weight",
        "visual.blocks.self_attn.{p}.kernel",
        "linear",
    ),
    Rule(
        _BLOCK + r"self_attn\.(?P<p>q_proj|k_proj|v_proj|out_proj)\.bias",
        "visual.blocks.self_attn.{p}.bias",
    ),
    Rule(_BLOCK + r"mlp\.(?P<p>fc1|fc2)\.weight", "visual.blocks.{p}.kernel", "linear"),
    Rule(_BLOCK + r"mlp\.(?P<p>fc1|fc2)\.bias", "visual.blocks.{p}.bias"),
    Rule(_BLOCK + r"(?P<n>layer_norm[12])\.weight", "visual.blocks.{n}.scale"),
    Rule(_BLOCK + r"(?P<n>layer_norm[12])\.bias", "visual.blocks.{n}.bias"),
    Rule(r"model\.vision_tower\.post_layernorm\.weight", "visual.post_layernorm.scale"),
    Rule(r"model\.vision_tower\.post_layernorm\.bias", "visual.post_layernorm.bias"),
    # SigLIP's attention-pooling head (saved when vision_use_head=True): PaliGemma never runs it.
    Rule(r"model\.vision_tower\.head\..*", None),
    Rule(r"model\.multi_modal_projector\.linear\.weight", "visual.projector.kernel", "linear"),
    Rule(r"model\.multi_modal_projector\.linear\.bias", "visual.projector.bias"),
)


_LAYER = r"model\.language_model\.layers\.(?P<layer>\d+)\."


_NORMS = (
    "input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm"
)


LANGUAGE_RULES = (
    Rule(r"model\.language_model\.embed_tokens\.weight", "embed_tokens"),
    Rule(r"model\.language_model\.norm\.weight", "norm.scale"),
    Rule(
        _LAYER + r"self_attn\.(?P<p>q|k|v|o)_proj\.weight",
        "layers.self_attn.{p}_proj.kernel",
        "linear",
    ),
    Rule(_LAYER + r"self_attn\.(?P<p>q|k|v|o)_proj\.bias", "layers.self_attn.{p}_proj.bias"),
    Rule(_LAYER + r"mlp\.(?P<p>gate|up|down)_proj\.weight", "layers.mlp.{p}_proj.kernel", "linear"),
    Rule(_LAYER + rf"(?P<n>{_NORMS})\.weight", "layers.{n}.scale"),
    # MetaEmbed reads hidden states, never logits: the LM head (tied to embed_tokens in every
    # published PaliGemma) is deliberately not loaded.
    Rule(r"lm_head\.weight", None),
)


# Every published / saved layout -> transformers 5's in-memory names (first matching prefix):
# published and save_pretrained: `language_model.model.*`, `vision_tower.*` (published:
# `vision_tower.vision_model.*`), `multi_modal_projector.*`, `language_model.lm_head.*`.
KEY_ALIASES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def paligemma_rules(config: Mapping[str, Any]) -> list[Rule]:
    """The decoder's rules + the vision tower's and projector's (config-independent)."""
    del config
    return [*LANGUAGE_RULES, *VISION_RULES]
