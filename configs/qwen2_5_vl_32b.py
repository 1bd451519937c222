"""MetaEmbed on Qwen2.5-VL-32B with the reference recipe (see qwen2_5_vl_7b.py).

`config.init_from`: local copy of Qwen/Qwen2.5-VL-32B-Instruct. Variants `:nommr`, `:single`.
"""

from metaembed_jax.training.recipes import reference_recipe


def get_config(variant: str | None = None):
    config = reference_recipe("checkpoints/Qwen2.5-VL-32B-Instruct", variant)
    # 32B: 8-way FSDP x 2-way tensor parallelism per replica (e.g. 16 accelerators per replica).
    config.mesh.data = -1
    config.mesh.fsdp = 8
    config.mesh.tensor = 2
    # Smaller micro-batches, same global batch of 384: fits 80 GB per device at the longest
    # inputs (2048 tokens + a 1024-token image per side, `python -m benchmarks.recipe_cost
    # --recipe 32b --grad_accum 24`) with micro-batches of 16 (2 was 2x over). In-batch
    # negatives then come from each micro-batch, not the global 384.
    config.train.grad_accum_steps = 24
    return config
