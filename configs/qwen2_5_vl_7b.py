"""MetaEmbed on Qwen2.5-VL-7B, the paper's reference recipe (docs/design.md).

LoRA r=32, alpha=32, dropout 0.1 on q/k/v/o/gate/up/down of the language model, meta tokens
(16 + 64) trained fully; AdamW lr 1e-4, 500 warm-up steps, 4000 steps, global batch 384;
bfloat16 compute with float32 master weights; gradient checkpointing; images up to 1024 merged
visual tokens. `config.init_from` is a local copy of the checkpoint or its Hub id (resolved
through the HF cache), e.g.
    hf download Qwen/Qwen2.5-VL-7B-Instruct \
        --local-dir checkpoints/Qwen2.5-VL-7B-Instruct

Variants: `configs/qwen2_5_vl_7b.py:nommr` (loss on the full budget only) and `:single`
(one vector per item, last-token readout).
"""

from metaembed_jax.training.recipes import reference_recipe


def get_config(variant: str | None = None):
    config = reference_recipe("checkpoints/Qwen2.5-VL-7B-Instruct", variant)
    # 7B on one 8-GPU host / a v5p-8: 4-way FSDP x 2-way data (-1 = the rest).
    config.mesh.data = -1
    config.mesh.fsdp = 4
    # Fits 80 GB per device at the longest inputs (2048 tokens + a 1024-token image per side,
    # `python -m benchmarks.recipe_cost --recipe 7b --grad_accum 16`) only with micro-batches of
    # 24: in-batch negatives then come from each micro-batch, not the global 384.
    config.train.grad_accum_steps = 16
    return config
