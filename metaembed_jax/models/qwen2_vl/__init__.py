"""The Qwen2-VL / Qwen2.5-VL backbone family: decoder (`modeling`), vision tower (`vision`), M-RoPE
index (`rope`), checkpoint rules (`params`), processor (`processing`), static image shapes
(`shapes`), special tokens and the tiny config (`config`), registered as one
`BackboneFamily` on import."""

from metaembed_jax.models.family import BackboneFamily, register_family
from metaembed_jax.models.qwen2_vl.config import MODEL_TYPES, SPECIAL_TOKENS, tiny_config
from metaembed_jax.models.qwen2_vl.modeling import Qwen2VLBackbone
from metaembed_jax.models.qwen2_vl.params import IN_MEMORY_ALIASES, KEY_ALIASES, qwen2_vl_rules
from metaembed_jax.models.qwen2_vl.processing import QwenVLProcessor, make_processor
from metaembed_jax.models.qwen2_vl.shapes import static_shapes

FEATURE_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")

FAMILY = register_family(
    BackboneFamily(
        name="qwen2_vl",
        model_types=MODEL_TYPES,
        build=Qwen2VLBackbone,
        rules=qwen2_vl_rules,
        feature_keys=FEATURE_KEYS,
        make_processor=make_processor,
        static_shapes=static_shapes,
        tiny_config=tiny_config,
        special_tokens=SPECIAL_TOKENS,
        key_aliases=KEY_ALIASES,
        in_memory_aliases=IN_MEMORY_ALIASES,
    )
)

__all__ = ["FAMILY", "FEATURE_KEYS", "Qwen2VLBackbone", "QwenVLProcessor", "tiny_config"]
