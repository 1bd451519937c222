"""Qwen2-VL / Qwen2.5-VL backbones against transformers' PyTorch models (the reference).

Tiny random models (hidden 64, 2 layers, 4 heads / 2 kv heads, vision depth 2) are built with
transformers, saved with `save_pretrained`, loaded with our `load_hf`, and their last hidden
states compared with `hf_model.model(...).last_hidden_state` on every non-padding position.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from metaembed_jax.models import load_hf

VOCAB = 300
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, PAD = 290, 291, 292, 293, 0
MERGE = 2
TOLERANCE_F32 = 1e-4


def tiny_hf_config(model_type):
    import transformers

    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0),
    )
    tokens = dict(
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    if model_type == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)


def build_hf_model(model_type, seed=0):
    import transformers

    torch.manual_seed(seed)
    cls = {
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
    }[model_type]
    model = cls(tiny_hf_config(model_type)).eval()
    # Random init leaves biases and norm scales at 0 / 1: perturb them so the loader is checked.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def checkpoint(request, tmp_path_factory):
    """(model_type, hf_model, checkpoint dir, our float32 backbone) per model type."""
    model_type = request.param
    hf_model = build_hf_model(model_type)
    path = tmp_path_factory.mktemp(model_type)
    hf_model.save_pretrained(path)
    return model_type, hf_model, path, load_hf(path, dtype=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Inputs: generated images through transformers' PIL image processor, pads expanded by hand
# ---------------------------------------------------------------------------------------------


def process_images(sizes, seed=0):
    """(pixel_values [P, C*T*ps*ps] float32, image_grid_thw [N, 3]) for random RGB images."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for (h, w) in sizes]
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 84)
    out = processor(images=images, return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int32)


def make_row(segments, grids, rng):
    """Token ids for a list of segments: an int = that many random text tokens, "img" = the next
    image (vision_start, its pads, vision_end)."""
    ids, grids = [], iter(grids)
    for segment in segments:
        if segment == "img":
            count = int(np.prod(next(grids))) // MERGE**2
            ids += [VISION_START] + [IMAGE_PAD] * count + [VISION_END]
        else:
            ids += rng.integers(1, 280, segment).tolist()
    return ids


def make_batch(rows, image_sizes=(), seed=0):
    """Left-padded batch from `rows` (lists of segments, images in order of appearance)."""
    rng = np.random.default_rng(seed)
    pixel_values, grid = process_images(image_sizes, seed) if image_sizes else (None, None)
    grids = iter([] if grid is None else grid.tolist())
    token_rows = []
    for segments in rows:
        row_grids = [next(grids) for s in segments if s == "img"]
        token_rows.append(make_row(segments, row_grids, rng))
    length = max(len(r) for r in token_rows)
    input_ids = np.full((len(rows), length), PAD, np.int32)
    attention_mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(token_rows):
        input_ids[i, length - len(row) :] = row
        attention_mask[i, length - len(row) :] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixel_values is not None:
        batch.update(pixel_values=pixel_values, image_grid_thw=grid)
    return batch


def hf_last_hidden(hf_model, batch):
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    kwargs["input_ids"] = kwargs["input_ids"].long()
    if "image_grid_thw" in kwargs:
        kwargs["image_grid_thw"] = kwargs["image_grid_thw"].long()
        kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == IMAGE_PAD).int()
    with torch.no_grad():
        return hf_model.model(**kwargs).last_hidden_state.float().numpy()


@nnx.jit
def jax_forward(model, batch):
    return model(**batch)


def max_diff_on_real_tokens(ours, reference, attention_mask):
    real = np.asarray(attention_mask).astype(bool)
    return float(np.abs(np.asarray(ours, np.float32)[real] - reference[real]).max())


TEXT_ROWS = [[12], [5], [9]]
ONE_IMAGE_ROWS = [[3, "img", 6]]
MIXED_ROWS = [["img", 7], [4], [2, "img", 3, "img", 2]]  # 3 images, one text-only row
MIXED_SIZES = [(56, 84), (56, 56), (28, 56)]


@pytest.mark.parametrize(
    "rows,sizes",
    [(TEXT_ROWS, ()), (ONE_IMAGE_ROWS, [(56, 56)]), (MIXED_ROWS, MIXED_SIZES)],
    ids=["text_only", "one_image", "mixed_left_padded"],
)
def test_hidden_states_match_transformers(checkpoint, rows, sizes):
    """Last hidden states equal HF's on every real token (float32, <= 1e-4)."""
    model_type, hf_model, _, model = checkpoint
    if sizes and model.visual is None:
        pytest.skip("vision tower not available yet")
    batch = make_batch(rows, sizes)
    diff = max_diff_on_real_tokens(
        jax_forward(model, batch), hf_last_hidden(hf_model, batch), batch["attention_mask"]
    )
    assert diff <= TOLERANCE_F32, f"{model_type}: max abs diff {diff}"
