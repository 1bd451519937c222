"""MetaEmbed equals transformers' Qwen2.5-VL given the meta tokens as extra embedding rows appended
after the content (positions from `get_rope_index` with the rows counted as text), read at the
meta positions and L2-normalised. Also: readout slicing, the last-token baseline, input errors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from metaembed_jax import MetaEmbed
from metaembed_jax.models import qwen2_vl
from metaembed_jax.models.qwen2_vl.modeling import append_text_positions

IMAGE_TOKEN, VISION_START, VISION_END, TEXT_TOKEN = 5, 3, 4, 7  # 5: not the tokenizer's 6
R_Q, R_C = 2, 3


def tiny_config():
    config = qwen2_vl.tiny_config(
        128, hidden=64, vision_hidden=32, vision_depth=2, image_token_id=IMAGE_TOKEN
    )
    return Qwen2_5_VLConfig(**config)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    hf_model = Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()
    directory = tmp_path_factory.mktemp("qwen2_5_vl_tiny")
    hf_model.save_pretrained(directory)
    return directory, hf_model


@pytest.fixture(scope="module")
def model(checkpoint):
    directory, _ = checkpoint
    return MetaEmbed.from_pretrained(directory, R_Q, R_C, rngs=nnx.Rngs(0))


def left_padded(rows, length):
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return ids, mask


def text_batch():
    rng = np.random.default_rng(0)
    return left_padded([rng.integers(10, 128, 9), rng.integers(10, 128, 5)], 10)


def image_batch():
    """Two items: one 56x56 image (4 merged tokens), one 56x112 image (8 merged tokens)."""
    rng = np.random.default_rng(1)
    grids = np.array([[1, 4, 4], [1, 4, 8]], np.int32)
    rows = []
    for grid in grids:
        pads = [IMAGE_TOKEN] * (int(np.prod(grid)) // 4)
        rows.append([11, VISION_START, *pads, VISION_END, *rng.integers(10, 128, 3)])
    ids, mask = left_padded(rows, 16)
    pixels = rng.normal(size=(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14)).astype(np.float32)
    return ids, mask, pixels, grids


def hf_meta_states(hf_model, meta_tokens, ids, mask, pixels=None, grids=None):
    """The reference: HF embeddings (+ image features) with meta rows appended, HF positions."""
    base = hf_model.model
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    count = meta_tokens.shape[0]
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids_t)
        if pixels is not None:
            features = torch.cat(
                base.get_image_features(torch.tensor(pixels), torch.tensor(grids)).pooler_output
            )
            image_mask = (ids_t == IMAGE_TOKEN)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(image_mask, features)
        meta = torch.tensor(np.asarray(meta_tokens))[None].expand(ids.shape[0], -1, -1)
        embeds = torch.cat([embeds, meta], dim=1)
        ext_ids = torch.cat([ids_t, torch.full((ids.shape[0], count), TEXT_TOKEN)], dim=1)
        ext_mask = torch.cat([mask_t, torch.ones((ids.shape[0], count), dtype=torch.long)], 1)
        if grids is not None:
            positions, _ = base.get_rope_index(
                ext_ids,
                (ext_ids == IMAGE_TOKEN).int(),
                image_grid_thw=torch.tensor(grids),
                attention_mask=ext_mask,
            )
        else:
            positions = (ext_mask.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
        hidden = base.language_model(
            inputs_embeds=embeds, attention_mask=ext_mask, position_ids=positions
        ).last_hidden_state[:, -count:]
    hidden = hidden.numpy().astype(np.float64)
    return hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)


@pytest.mark.parametrize("batch", ["text", "image"])
def test_meta_embeddings_equal_hf_with_extra_embedding_rows(checkpoint, model, batch):
    _, hf_model = checkpoint
    if batch == "text":
        ids, mask = text_batch()
        pixels = grids = None
    else:
        ids, mask, pixels, grids = image_batch()
    reference = hf_meta_states(hf_model, model.meta_tokens[...], ids, mask, pixels, grids)
    query = model.embed(
        "query", input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids
    )
    candidate = model.embed(
        "candidate", input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids
    )
    assert query.shape == (2, R_Q, 64) and candidate.shape == (2, R_C, 64)
    assert query.dtype == jnp.float32
    np.testing.assert_allclose(query, reference[:, :R_Q], atol=1e-4)
    np.testing.assert_allclose(candidate, reference[:, R_Q:], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(candidate, axis=-1), 1.0, atol=1e-5)


def test_last_token_readout_is_the_last_content_state(checkpoint):
    directory, hf_model = checkpoint
    single = MetaEmbed.from_pretrained(directory, R_Q, R_C, readout="last_token", rngs=nnx.Rngs(0))
    ids, mask = text_batch()
    with torch.no_grad():
        positions = (torch.tensor(mask).cumsum(-1) - 1).clamp(min=0)
        hidden = (
            hf_model.model.language_model(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask),
                position_ids=positions,
            )
            .last_hidden_state[:, -1:]
            .numpy()
        )
    reference = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
    for side in ("query", "candidate"):
        vectors = single.embed(side, input_ids=ids, attention_mask=mask)
        assert vectors.shape == (2, 1, 64)
        np.testing.assert_allclose(vectors, reference, atol=1e-4)


def test_appended_positions_continue_after_the_largest():
    positions = jnp.array([[[0, 0, 1, 2, 2], [0, 0, 1, 1, 5]]] * 3)  # [3, B=2, L=5]
    positions = positions.at[1, 0, 3].set(9)  # an image's height index beyond the text
    appended = append_text_positions(positions, 2)
    np.testing.assert_array_equal(appended[:, 0], [[10, 11]] * 3)
    np.testing.assert_array_equal(appended[:, 1], [[6, 7]] * 3)
    np.testing.assert_array_equal(append_text_positions(positions[0], 1), [[3], [6]])


def test_bad_inputs_are_clear_errors(model):
    ids, mask = text_batch()
    with pytest.raises(ValueError, match="side="):
        model.embed("document", input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask"):
        model.embed("query", input_ids=ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="readout="):
        MetaEmbed(model.backbone, readout="mean", rngs=nnx.Rngs(0))


def test_per_example_image_layout_equals_packed(checkpoint, model):
    """`embed` with pixel_values [B, P_ex, D] / image_grid_thw [B, N_ex, 3] (examples with 1, 0
    and 1 images, zero-padded patch and grid rows), jitted, equals the packed layout and HF."""
    _, hf_model = checkpoint
    ids, mask, pixels, grids = image_batch()
    ids = np.concatenate([ids[:1], left_padded([[12, 13, 14]], 16)[0], ids[1:]])
    mask = np.concatenate([mask[:1], left_padded([[12, 13, 14]], 16)[1], mask[1:]])
    per_pixels = np.zeros((3, 36, pixels.shape[1]), np.float32)  # 16 and 32 real patches
    per_pixels[0, :16], per_pixels[2, :32] = pixels[:16], pixels[16:]
    per_grids = np.zeros((3, 2, 3), np.int32)
    per_grids[0, 0], per_grids[2, 0] = grids
    reference = hf_meta_states(hf_model, model.meta_tokens[...], ids, mask, pixels, grids)

    @nnx.jit(static_argnums=1)
    def embed(model, side, features):
        return model.embed(side, **features)

    per_example = dict(
        input_ids=ids, attention_mask=mask, pixel_values=per_pixels, image_grid_thw=per_grids
    )
    packed = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids)
    for side, vectors in (("query", slice(None, R_Q)), ("candidate", slice(R_Q, None))):
        ours = np.asarray(embed(model, side, per_example))
        np.testing.assert_allclose(ours, np.asarray(embed(model, side, packed)), atol=1e-5)
        np.testing.assert_allclose(ours, reference[:, vectors], atol=1e-4)
