"""Demo on PaliGemma: a tiny PaliGemma-shaped MetaEmbed (SigLIP + Gemma) trained from scratch on
the built-in synthetic dataset, on CPU, with the recipe of configs/demo.py.

    python -m metaembed_jax data --config configs/demo_paligemma.py
    python train.py --config configs/demo_paligemma.py --workdir runs/demo_paligemma
    python eval.py --config configs/demo_paligemma.py --workdir runs/demo_paligemma

The built-in tokenizer carries this family's special tokens (`<pad> <eos> <bos> <image>`), so
the dataset lives in its own `data.dir`. Variants `:nommr`, `:single` as configs/demo.py;
`:gemma2` (or `:gemma2_nommr`, ...) trains a PaliGemma 2-shaped model (Gemma 2 decoder).
"""

import os

from metaembed_jax.models.paligemma import tiny_config
from metaembed_jax.training.recipes import apply_variant, load_recipe

# The demo recipe (schedule, loss, batch, data, mesh), read from its file beside this one.
DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config(variant: str | None = None):
    text_model_type, _, variant = _split(variant)
    config = load_recipe(DEMO)
    # Tiny PaliGemma: 2 Gemma layers of width 128 (4 heads of 32, 1 kv head), a 2-layer SigLIP
    # tower of width 32; 56 px images of 14 px patches = 16 `<image>` tokens each.
    # vocab_size 0 = the built-in tokenizer's size; `<image>` is its id 3.
    config.model.hf_config = tiny_config(
        0, text_model_type=text_model_type, image_size=56, hidden_size=128, intermediate_size=256,
        head_dim=32,
    )  # fmt: skip
    # The built-in tokenizer of another family lacks `<bos>` / `<image>`: a data dir of its own.
    config.data.dir = "data_cache_paligemma"
    # 16 image tokens + `<bos>` + the prompt fit 64 tokens.
    config.data.length_buckets = (32, 64)
    return apply_variant(config, variant)


def _split(variant: str | None) -> tuple[str, str, str | None]:
    """ "gemma2_nommr" -> ("gemma2", "_", "nommr"); "nommr" -> ("gemma", "", "nommr")."""
    if variant and variant.startswith("gemma2"):
        rest = variant[len("gemma2") :].lstrip("_")
        return "gemma2", "_", rest or None
    return "gemma", "", variant
