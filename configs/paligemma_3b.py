"""MetaEmbed on PaliGemma-3B (SigLIP + Gemma 2B) with the reference recipe (see
qwen2_5_vl_7b.py): LoRA r=32 on the decoder's projections, the same MMR loss and schedule.

`config.init_from`: local copy of google/paligemma-3b-pt-224 (any published `paligemma-3b-*`
checkpoint loads; images are resized to its 224 px, 256 `<image>` tokens). Variants `:nommr`,
`:single`.
"""

from metaembed_jax.training.recipes import reference_recipe


def get_config(variant: str | None = None):
    config = reference_recipe("checkpoints/paligemma-3b-pt-224", variant)
    # 256 image tokens + the prompt for an image row; text-only rows fit 64.
    config.data.length_buckets = (64, 320, 512, 1024)
    # PaliGemma resizes every image to one square (the checkpoint's preprocessor config says
    # 224 px; without one the processor takes sqrt(max_pixels)).
    config.data.max_pixels = config.data.min_pixels = 224 * 224
    # 3B fits data parallelism with 2-way FSDP on 16 GB+ accelerators.
    config.mesh.data = -1
    config.mesh.fsdp = 2
    return config
