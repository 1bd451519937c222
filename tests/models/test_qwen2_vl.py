"""Qwen2-VL / Qwen2.5-VL backbones against transformers' PyTorch models (the reference).

Tiny random models (hidden 64, 2 layers, 4 heads / 2 kv heads, vision depth 2) are built with
transformers, saved with `save_pretrained`, loaded with our `load_hf`, and their last hidden
states compared with `hf_model.model(...).last_hidden_state` on every non-padding position.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

from metaembed_jax.models import from_config, layers, load_hf
from metaembed_jax.models import qwen2_vl as qwen
from metaembed_jax.models.qwen2_vl import modeling as qwen_modeling

VOCAB = 300
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, PAD = 290, 291, 292, 293, 0
MERGE = 2
TOLERANCE_F32 = 1e-4


def tiny_hf_config(model_type):
    import transformers

    config = qwen.tiny_config(
        VOCAB,
        model_type=model_type,
        hidden=64,
        vision_hidden=32,
        vision_depth=2,
        image_token_id=IMAGE_PAD,
        video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return transformers.AutoConfig.for_model(**config)


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


def padded_images(batch, extra_patches=8, extra_images=2):
    """The same batch with zero patch rows and all-zero grid rows appended (static buckets)."""
    padded = dict(batch)
    pixel_values, grid = batch["pixel_values"], batch["image_grid_thw"]
    padded["pixel_values"] = np.concatenate(
        [pixel_values, np.zeros((extra_patches, pixel_values.shape[1]), np.float32)]
    )
    padded["image_grid_thw"] = np.concatenate([grid, np.zeros((extra_images, 3), np.int32)])
    return padded


def test_padded_patches_and_grid_rows_are_ignored(checkpoint):
    """Zero patch rows and zero grid rows (bucket padding) change nothing on real tokens."""
    _, hf_model, _, model = checkpoint
    batch = make_batch(MIXED_ROWS, MIXED_SIZES)
    ours = jax_forward(model, padded_images(batch))
    diff = max_diff_on_real_tokens(ours, hf_last_hidden(hf_model, batch), batch["attention_mask"])
    assert diff <= TOLERANCE_F32, f"max abs diff {diff}"


def test_rope_index_matches_get_rope_index(checkpoint):
    """3-D position ids equal HF's get_rope_index everywhere (left padding -> 0), also jitted with
    traced, zero-padded grids."""
    _, hf_model, _, model = checkpoint
    batch = make_batch(MIXED_ROWS + [["img", 1]], [*MIXED_SIZES, (84, 28)])
    input_ids = torch.from_numpy(batch["input_ids"]).long()
    expected, _ = hf_model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == IMAGE_PAD).int(),
        image_grid_thw=torch.from_numpy(batch["image_grid_thw"]).long(),
        attention_mask=torch.from_numpy(batch["attention_mask"]),
    )
    ours = model.position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    np.testing.assert_array_equal(np.asarray(ours), expected.numpy())
    padded = padded_images(batch)
    jitted = jax.jit(model.position_ids)(
        batch["input_ids"], batch["attention_mask"], padded["image_grid_thw"]
    )
    np.testing.assert_array_equal(np.asarray(jitted), expected.numpy())
    text = make_batch(TEXT_ROWS)  # text-only: no grids at all
    text_ids = torch.from_numpy(text["input_ids"]).long()
    expected_text, _ = hf_model.model.get_rope_index(
        text_ids,
        mm_token_type_ids=torch.zeros_like(text_ids).int(),
        attention_mask=torch.from_numpy(text["attention_mask"]),
    )
    ours_text = model.position_ids(text["input_ids"], text["attention_mask"], None)
    np.testing.assert_array_equal(np.asarray(ours_text), expected_text.numpy())


def flat_config(nested):
    """The published Hub spelling: text keys at the top level, `rope_scaling: {type: mrope}` and
    a top-level `rope_theta`."""
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    flat.update(text)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["rope_theta"] = rope["rope_theta"]
    return flat


def test_flat_config_and_in_memory_key_layout(checkpoint, tmp_path):
    """A published flat config.json with `model.language_model.*` / `model.visual.*` keys loads
    to the same model (and transformers reads that config the same way)."""
    import transformers

    _, hf_model, path, _ = checkpoint
    config = flat_config(json.loads((path / "config.json").read_text()))
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf_flat = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf_flat.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert hf_flat.text_config.hidden_size == 64
    tensors = load_file(path / "model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        key = key.replace("model.", "model.language_model.", 1)
        renamed[
            key.replace("visual.", "model.visual.", 1) if key.startswith("visual.") else key
        ] = value
    save_file(renamed, str(tmp_path / "model.safetensors"))
    model = load_hf(tmp_path, dtype=jnp.float32)
    batch = make_batch(ONE_IMAGE_ROWS, [(56, 56)])
    diff = max_diff_on_real_tokens(
        jax_forward(model, batch), hf_last_hidden(hf_model, batch), batch["attention_mask"]
    )
    assert diff <= TOLERANCE_F32, f"max abs diff {diff}"


def test_bfloat16_close_to_float32_reference(checkpoint):
    """bfloat16 params and compute stay close to HF float32 (norms/softmax/rotary in float32)."""
    _, hf_model, path, _ = checkpoint
    model = load_hf(path, dtype=jnp.bfloat16)
    assert model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    batch = make_batch(MIXED_ROWS, MIXED_SIZES)
    ours = jax_forward(model, batch)
    assert ours.dtype == jnp.bfloat16
    reference = hf_last_hidden(hf_model, batch)
    real = batch["attention_mask"].astype(bool)
    error = np.abs(np.asarray(ours, np.float32)[real] - reference[real])
    scale = np.abs(reference[real]).max()
    assert error.max() <= 0.05 * scale and error.mean() <= 0.01 * scale, (error.max(), scale)


# ---------------------------------------------------------------------------------------------
# Pieces without a transformers forward
# ---------------------------------------------------------------------------------------------


def test_both_config_spellings_parse_alike(checkpoint):
    """Nested (transformers 5) and flat (Hub) spellings give the same text config."""
    _, _, path, _ = checkpoint
    nested = json.loads((path / "config.json").read_text())
    parsed = qwen_modeling.text_config(nested)
    assert parsed == qwen_modeling.text_config(flat_config(nested))
    assert (parsed.head_dim, parsed.num_kv_heads, parsed.mrope_section) == (16, 2, (2, 3, 3))
    assert parsed.rope_theta == 10000.0
    with pytest.raises(ValueError, match="mrope_section"):
        qwen_modeling.text_config(
            {**flat_config(nested), "rope_scaling": {"mrope_section": [1, 1, 1]}}
        )
    with pytest.raises(ValueError, match="not supported"):
        qwen_modeling.text_config({**flat_config(nested), "rope_scaling": {"type": "yarn"}})


def test_lora_targets_and_logical_axes(checkpoint):
    """LoRA adapters only on the targeted projections (PEFT's list semantics: every module of
    that name, so Qwen2.5-VL's vision MLP down_proj too), starting as a no-op; every parameter
    carries one logical axis name per dimension."""
    _, hf_model, path, model = checkpoint
    config = json.loads((path / "config.json").read_text())
    lora = layers.LoRASpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    adapted = from_config(config, lora=lora, rngs=nnx.Rngs(1))
    adapter_paths = {
        ".".join(map(str, p[:-1])) for p, _ in nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))
    }
    vision_mlp = {"visual.blocks.mlp.down_proj"} if config["model_type"] == "qwen2_5_vl" else set()
    assert adapter_paths == {
        "layers.self_attn.q_proj",
        "layers.self_attn.v_proj",
        "layers.mlp.down_proj",
        *vision_mlp,
    }
    for path_, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable[...].ndim, (path_, axes)
    kernel_axes = model.layers.self_attn.q_proj.kernel.get_metadata()["out_sharding"]
    assert kernel_axes == ("layers", "embed", "heads")
    # Same base weights + zero-initialised B => same output as the plain model.
    nnx.update(adapted, nnx.state(model, nnx.Param))
    batch = make_batch(TEXT_ROWS)
    diff = max_diff_on_real_tokens(
        jax_forward(adapted, batch), np.asarray(jax_forward(model, batch)), batch["attention_mask"]
    )
    assert diff == 0.0


def test_image_token_count_mismatch_is_a_clear_error(checkpoint):
    _, _, _, model = checkpoint
    batch = make_batch(ONE_IMAGE_ROWS, [(56, 56)])
    batch["input_ids"][0, -1] = IMAGE_PAD
    with pytest.raises(ValueError, match="image_pad"):
        model(**batch)


def test_sharded_load_matches_transformers(checkpoint):
    """Loaded straight onto a (data, fsdp, tensor) = (2, 2, 2) mesh by logical axis names, the
    jitted forward still equals HF's (one model type: the placement does not depend on it)."""
    from metaembed_jax import sharding

    model_type, hf_model, path, _ = checkpoint
    if model_type != "qwen2_5_vl":
        pytest.skip("placement is model-type independent; checked on qwen2_5_vl")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    model = load_hf(path, mesh=mesh, rules=sharding.axis_rules())
    kernel = model.layers.self_attn.q_proj.kernel[...]  # [layers, embed, heads * head_dim]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    batch = make_batch(MIXED_ROWS, MIXED_SIZES)
    diff = max_diff_on_real_tokens(
        jax_forward(model, batch), hf_last_hidden(hf_model, batch), batch["attention_mask"]
    )
    assert diff <= TOLERANCE_F32, f"max abs diff {diff}"


# ---------------------------------------------------------------------------------------------
# Per-example image layout ([B, P_ex, D] / [B, N_ex, 3]) against the packed one and transformers
# ---------------------------------------------------------------------------------------------


def to_per_example(batch, rows, patches_per_example, images_per_example):
    """The packed batch's images regrouped per example (numpy): example b's patches, then zero
    rows up to `patches_per_example`; its grid rows, then zero rows up to `images_per_example`."""
    pixel_values, grid = batch["pixel_values"], batch["image_grid_thw"]
    dim = pixel_values.shape[1]
    out_pixels = np.zeros((len(rows), patches_per_example, dim), np.float32)
    out_grid = np.zeros((len(rows), images_per_example, 3), np.int32)
    image, patch = 0, 0
    for b, segments in enumerate(rows):
        count = sum(1 for s in segments if s == "img")
        example_grid = grid[image : image + count]
        size = int(np.prod(example_grid, axis=-1).sum())
        out_pixels[b, :size] = pixel_values[patch : patch + size]
        out_grid[b, :count] = example_grid
        image, patch = image + count, patch + size
    return {**batch, "pixel_values": out_pixels, "image_grid_thw": out_grid}


def test_pack_example_images_equals_stable_argsort():
    """Real patches first in batch order (a stable argsort of "is padding"), then zeros; grid
    rows flattened; rows rounded up to the multiple; also under jit with a traced grid."""
    rng = np.random.default_rng(0)
    grid = np.array([[[1, 2, 2], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[1, 2, 4], [1, 2, 2]]])
    counts = np.prod(grid, -1).sum(-1)  # 4, 0, 12 of 13 rows each
    pixels = rng.normal(size=(3, 13, 5)).astype(np.float32)
    padding = np.arange(13)[None, :] >= counts[:, None]
    pixels[padding] = 0.0
    order = np.argsort(padding.reshape(-1), kind="stable")
    expected = np.concatenate([pixels.reshape(-1, 5)[order], np.zeros((1, 5), np.float32)])
    for fn in (
        qwen_modeling.pack_example_images,
        jax.jit(qwen_modeling.pack_example_images, static_argnums=2),
    ):
        packed, flat_grid = fn(pixels, grid, 4)
        np.testing.assert_array_equal(np.asarray(packed), expected)  # 39 rows -> 40
        np.testing.assert_array_equal(np.asarray(flat_grid), grid.reshape(-1, 3))


@pytest.mark.parametrize("tower_per_example", [False, True])
def test_per_example_layout_equals_packed_and_transformers(checkpoint, tower_per_example):
    """Examples with 1, 0 and 2 images, patch rows and grid rows zero-padded per example (zero
    grid rows then sit between real ones once flattened), the tower run on the images packed
    or per example (`vision_per_example`): hidden states equal the packed layout's and HF's
    (<= 1e-4), and position ids equal get_rope_index, jitted."""
    _, hf_model, _, model = checkpoint
    packed = make_batch(MIXED_ROWS, MIXED_SIZES)
    per_example = to_per_example(packed, MIXED_ROWS, 40, 3)
    model.vision_per_example = tower_per_example
    try:
        ours = np.asarray(jax_forward(model, per_example))
    finally:
        model.vision_per_example = False
    reference = hf_last_hidden(hf_model, packed)
    mask = packed["attention_mask"]
    assert max_diff_on_real_tokens(ours, reference, mask) <= TOLERANCE_F32
    same = max_diff_on_real_tokens(ours, np.asarray(jax_forward(model, packed)), mask)
    assert same <= 1e-5, same
    input_ids = torch.from_numpy(packed["input_ids"]).long()
    expected, _ = hf_model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == IMAGE_PAD).int(),
        image_grid_thw=torch.from_numpy(packed["image_grid_thw"]).long(),
        attention_mask=torch.from_numpy(mask),
    )
    positions = jax.jit(model.position_ids)(
        per_example["input_ids"], mask, per_example["image_grid_thw"]
    )
    np.testing.assert_array_equal(np.asarray(positions), expected.numpy())


def test_per_example_layout_errors_name_the_example(checkpoint):
    """Mixed layouts, a batch size that differs from input_ids, and an example whose tokens
    disagree with its own grid are refused with the example named."""
    _, _, _, model = checkpoint
    packed = make_batch(MIXED_ROWS, MIXED_SIZES)
    per_example = to_per_example(packed, MIXED_ROWS, 40, 3)
    with pytest.raises(ValueError, match="packed layout"):
        model(**{**per_example, "pixel_values": packed["pixel_values"]})
    with pytest.raises(ValueError, match="batch size 3"):
        model(**{**per_example, "image_grid_thw": per_example["image_grid_thw"][:2]})
    swapped = per_example["image_grid_thw"][[1, 0, 2]]  # example 0's image moved to example 1
    with pytest.raises(ValueError, match="example 0: input_ids hold"):
        model(**{**per_example, "image_grid_thw": swapped})
    with pytest.raises(
        ValueError, match="example 0: pixel_values has 20 patches; image_grid_thw needs 24"
    ):
        model(**{**per_example, "pixel_values": per_example["pixel_values"][:, :20]})
