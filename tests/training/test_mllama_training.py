"""MetaEmbed on Mllama through the normal train step: two steps on a mesh of 8 CPU devices equal
one device (tiny random Mllama, R_q = 4, R_c = 8; rows with a one- or two-tile image and
text-only rows). Two steps, because a fresh model's cross-attention gates are 0: the first step
moves them, the second runs (and differentiates) the cross-attention and vision paths."""

import jax
import numpy as np
from ml_collections import ConfigDict

from metaembed_jax import sharding
from metaembed_jax.models.mllama import tiny_config
from metaembed_jax.models.mllama.config import SPECIAL_TOKENS
from tests import helpers
from tests.training.test_training import run_steps

VOCAB, TILES, TILE = 96, 4, 28  # transformers requires 4 tiles
IMAGE, BOS = SPECIAL_TOKENS.index("<|image|>"), SPECIAL_TOKENS.index("<|begin_of_text|>")


def random_side(rng, batch, length=20, image_every=2):
    """Left-padded Mllama features: every `image_every`-th row is `<|image|> <bos> text` with one
    image of 1 or 2 tiles (aspect ratio id 1 = 1x1, 2 = 1x2), the others `<bos> text` with an
    empty image slot (aspect ratio id 0, tile 0 of the mask set, as transformers pads)."""
    input_ids = np.zeros((batch, length), np.int32)
    attention_mask = np.zeros((batch, length), np.int32)
    pixel_values = np.zeros((batch, 1, TILES, 3, TILE, TILE), np.float32)
    aspect_ratio_ids = np.zeros((batch, 1), np.int32)
    aspect_ratio_mask = np.zeros((batch, 1, TILES), np.int32)
    aspect_ratio_mask[:, :, 0] = 1
    cross = np.zeros((batch, length, 1, TILES), np.int32)
    for b in range(batch):
        tokens = [BOS, *rng.integers(len(SPECIAL_TOKENS), VOCAB, int(rng.integers(3, 12)))]
        start = length - len(tokens) - 1
        if b % image_every == 0:
            tiles = 1 + b // image_every % 2
            tokens = [IMAGE, *tokens]
            pixel_values[b, 0, :tiles] = rng.normal(size=(tiles, 3, TILE, TILE))
            aspect_ratio_ids[b, 0] = tiles
            aspect_ratio_mask[b, 0, :tiles] = 1
            cross[b, start:, 0, :tiles] = 1  # the image token and every token after it
        start = length - len(tokens)
        input_ids[b, start:] = tokens
        attention_mask[b, start:] = 1
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        aspect_ratio_ids=aspect_ratio_ids,
        aspect_ratio_mask=aspect_ratio_mask,
        cross_attention_mask=cross,
    )


def test_steps_on_8_devices_equal_one_device():
    """A (data 2, fsdp 2, tensor 2) mesh: loss, group losses and gradient norm of each step and
    the updated weights."""
    config = helpers.tiny_run_config(r_q=4, r_c=8)
    config.model.hf_config = ConfigDict(
        tiny_config(VOCAB, vision_config=dict(max_num_tiles=TILES, image_size=TILE))
    )
    config.loss.groups = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0))
    rng = np.random.default_rng(0)
    batches = [
        {side: random_side(rng, 8) for side in ("query", "positive", "negative")} for _ in range(2)
    ]
    want_history, want_params, _, _ = run_steps(config, None, batches)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    history, params, _, _ = run_steps(config, mesh, batches)
    for got, want in zip(history, want_history, strict=True):
        for key in ("loss", "group_losses", "grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
