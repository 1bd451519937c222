"""MetaEmbed on PaliGemma 2-3B (SigLIP + Gemma 2 2B: alternating sliding-window / global layers,
attention soft-capping) with the reference recipe (see qwen2_5_vl_7b.py): LoRA r=32 on the
decoder's projections, the same MMR loss and schedule.

`config.init_from`: local copy of google/paligemma2-3b-pt-224 (images resized to 224 px, 256
`<image>` tokens). `paligemma2-10b-*` loads the same way (set `init_from` and a larger
`mesh.fsdp`). Variants `:nommr`, `:single`.
"""

from metaembed_jax.training.recipes import reference_recipe


def get_config(variant: str | None = None):
    config = reference_recipe("checkpoints/paligemma2-3b-pt-224", variant)
    # 256 image tokens + the prompt for an image row; text-only rows fit 64.
    config.data.length_buckets = (64, 320, 512, 1024)
    # PaliGemma resizes every image to one square (the checkpoint's preprocessor config says
    # 224 px; without one the processor takes sqrt(max_pixels)).
    config.data.max_pixels = config.data.min_pixels = 224 * 224
    config.mesh.data = -1
    config.mesh.fsdp = 2
    return config
