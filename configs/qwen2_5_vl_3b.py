"""MetaEmbed on Qwen2.5-VL-3B with the reference recipe (see qwen2_5_vl_7b.py).

`config.init_from`: local copy of Qwen/Qwen2.5-VL-3B-Instruct. Variants `:nommr`, `:single`
(`:gradcache` equals the default: the recipe accumulates with gradient caching on).
"""

from metaembed_jax.training.recipes import reference_recipe


def get_config(variant: str | None = None):
    config = reference_recipe("checkpoints/Qwen2.5-VL-3B-Instruct", variant)
    # 3B fits data parallelism with 2-way FSDP on 16 GB+ accelerators.
    config.mesh.data = -1
    config.mesh.fsdp = 2
    # Fits 80 GB per device at the longest inputs (2048 tokens + a 1024-token image per side,
    # an estimate of XLA:CPU; on the TPU compiler see docs/tpu.md) only with micro-batches of
    # 48; without gradient caching in-batch negatives would come from each micro-batch, not
    # the global 384.
    config.train.grad_accum_steps = 8
    # Gradient caching: the 8 micro-batches form one contrastive batch, so every query is
    # still contrasted with all 384 positives of the step, as in the paper.
    config.train.grad_cache = True
    return config
