"""The Llama-3.2-Vision (Mllama) backbone family: tiled vision model, gated cross-attention
decoder, weight rules, processor and tiny config. Importing this module registers it."""

from __future__ import annotations

from metaembed_jax.models import family
from metaembed_jax.models.mllama.config import MODEL_TYPES, SPECIAL_TOKENS, tiny_config
from metaembed_jax.models.mllama.modeling import MllamaBackbone
from metaembed_jax.models.mllama.params import IN_MEMORY_ALIASES, KEY_ALIASES, mllama_rules
from metaembed_jax.models.mllama.processing import FEATURE_KEYS, make_processor, static_shapes

FAMILY = family.register_family(
    family.BackboneFamily(
        name="mllama",
        model_types=MODEL_TYPES,
        build=MllamaBackbone,
        rules=mllama_rules,
        feature_keys=FEATURE_KEYS,
        make_processor=make_processor,
        static_shapes=static_shapes,
        tiny_config=tiny_config,
        special_tokens=SPECIAL_TOKENS,
        key_aliases=KEY_ALIASES,
        in_memory_aliases=IN_MEMORY_ALIASES,
    )
)

__all__ = ["FAMILY", "MllamaBackbone"]
