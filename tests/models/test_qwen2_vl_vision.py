"""The Qwen2-VL / Qwen2.5-VL vision towers against transformers' `model.visual` (tiny random
models saved with `save_pretrained` and loaded through the real loader rules): merged features
for one image, images of different sizes, padded inputs, bfloat16; layout pieces (rotary
positions, window permutation) against HF's `vision_utils`; config spellings and errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers import vision_utils as hf_vision
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding

from metaembed_jax.models import hf_loading, layers, rules
from metaembed_jax.models.qwen2_vl import segment_attention, vision
from metaembed_jax.models.qwen2_vl.config import tiny_config
from metaembed_jax.models.qwen2_vl.params import vision_rules
from metaembed_jax.models.qwen2_vl.segment_attention import (
    blocked_attention,
    dense_attention,
    local_attention,
    segment_blocks,
)
from metaembed_jax.models.qwen2_vl.vision import (
    VisionTower,
    parse_vision_config,
    patch_layout,
    rotary_cos_sin,
)
from tests.helpers import register_loader_family

# Tower sizes of this file on the family's tiny config. Qwen2.5-VL: window 56 px = 2x2 merged
# units, so a 56x84 image (merged 2x3) splits into 2 windows; an output width (40) of its own.
TOWERS = {
    "qwen2_5_vl": (
        3,
        {"intermediate_size": 48, "out_hidden_size": 40, "fullatt_block_indexes": [1]},
    ),
    "qwen2_vl": (2, {"hidden_size": 40}),
}
ROPE = {"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 10000.0}
CONFIGS = {
    model_type: tiny_config(
        64,
        model_type=model_type,
        hidden=32,
        layers=1,
        vision_depth=depth,
        vision=tower,
        text={"rope_parameters": ROPE},
    )  # fmt: skip
    for model_type, (depth, tower) in TOWERS.items()
}
VISION = {model_type: config["vision_config"] for model_type, config in CONFIGS.items()}
HF_CLASSES = {
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
}
FLOAT32_TOLERANCE = 1e-4
hf_vision_rotary = {
    "qwen2_5_vl": Qwen2_5_VLVisionRotaryEmbedding,
    "qwen2_vl": Qwen2VLVisionRotaryEmbedding,
}


class VisionOnly(nnx.Module):
    """A test backbone that is just the tower, mounted at `visual` like the full backbone."""

    def __init__(self, config, *, dtype, param_dtype, lora, remat, rngs):
        model_type = config["source_model_type"]
        self.visual = VisionTower(
            config["vision_config"],
            model_type,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            rngs=rngs,
        )


def vision_only_rules(config):
    # Language-model tensors are deliberately unused here.
    tower_rules = vision_rules(config["vision_config"], config["source_model_type"])
    return tower_rules + [rules.Rule(r"(?!visual\.).*", None)]


for _model_type in HF_CLASSES:
    register_loader_family(f"test_vision_{_model_type}", VisionOnly, vision_only_rules)


def randomise(module, seed):
    """HF's init (std 0.02, unit norms) makes outputs tiny; larger weights make the 1e-4 bound
    meaningful."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = "norm" in name or "ln_q" in name
            param.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else 0.2 * noise)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def checkpoint(request, tmp_path_factory):
    """(model_type, HF visual module in float32, checkpoint dir loadable by `load_hf`)."""
    model_type = request.param
    config_class, model_class = HF_CLASSES[model_type]
    torch.manual_seed(0)
    hf_model = model_class(
        config_class(
            text_config=CONFIGS[model_type]["text_config"], vision_config=VISION[model_type]
        )
    )
    randomise(hf_model.model.visual, seed=1)
    hf_model.eval()
    path = tmp_path_factory.mktemp(model_type)
    hf_model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=f"test_vision_{model_type}", source_model_type=model_type)
    (path / "config.json").write_text(json.dumps(config))
    return model_type, hf_model.model.visual, path


