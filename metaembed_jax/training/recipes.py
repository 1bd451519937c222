"""Recipes: where the recipe files (configs/*.py) are (the checkout's top-level configs/ folder,
or the copy an installed package carries as metaembed_jax/configs/: pyproject maps one onto the
other), how one is loaded, its variants, and the paper's reference recipe shared by
configs/qwen2_5_vl_{3b,7b,32b}.py and the other backbones' recipes."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from metaembed_jax.training.config import LORA_TARGETS, base_config

_PACKAGE = Path(__file__).resolve().parents[1]  # metaembed_jax/


def config_dir() -> Path:
    """The folder of bundled recipes: installed copy first, else the source checkout's."""
    installed = _PACKAGE / "configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "configs"


def config_names() -> list[str]:
    """Names of the bundled recipes (file stems), sorted."""
    return sorted(p.stem for p in config_dir().glob("*.py") if not p.stem.startswith("_"))


def config_path(name: str) -> Path:
    """The file of bundled recipe `name` ("demo" or "demo.py"); FileNotFoundError listing the
    bundled names otherwise."""
    path = config_dir() / (name if name.endswith(".py") else f"{name}.py")
    if not path.is_file():
        bundled = ", ".join(config_names())
        raise FileNotFoundError(f"no recipe file or bundled recipe {name!r}; bundled: {bundled}")
    return path


def resolve_config_value(value: str) -> str:
    """`file.py[:variant]` stays as it is where the file exists; a bundled name becomes its path."""
    spec, colon, variant = value.partition(":")
    if os.path.exists(spec) or os.sep in spec:
        return value
    return f"{config_path(spec)}{colon}{variant}"


def resolve_config_argv(argv: Sequence[str]) -> list[str]:
    """argv with the value of `--config NAME` / `--config=NAME` resolved by resolve_config_value
    (dotted overrides such as `--config.train.steps=5` are left alone)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config_value(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_value(out[i + 1])
    return out


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
    # Qwen's vision tower per example: split over the batch shards (packed, the 3B step needs
    # 253 GB of temporaries a v5p chip; docs/tpu.md). Other families have no such choice.
    config.model.vision_per_example = True
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
    # Training data: MMEB-style pairs converted by `metaembed data`.
    config.data.name = "mmeb"
    config.data.max_pixels = 1024 * 28 * 28  # up to 1024 merged visual tokens per image
    config.data.min_pixels = 4 * 28 * 28
    config.data.length_buckets = (256, 512, 1024, 2048)
    return apply_variant(config, variant)
