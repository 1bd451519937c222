"""Demo: a tiny Qwen2.5-VL-shaped MetaEmbed trained from scratch on the built-in synthetic
dataset, on CPU, in a few minutes (`make demo`).

Variants (the paper's ablations) via the config argument:
  --config configs/demo.py          MetaEmbed with the MMR loss (all 5 budgets)
  --config configs/demo.py:nommr    same model, loss only on the full (16, 64) budget
  --config configs/demo.py:single   one vector per item (last token), single-vector InfoNCE
"""

from metaembed_jax.training.config import base_config
from metaembed_jax.training.recipes import apply_variant
from metaembed_jax.training.testing import tiny_hf_config


def get_config(variant: str | None = None):
    config = base_config()
    config.seed = 0
    # Random initialisation (no checkpoint); vocab_size 0 = the built-in tokenizer's size.
    config.init_from = ""
    # Tiny Qwen2.5-VL: 2 decoder layers of width 64, a 1-block vision tower of width 64.
    config.model.hf_config = tiny_hf_config(
        vocab_size=0, hidden=64, layers=2, vision_hidden=64, vision_depth=1
    )
    config.model.num_query_tokens = 16
    config.model.num_candidate_tokens = 64
    config.model.dtype = "float32"  # bf16 matmuls are slower than f32 on most CPUs
    config.model.remat = "none"

    # From scratch: full training of every weight, a higher learning rate, short warm-up.
    config.lora.enabled = False
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 20
    config.optimizer.schedule = "cosine"
    config.optimizer.end_factor = 0.05
    config.optimizer.weight_decay = 0.01
    config.loss.temperature = 0.05

    config.train.steps = 200
    config.train.batch_size = 32
    config.train.log_every = 10
    config.checkpoint.every = 100
    config.checkpoint.keep = 2
    config.mesh.data = -1  # all local devices (one on a plain CPU run)

    # Images at their generated size: 112 x 112 px = 16 merged image tokens.
    config.data.max_pixels = 112 * 112
    config.data.min_pixels = 56 * 56
    config.data.length_buckets = (32, 64, 128)

    return apply_variant(config, variant)
