"""PaliGemma / PaliGemma 2 as a backbone family (SigLIP + Gemma / Gemma 2).

Importing this module registers the family (`family.register_family`); `load_hf` / `from_config`
then load `model_type: paligemma` checkpoints, every published layout (`paligemma-3b-*`,
`paligemma2-3b-*`, `paligemma2-10b-*`) and transformers 5's `save_pretrained` one.
"""

from metaembed_jax.models.family import BackboneFamily, register_family
from metaembed_jax.models.paligemma.config import MODEL_TYPES, tiny_config
from metaembed_jax.models.paligemma.modeling import PaliGemmaBackbone
from metaembed_jax.models.paligemma.params import KEY_ALIASES, paligemma_rules
from metaembed_jax.models.paligemma.processing import (
    FEATURE_KEYS,
    SPECIAL_TOKENS,
    make_processor,
    static_shapes,
)

FAMILY = register_family(
    BackboneFamily(
        name="paligemma",
        model_types=MODEL_TYPES,
        build=PaliGemmaBackbone,
        rules=paligemma_rules,
        feature_keys=FEATURE_KEYS,
        make_processor=make_processor,
        static_shapes=static_shapes,
        tiny_config=tiny_config,
        special_tokens=SPECIAL_TOKENS,
        key_aliases=KEY_ALIASES,
    )
)

__all__ = ["FAMILY", "PaliGemmaBackbone"]
