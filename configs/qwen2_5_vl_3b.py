"""MetaEmbed on Qwen2.5-VL-3B with the reference recipe (see qwen2_5_vl_7b.py).

`config.init_from`: local copy of Qwen/Qwen2.5-VL-3B-Instruct. Variants `:nommr`, `:single`.
"""

from metaembed_jax.training.recipes import reference_recipe


def get_config(variant: str | None = None):
    config = reference_recipe("checkpoints/Qwen2.5-VL-3B-Instruct", variant)
    # 3B fits data parallelism with 2-way FSDP on 16 GB+ accelerators.
    config.mesh.data = -1
    config.mesh.fsdp = 2
    # Fits 80 GB per device at the longest inputs (2048 tokens + a 1024-token image per side,
    # `python -m benchmarks.recipe_cost --recipe 3b --grad_accum 8`) only with micro-batches of
    # 48: in-batch negatives then come from each micro-batch, not the global 384.
    config.train.grad_accum_steps = 8
    return config
