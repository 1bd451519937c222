"""Demo on Llama-3.2-Vision (Mllama): a tiny Mllama-shaped MetaEmbed (tiled vision encoder +
Llama 3 decoder with gated cross-attention) trained from scratch on the built-in synthetic
dataset, on CPU, with the recipe of configs/demo.py.

    python -m metaembed_jax data --config configs/demo_mllama.py
    python train.py --config configs/demo_mllama.py --workdir runs/demo_mllama
    python eval.py --config configs/demo_mllama.py --workdir runs/demo_mllama

Images do not enter the sequence (one `<|image|>` token each; the decoder cross-attends to the
vision states). The built-in tokenizer carries this family's special tokens (Llama 3's pad,
`<|begin_of_text|>`, header and end-of-turn tokens, `<|image|>`), so the dataset lives in its
own `data.dir`. Variants `:nommr`, `:single` as configs/demo.py.
"""

import os

from metaembed_jax.models.mllama import tiny_config
from metaembed_jax.training.recipes import apply_variant, load_recipe

# The demo recipe (schedule, loss, batch, data, mesh), read from its file beside this one.
DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
TILE = 56  # the demo's 56 px images are one tile each (of up to 4)


def get_config(variant: str | None = None):
    config = load_recipe(DEMO)
    # Tiny Mllama: 4 decoder layers of width 128 (4 heads of 32, 2 kv heads), cross-attention
    # at layers 1 and 3; a vision encoder of width 64 (2 local + 1 global layers) on 56 px tiles
    # of 14 px patches. vocab_size 0 = the built-in tokenizer's size.
    config.model.hf_config = tiny_config(
        0,
        text_config=dict(
            hidden_size=128, intermediate_size=256, cross_attention_layers=[1, 3]
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=128, image_size=TILE,
            vision_output_dim=192,
        ),
    )  # fmt: skip
    # The built-in tokenizer of another family lacks Llama 3's tokens: a data dir of its own.
    config.data.dir = "data_cache_mllama"
    config.data.mllama_tile_size = TILE
    # transformers' MllamaConfig requires 4 tiles (its aspect-ratio table): a 56 px image
    # fills tile 0, the other three are masked.
    config.data.mllama_max_tiles = 4
    # One `<|image|>` token per image: prompts are short.
    config.data.length_buckets = (32, 64)
    return apply_variant(config, variant)
