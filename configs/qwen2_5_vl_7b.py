"""MetaEmbed on Qwen2.5-VL-7B, the paper's reference recipe (docs/design.md).

LoRA r=32, alpha=32, dropout 0.1 on q/k/v/o/gate/up/down of the language model, meta tokens
(16 + 64) trained fully; AdamW lr 1e-4, 500 warm-up steps, 4000 steps, global batch 384;
bfloat16 compute with float32 master weights; gradient checkpointing; images up to 1024 merged
visual tokens. `config.init_from` is a local copy of the checkpoint or its Hub id (resolved
through the HF cache), e.g.
    hf download Qwen/Qwen2.5-VL-7B-Instruct \
        --local-dir checkpoints/Qwen2.5-VL-7B-Instruct

Variants: `configs/qwen2_5_vl_7b.py:nommr` (loss on the full budget only), `:single`
(one vector per item, last-token readout) and `:gradcache` (the same recipe on fewer devices:
every device FSDP, the 384-example contrastive batch in 32 gradient-cached micro-batches of 12).
Every variant accumulates with gradient caching on.
"""

from metaembed_jax.training.recipes import reference_recipe


def get_config(variant: str | None = None):
    config = reference_recipe("checkpoints/Qwen2.5-VL-7B-Instruct", variant)
    # 7B on one 8-GPU host / 8 TPU chips (v5p:2x2x2, Cloud name v5p-16): 4-way FSDP x 2-way
    # data (-1 = the rest).
    config.mesh.data = -1
    config.mesh.fsdp = 4
    # Fits 80 GB per device at the longest inputs (2048 tokens + a 1024-token image per side;
    # an estimate of XLA:CPU, not yet confirmed by the TPU compiler: docs/tpu.md) only with
    # micro-batches of 24. Gradient caching keeps the paper's objective: every query is still
    # contrasted with all 384 positives of the step (without it, only with its micro-batch's 24).
    config.train.grad_accum_steps = 16
    config.train.grad_cache = True
    if variant == "gradcache":
        # Fewer devices (e.g. 4 GPUs): parameters and optimizer state split over all of them
        # (4-way, as in the default mesh), micro-batches of 384 / 32 = 12, i.e. 3 examples per
        # device at a time as in the default recipe on 8.
        config.mesh.data = 1
        config.mesh.fsdp = -1
        config.train.grad_accum_steps = 32
    return config