def images_to_patches(sizes, seed=0):
    """PIL images of random pixels (h, w) -> (pixel_values, image_grid_thw) via HF's processor."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112)
    out = processor(images=images, return_tensors="np")
    return out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int32)


def hf_features(visual, pixel_values, grid_thw, dtype=torch.float32):
    with torch.no_grad():
        out = visual.to(dtype)(torch.from_numpy(pixel_values).to(dtype), torch.from_numpy(grid_thw))
    visual.to(torch.float32)
    return out.pooler_output.float().numpy()


def pad(pixel_values, grid_thw, extra_patches, extra_images):
    pixel_values = np.concatenate([pixel_values, np.zeros((extra_patches, pixel_values.shape[1]))])
    grid_thw = np.concatenate([grid_thw, np.zeros((extra_images, 3), grid_thw.dtype)])
    return pixel_values.astype(np.float32), grid_thw


def with_video(pixel_values, grid_thw, seed=0):
    """Insert a 2-frame entry (random patch rows, grid (2, 4, 4)) after the first image."""
    rng = np.random.default_rng(seed)
    video = rng.normal(size=(32, pixel_values.shape[1])).astype(np.float32)
    first = int(np.prod(grid_thw[0]))
    pixel_values = np.concatenate([pixel_values[:first], video, pixel_values[first:]])
    grid_thw = np.concatenate([grid_thw[:1], np.array([[2, 4, 4]], np.int32), grid_thw[1:]])
    return pixel_values, grid_thw


@pytest.mark.parametrize(
    "sizes, video",
    [([(56, 84)], False), ([(56, 56), (56, 112)], False), ([(84, 112), (28, 56)], True)],
)
def test_matches_transformers(checkpoint, sizes, video):
    """Merged features equal HF's pooler_output for one image, images of different sizes, and a
    mix with a 2-frame entry (one attention segment per frame), under jit with a traced grid."""
    model_type, visual, path = checkpoint
    tower = hf_loading.load_hf(path).visual
    pixel_values, grid_thw = images_to_patches(sizes)
    if video:
        pixel_values, grid_thw = with_video(pixel_values, grid_thw)
    expected = hf_features(visual, pixel_values, grid_thw)
    got = nnx.jit(lambda tower, p, g: tower(p, g))(tower, pixel_values, grid_thw)
    assert got.shape == expected.shape
    assert np.abs(expected).max() > 1.0  # the bound below is not trivially met
    np.testing.assert_allclose(np.asarray(got), expected, atol=FLOAT32_TOLERANCE, rtol=0)


@pytest.mark.parametrize("bound", ["hint", "concrete", "too_small"])
def test_per_image_attention_matches_transformers(checkpoint, bound):
    """Per-frame / per-window blocked attention equals HF: with a static per-image bound under
    jit (traced grid), with a concrete grid (exact blocks), and with a bound the input breaks
    (the program falls back to the packed path). Images of different sizes, a 2-frame entry,
    padding patches and an all-zero grid row."""
    model_type, visual, path = checkpoint
    tower = hf_loading.load_hf(path).visual
    pixel_values, grid_thw = with_video(*images_to_patches([(84, 112), (28, 56), (56, 56)]))
    expected = hf_features(visual, pixel_values, grid_thw)
    padded_pixels, padded_grid = pad(pixel_values, grid_thw, extra_patches=36, extra_images=1)
    if bound == "concrete":
        got = tower(padded_pixels, padded_grid)
    else:
        largest = int(np.max(grid_thw[:, 1] * grid_thw[:, 2]))
        limit = largest if bound == "hint" else largest // 2
        forward = nnx.jit(lambda tower, p, g: tower(p, g, max_image_patches=limit))
        got = forward(tower, padded_pixels, padded_grid)
    got = np.asarray(got)
    np.testing.assert_allclose(got[: len(expected)], expected, atol=FLOAT32_TOLERANCE, rtol=0)
    np.testing.assert_array_equal(got[len(expected) :], 0.0)


def test_per_example_layout_attends_per_frame_without_fallback(checkpoint, monkeypatch):
    """The per-example layout (`images_per_example`, traced grid): full-attention blocks run
    over whole examples masked to frames, with no dense fallback in the program; equal to HF on
    examples holding 2 images, a 2-frame entry and nothing, with padding rows and zero grid
    rows."""
    from metaembed_jax.models.qwen2_vl.modeling import pack_example_images

    model_type, visual, path = checkpoint
    tower = hf_loading.load_hf(path).visual
    pixel_values, grid_thw = with_video(*images_to_patches([(84, 112), (28, 56), (56, 56)]))
    expected = hf_features(visual, pixel_values, grid_thw)
    # Examples: [image 0, video], [], [image 1, image 2]; 120 patch rows, 2 grid rows each.
    counts = np.prod(grid_thw, axis=-1)
    groups = [[0, 1], [], [2, 3]]
    per_pixels = np.zeros((3, 120, pixel_values.shape[1]), np.float32)
    per_grid = np.zeros((3, 2, 3), np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for b, rows in enumerate(groups):
        if rows:
            block = pixel_values[starts[rows[0]] : starts[rows[-1] + 1]]
            per_pixels[b, : len(block)] = block
            per_grid[b, : len(rows)] = grid_thw[rows]

    def forward(tower, p, g):
        packed, grid = pack_example_images(p, g, multiple=4)
        return tower(packed, grid, max_image_patches=p.shape[1], images_per_example=g.shape[1])

    def no_dense(*args, **kwargs):
        raise AssertionError("the dense fallback was traced")

    monkeypatch.setattr(vision, "dense_attention", no_dense)  # not even traced
    got = np.asarray(nnx.jit(forward)(tower, per_pixels, per_grid))
    np.testing.assert_allclose(got[: len(expected)], expected, atol=FLOAT32_TOLERANCE, rtol=0)
    np.testing.assert_array_equal(got[len(expected) :], 0.0)


def test_blocked_attention_equals_dense():
    """segment_blocks + blocked_attention = dense segment-masked attention on real rows, for runs
    of different lengths (some longer than one block) followed by padding; `fits` is False when
    the runs break the static bounds."""
    rng = np.random.default_rng(0)
    lengths = np.array([5, 12, 1, 9, 16, 3])
    segments = np.repeat(np.cumsum(lengths) - lengths, lengths)
    real = len(segments)
    segments = np.concatenate([segments, np.full(7, 999)]).astype(np.int32)
    is_real = np.arange(len(segments)) < real
    query, key, value = (rng.normal(size=(len(segments), 2, 8)).astype(np.float32) for _ in "qkv")
    dense = dense_attention(query, key, value, segments)
    blocks_needed = int(np.sum(-(-lengths // 4)))
    blocks = segment_blocks(jnp.asarray(segments), jnp.asarray(is_real), 16, 4, blocks_needed)
    assert bool(blocks.fits)
    got = jax.jit(lambda q, k, v: blocked_attention(q, k, v, blocks))(query, key, value)
    np.testing.assert_allclose(got[:real], dense[:real], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[real:]), 0.0)
    too_few = segment_blocks(jnp.asarray(segments), jnp.asarray(is_real), 16, 4, blocks_needed - 1)
    too_short = segment_blocks(jnp.asarray(segments), jnp.asarray(is_real), 15, 4, 99)
    assert not bool(too_few.fits) and not bool(too_short.fits)


def test_padding_does_not_change_real_rows(checkpoint, monkeypatch):
    """Padding patch rows and all-zero grid rows leave the real rows unchanged (<= 1e-4 from HF);
    padding output rows come after them and are zero. Full attention runs in query chunks of 16
    here (as it does on long packed sequences)."""
    model_type, visual, path = checkpoint
    monkeypatch.setattr(segment_attention, "DENSE_QUERY_CHUNK", 16)
    tower = hf_loading.load_hf(path).visual
    pixel_values, grid_thw = images_to_patches([(56, 56), (56, 112)])
    expected = hf_features(visual, pixel_values, grid_thw)
    padded_pixels, padded_grid = pad(pixel_values, grid_thw, extra_patches=24, extra_images=2)
    padded_pixels[len(pixel_values) :] = 3.0  # padding content must not matter either
    padded_grid = np.concatenate([padded_grid[:1], np.zeros((1, 3), np.int32), padded_grid[1:]])
    got = np.asarray(nnx.jit(lambda tower, p, g: tower(p, g))(tower, padded_pixels, padded_grid))
    assert got.shape == (expected.shape[0] + 6, expected.shape[1])
    np.testing.assert_allclose(got[: len(expected)], expected, atol=FLOAT32_TOLERANCE, rtol=0)
    np.testing.assert_array_equal(got[len(expected) :], 0.0)


def test_bfloat16(checkpoint):
    """bfloat16 params and compute against HF in bfloat16: same features to bf16 accuracy."""
    model_type, visual, path = checkpoint
    tower = hf_loading.load_hf(path, dtype=jnp.bfloat16).visual
    assert tower.blocks.attn.qkv.kernel[...].dtype == jnp.bfloat16
    pixel_values, grid_thw = images_to_patches([(56, 56), (56, 112)])
    expected = hf_features(visual, pixel_values, grid_thw)
    expected_bf16 = hf_features(visual, pixel_values, grid_thw, dtype=torch.bfloat16)
    got = nnx.jit(lambda tower, p, g: tower(p, g))(tower, pixel_values, grid_thw)
    got = np.asarray(got, np.float32)
    scale = np.abs(expected).max()
    hf_error = np.abs(expected_bf16 - expected).max()
    our_error = np.abs(got - expected).max()
    assert our_error <= max(2 * hf_error, 0.02 * scale), (our_error, hf_error, scale)


# ---------------------------------------------------------------------------------------------
# Layout pieces against HF's vision_utils
# ---------------------------------------------------------------------------------------------

GRIDS = [[[1, 4, 6]], [[1, 4, 4], [1, 4, 8]], [[1, 6, 8], [2, 4, 4], [1, 10, 6]]]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("window_units", [1, 2, 3])
def test_layout_matches_hf(grid, window_units):
    """Rotary positions, frame segments (= HF's cu_seqlens) and the window permutation and
    window boundaries (= HF's get_vision_window_index) from jnp ops, with traced grids."""
    grid = np.asarray(grid, np.int32)
    num_patches = int(np.prod(grid, axis=1).sum())
    torch_grid = torch.from_numpy(grid).long()
    layout = jax.jit(patch_layout, static_argnums=(1, 2, 3))(grid, num_patches, 2, window_units)
    np.testing.assert_array_equal(
        layout.positions, hf_vision.get_vision_position_ids(torch_grid, 2).numpy()
    )
    cu_seqlens = hf_vision.get_vision_cu_seqlens(torch_grid).numpy()
    np.testing.assert_array_equal(np.unique(layout.frame_segments), cu_seqlens[:-1])
    window_index, cu_windows = hf_vision.get_vision_window_index(
        torch_grid, spatial_merge_size=2, window_size=28 * window_units, patch_size=14
    )
    np.testing.assert_array_equal(layout.window_order, window_index.numpy())
    # In window order, segment boundaries fall exactly on HF's cu_window_seqlens.
    permuted = np.asarray(layout.window_segments).reshape(-1, 4)[np.asarray(layout.window_order)]
    permuted = permuted.reshape(-1)
    boundaries = np.flatnonzero(np.diff(permuted)) + 1
    np.testing.assert_array_equal(boundaries, cu_windows.numpy()[1:-1])
    assert len(np.unique(permuted)) == len(cu_windows) - 1


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen2_vl"])
def test_rotary_matches_hf(model_type):
    """cos/sin from (row, col) positions equal HF's vision rotary module's."""
    config_class, _ = HF_CLASSES[model_type]
    hf_config = config_class(
        text_config=CONFIGS[model_type]["text_config"], vision_config=VISION[model_type]
    ).vision_config
    module = hf_vision_rotary[model_type](hf_config)
    ours = parse_vision_config(hf_config, model_type)
    positions = np.stack(np.meshgrid(np.arange(6), np.arange(10), indexing="ij"), -1)
    positions = positions.reshape(-1, 2)
    torch_positions = torch.from_numpy(positions).long()
    hf_cos, hf_sin = module(torch.zeros(1), torch_positions)
    cos, sin = rotary_cos_sin(jnp.asarray(positions), ours.head_dim, ours.rope_theta)
    np.testing.assert_allclose(cos, hf_cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, hf_sin.numpy(), atol=1e-6)


@pytest.mark.parametrize("span", [4, 16])
def test_local_attention_equals_dense(span):
    """Banded attention = dense segment-masked attention when segments are runs <= span rows
    (a long trailing run, like padding, may differ and is not compared); query-chunked dense
    attention = one-shot dense attention everywhere."""
    rng = np.random.default_rng(span)
    lengths = rng.integers(1, span + 1, size=12)
    segments = np.repeat(np.arange(len(lengths)), lengths)
    real = len(segments)
    segments = np.concatenate([segments, np.full(3 * span, 99)]).astype(np.int32)
    query, key, value = (rng.normal(size=(len(segments), 2, 8)).astype(np.float32) for _ in "qkv")
    local = jax.jit(local_attention, static_argnums=4)(query, key, value, segments, span)
    dense = dense_attention(query, key, value, segments)
    np.testing.assert_allclose(local[:real], dense[:real], atol=1e-5)
    # Query-chunked dense attention (long packed sequences) = one-shot dense attention.
    chunked = jax.jit(dense_attention, static_argnums=4)(query, key, value, segments, 7)
    np.testing.assert_allclose(chunked, dense, atol=1e-5)


def test_layout_padding():
    """Padding patches: own segment, not real, sorted after all real units."""
    grid = np.array([[1, 4, 4], [0, 0, 0]], np.int32)
    layout = jax.jit(patch_layout, static_argnums=(1, 2, 3))(grid, 24, 2, 1)
    assert np.asarray(layout.is_real).tolist() == [True] * 16 + [False] * 8
    assert set(np.asarray(layout.frame_segments[16:]).tolist()) == {24}
    assert set(np.asarray(layout.window_segments[16:]).tolist()) == {24}
    assert np.asarray(layout.window_order[4:]).tolist() == [4, 5]


# ---------------------------------------------------------------------------------------------
# Configs, parameters, errors
# ---------------------------------------------------------------------------------------------


def test_published_config_spellings():
    """Hub config.json spellings (in_chans, Qwen2-VL embed_dim vs hidden_size) read right."""
    qwen2 = parse_vision_config(
        {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "in_chans": 3, "mlp_ratio": 4,
         "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "qwen2_vl",
    )  # fmt: skip
    assert (qwen2.width, qwen2.out_dim, qwen2.mlp_dim, qwen2.hidden_act) == (
        1280, 1536, 5120, "quick_gelu",
    )  # fmt: skip
    qwen25 = parse_vision_config(
        {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
         "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
         "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
        "qwen2_5_vl",
    )  # fmt: skip
    assert (qwen25.width, qwen25.out_dim, qwen25.window_units) == (1280, 2048, 4)
    assert qwen25.fullatt_block_indexes == (7, 15, 23, 31)


def test_params_carry_logical_axes():
    """Every parameter has one logical axis name per dimension; stacked blocks lead with
    `layers`."""
    tower = nnx.eval_shape(
        lambda: VisionTower(VISION["qwen2_5_vl"], "qwen2_5_vl", rngs=nnx.Rngs(0))
    )
    flat = nnx.to_flat_state(nnx.state(tower, nnx.Param))
    axes = {".".join(map(str, path)): var.get_metadata()["out_sharding"] for path, var in flat}
    assert all(len(var.get_metadata()["out_sharding"]) == len(var.shape) for _, var in flat)
    assert axes["patch_embed.kernel"] == ("vision_patch", "vision_embed")
    assert axes["blocks.attn.qkv.kernel"] == ("layers", "vision_embed", "heads")
    assert axes["blocks.mlp.gate_proj.kernel"] == ("layers", "vision_embed", "vision_mlp")
    assert axes["blocks.norm1.scale"] == ("layers", "norm")
    assert axes["merger.fc2.kernel"] == ("vision_mlp", "embed")


def test_program_size_does_not_grow_with_depth():
    """One scan over all blocks (full and window blocks alike): the lowered program for 12
    blocks is (up to shape annotations) as long as for 3."""

    def program_length(depth):
        config = dict(VISION["qwen2_5_vl"], depth=depth, fullatt_block_indexes=[1, depth - 1])
        abstract = nnx.eval_shape(lambda: VisionTower(config, "qwen2_5_vl", rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        forward = lambda state, p, g: nnx.merge(graphdef, state)(p, g)  # noqa: E731
        pixels = jax.ShapeDtypeStruct((96, 1176), jnp.float32)
        grid = jax.ShapeDtypeStruct((2, 3), jnp.int32)
        text = jax.jit(forward).lower(state, pixels, grid).as_text()
        return len(text)

    # Only shape annotations differ (12 vs 3 stacked layers); unrolled blocks would be ~4x.
    assert program_length(12) < 1.05 * program_length(3)


def test_remat_gives_same_gradient():
    """remat="full" recomputes blocks in the backward pass without changing the gradient."""
    pixel_values, grid_thw = images_to_patches([(56, 84)])

    tower = VisionTower(VISION["qwen2_5_vl"], "qwen2_5_vl", rngs=nnx.Rngs(0))

    @nnx.jit(static_argnums=1)
    def grad(tower, remat):
        tower.remat = remat
        loss = lambda t: jnp.sum(t(pixel_values, grid_thw) ** 2)  # noqa: E731
        return nnx.grad(loss)(tower)["blocks"]["attn"]["qkv"]["kernel"][...]

    np.testing.assert_allclose(grad(tower, "full"), grad(tower, "none"), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_clear_errors():
    tower = nnx.eval_shape(lambda: VisionTower(VISION["qwen2_vl"], "qwen2_vl", rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"expected \[P, 1176\]"):
        tower(np.zeros((16, 100), np.float32), np.array([[1, 4, 4]]))
    with pytest.raises(ValueError, match="multiple of merge_size"):
        tower(np.zeros((18, 1176), np.float32), np.array([[1, 4, 4]]))
    with pytest.raises(ValueError, match="describes 20 patches"):
        tower(np.zeros((16, 1176), np.float32), np.array([[1, 4, 4], [1, 2, 2]]))
    with pytest.raises(ValueError, match="multiples of merge_size"):
        tower(np.zeros((16, 1176), np.float32), np.array([[1, 3, 4]]))
    with pytest.raises(ValueError, match=r"expected \[num_images, 3\]"):
        tower(np.zeros((16, 1176), np.float32), np.array([1, 4, 4]))
    empty = tower(np.zeros((0, 1176), np.float32), np.zeros((1, 3), np.int32))
    assert empty.shape == (0, 40)
    with pytest.raises(ValueError, match="model_type"):
        VisionTower(VISION["qwen2_vl"], "llava", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="remat"):
        VisionTower(VISION["qwen2_vl"], "qwen2_vl", remat="some", rngs=nnx.Rngs(0))
    assert layers.REMAT_POLICIES  # the names the error lists
