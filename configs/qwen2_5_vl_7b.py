"""MetaEmbed on Qwen2.5-VL-7B, the paper's reference recipe (DESIGN.md).

LoRA r=32, alpha=32, dropout 0.1 on q/k/v/o/gate/up/down of the language model, meta tokens
(16 + 64) trained fully; AdamW lr 1e-4, 500 warm-up steps, 4000 steps, global batch 384;
bfloat16 compute with float32 master weights; gradient checkpointing; images up to 1024 merged
visual tokens. `config.init_from` must be a local copy of the checkpoint, e.g.
    huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct \
        --local-dir checkpoints/Qwen2.5-VL-7B-Instruct

Variants: `configs/qwen2_5_vl_7b.py:nommr` (loss on the full budget only), `:single`
(one vector per item, last-token readout) and `:gradcache` (the same recipe on fewer devices:
every device FSDP, the 384-example contrastive batch in 8 gradient-cached micro-batches of 48).
"""

from metaembed_jax.training.recipes import reference_recipe


def get_config(variant: str | None = None):
    config = reference_recipe("checkpoints/Qwen2.5-VL-7B-Instruct", variant)
    # 7B on one 8-GPU host / a v5p-8: 4-way FSDP x 2-way data (-1 = the rest).
    config.mesh.data = -1
    config.mesh.fsdp = 4
    if variant == "gradcache":
        # Fewer devices (e.g. 4 GPUs): parameters and optimizer state split over all of them,
        # activations of one micro-batch of 384 / 8 = 48 examples at a time (12 per device on
        # 4); the loss still contrasts every query with all 384 positives.
        config.mesh.data = 1
        config.mesh.fsdp = -1
        config.train.grad_accum_steps = 8
    return config
