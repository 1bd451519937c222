"""MetaEmbed on Qwen2.5-VL-32B with the reference recipe (see qwen2_5_vl_7b.py).

`config.init_from`: local copy of Qwen/Qwen2.5-VL-32B-Instruct. Variants `:nommr`, `:single`
(`:gradcache` equals the default: the recipe accumulates with gradient caching on).
"""

from metaembed_jax.training.recipes import reference_recipe


def get_config(variant: str | None = None):
    config = reference_recipe("checkpoints/Qwen2.5-VL-32B-Instruct", variant)
    # 32B: 8-way FSDP x 2-way tensor parallelism per replica (e.g. 16 accelerators per replica).
    config.mesh.data = -1
    config.mesh.fsdp = 8
    config.mesh.tensor = 2
    # Smaller micro-batches, same global batch of 384: fits 80 GB per device at the longest
    # inputs (2048 tokens + a 1024-token image per side; an estimate of XLA:CPU, not yet
    # confirmed by the TPU compiler: docs/tpu.md) with micro-batches of 16 (2 was 2x over).
    # Without gradient caching in-batch negatives would come from each micro-batch.
    config.train.grad_accum_steps = 24
    # Gradient caching: the 24 micro-batches form one contrastive batch, so every query is
    # still contrasted with all 384 positives of the step, as in the paper.
    config.train.grad_cache = True
    return config
