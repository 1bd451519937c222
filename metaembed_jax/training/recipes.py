"""The paper's reference training recipe, shared by configs/qwen2_5_vl_{3b,7b,32b}.py."""

from __future__ import annotations

import importlib.util
import os

from metaembed_jax.training.config import LORA_TARGETS, base_config


def load_recipe(spec: str | os.PathLike):
    """A recipe file's config, as train.py / eval.py read `--config`: ``path.py`` calls its
    ``get_config()``, ``path.py:variant`` its ``get_config("variant")``."""
    path, _, variant = os.fspath(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


# Micro-batches of the "gradcache" variant (a recipe may choose another count for its size).
GRAD_CACHE_STEPS = 4


def apply_variant(config, variant: str | None):
    """The paper's ablations: "mmr" (default), "nommr" (full budget only), "single" (1 vector);
    and "gradcache": the MMR recipe with its global batch trained as one contrastive batch in
    `GRAD_CACHE_STEPS` gradient-cached micro-batches (less activation memory, same loss)."""
    if variant in (None, "", "mmr"):
        return config
    if variant == "nommr":
        config.loss.variant = "nommr"
    elif variant == "single":
        config.loss.variant = "single"
        config.model.readout = "last_token"
    elif variant == "gradcache":
        config.train.grad_cache = True
        config.train.grad_accum_steps = GRAD_CACHE_STEPS
    else:
        raise ValueError(f"config variant {variant!r}; expected mmr, nommr, single or gradcache")
    return config


def reference_recipe(init_from: str, variant: str | None = None):
    config = base_config()
    config.init_from = init_from
    config.model.num_query_tokens = 16
    config.model.num_candidate_tokens = 64
    config.model.dtype = "bfloat16"  # compute
    config.model.param_dtype = "float32"  # master weights
    config.model.remat = "full"  # gradient checkpointing of every decoder layer
    config.lora.enabled = True
    config.lora.rank = 32
    config.lora.alpha = 32.0
    config.lora.dropout = 0.1
    config.lora.targets = LORA_TARGETS
    config.loss.temperature = 0.03
    config.optimizer.lr = 1e-4
    config.optimizer.warmup_steps = 500
    config.optimizer.schedule = "linear"
    config.train.steps = 4000
    config.train.batch_size = 384
    config.train.log_every = 10
    config.checkpoint.every = 500
    config.checkpoint.keep = 3
    # Training data: MMEB-style pairs converted by `python -m metaembed_jax.data.build`.
    config.data.name = "mmeb"
    config.data.max_pixels = 1024 * 28 * 28  # up to 1024 merged visual tokens per image
    config.data.min_pixels = 4 * 28 * 28
    config.data.length_buckets = (256, 512, 1024, 2048)
    return apply_variant(config, variant)
