"""Qwen2-VL and Qwen2.5-VL vision towers in Flax NNX, equal to transformers' `model.visual`.

`VisionTower(pixel_values [P, C*T*ps*ps], image_grid_thw [N, 3]) -> [P // merge**2, out_hidden]`:
the merged image features in Hugging Face's order (the rows HF scatters into `<|image_pad|>`).

How it differs from the PyTorch reference, and why:
- Images of different sizes share one packed sequence; HF splits it with `cu_seqlens`, we keep
  static shapes and use segment ids instead (one segment per frame, as HF does; for Qwen2.5-VL's
  window blocks, one segment per window). Every layout array (rotary positions, segment ids,
  window permutation) is computed with jnp ops from `image_grid_thw`, so grid values may be traced.
- Qwen2.5-VL mixes full-attention and window-attention blocks: one `nnx.scan` runs all blocks;
  the layer index rides in the scan carry and each block picks, with `lax.cond`, full attention
  within frames or window attention within windows.
- Padding (docs/design.md): all-zero rows of `image_grid_thw` are no image; patch rows past
  `sum(t*h*w)` are padding. Padding patches form a segment of their own (they never attend to or
  from real patches), sort after every real window, and their output rows (after the real ones)
  are set to zero.

Cost: with a static bound on one frame's patches (`max_image_patches`, which the per-example
layout gives) or a concrete grid, every frame (full-attention blocks) and every window (window
blocks) starts a fresh block of a blocked layout and a query block attends only its own
segment's key blocks (`segment_attention.py`): cost linear in the number of
images, as HF's per-image loop. Without a bound (the packed layout under jit), and for inputs
that break it, the packed path runs: window blocks attend within a static band around each
block of queries (linear in P), full-attention blocks compute every query against all P keys
with a segment mask, in query chunks (O(P**2) compute, O(chunk * P) memory). With
`images_per_example` (the per-example layout: the model runs the tower on one example at a
time) full-attention blocks attend within the example's blocks masked to frames, which every
example fits: no fallback is compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaembed_jax.models import layers
from metaembed_jax.models.qwen2_vl.config import MODEL_TYPES
from metaembed_jax.models.qwen2_vl.rope import locate_in_runs
from metaembed_jax.models.qwen2_vl.segment_attention import (
    SegmentBlocks,
    blocked_attention,
    dense_attention,
    local_attention,
    segment_blocks,
    within_segments,
)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

NORM_EPS = 1e-6  # hard-coded in HF's vision blocks and merger


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower's sizes, read from either spelling of `vision_config`."""

    model_type: str
    depth: int
    width: int  # vision hidden size
    num_heads: int
    mlp_dim: int
    out_dim: int  # merger output = language-model width
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    hidden_act: str
    rope_theta: float
    window_size: int | None  # Qwen2.5-VL only: window side in pixels
    fullatt_block_indexes: tuple[int, ...]

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_units(self) -> int | None:
        """Window side in merged units (HF's `vit_merger_window_size`), None without windows."""
        if self.window_size is None:
            return None
        return self.window_size // self.merge_size // self.patch_size


def _get(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def parse_vision_config(vision_config: Mapping[str, Any], model_type: str) -> VisionConfig:
    """Qwen2-VL: `embed_dim` is the vision width and `hidden_size` the merger output (LM width),
    MLP `embed_dim * mlp_ratio`. Qwen2.5-VL: `hidden_size` is the vision width and
    `out_hidden_size` the merger output. `in_chans` (published) = `in_channels` (transformers 5).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}; expected one of {MODEL_TYPES}")
    if hasattr(vision_config, "to_dict"):
        vision_config = vision_config.to_dict()
    rope = vision_config.get("rope_parameters") or {}
    common = dict(
        model_type=model_type,
        depth=int(_get(vision_config, "depth", "num_hidden_layers", default=32)),
        num_heads=int(_get(vision_config, "num_heads", "num_attention_heads", default=16)),
        in_channels=int(_get(vision_config, "in_channels", "in_chans", default=3)),
        patch_size=int(_get(vision_config, "patch_size", "spatial_patch_size", default=14)),
        temporal_patch_size=int(_get(vision_config, "temporal_patch_size", default=2)),
        merge_size=int(_get(vision_config, "spatial_merge_size", default=2)),
        rope_theta=float(rope.get("rope_theta", vision_config.get("rope_theta", 10000.0))),
    )
    if model_type == "qwen2_vl":
        width = int(_get(vision_config, "embed_dim", default=1280))
        config = VisionConfig(
            width=width,
            mlp_dim=int(width * float(_get(vision_config, "mlp_ratio", default=4))),
            out_dim=int(_get(vision_config, "hidden_size", default=3584)),
            hidden_act=_get(vision_config, "hidden_act", default="quick_gelu"),
            window_size=None,
            fullatt_block_indexes=(),
            **common,
        )
    else:
        config = VisionConfig(
            width=int(_get(vision_config, "hidden_size", default=1280)),
            mlp_dim=int(_get(vision_config, "intermediate_size", default=3420)),
            out_dim=int(_get(vision_config, "out_hidden_size", default=3584)),
            hidden_act=_get(vision_config, "hidden_act", default="silu"),
            window_size=int(_get(vision_config, "window_size", default=112)),
            fullatt_block_indexes=tuple(
                int(i)
                for i in _get(vision_config, "fullatt_block_indexes", default=(7, 15, 23, 31))
            ),
            **common,
        )
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"vision hidden_act {config.hidden_act!r}; expected one of {ACTIVATIONS}")
    if config.width % config.num_heads or config.head_dim % 4:
        raise ValueError(
            f"vision width {config.width} must split into {config.num_heads} heads whose size "
            "is a multiple of 4 (2-D rotary embedding)"
        )
    if config.window_units is not None and config.window_units < 1:
        raise ValueError(
            f"window_size {config.window_size} is smaller than one merged patch "
            f"({config.merge_size * config.patch_size} px)"
        )
    return config


# ---------------------------------------------------------------------------------------------
# Patch layout: positions, segments and the window permutation, from image_grid_thw with jnp ops
# ---------------------------------------------------------------------------------------------


class PatchLayout(NamedTuple):
    positions: jax.Array  # [P, 2] int32 (row, col) of each patch in its image, HF's order
    frame_segments: jax.Array  # [P] int32: one id per frame; padding patches share id P
    window_segments: jax.Array  # [P] int32: one id per window (= frame_segments without windows)
    is_real: jax.Array  # [P] bool: False for padding patches
    window_order: jax.Array  # [P // merge**2] int32 unit permutation (HF's `window_index`)


def patch_layout(
    image_grid_thw: jax.Array, num_patches: int, merge_size: int, window_units: int | None
) -> PatchLayout:
    """Where every patch row of the packed `pixel_values` sits, as HF lays them out: images in
    order, frames in order, and inside a frame `merge x merge` blocks in raster order with the
    patches of a block consecutive. `window_units=None` means no windows (Qwen2-VL)."""
    grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
    # A trailing zero row: padding patches point at it, and an empty grid needs no special case.
    grid = jnp.concatenate([grid, jnp.zeros((1, 3), jnp.int32)])
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    counts = t * h * w
    patch = jnp.arange(num_patches, dtype=jnp.int32)
    is_real = patch < jnp.sum(counts)
    image, local = locate_in_runs(counts, patch)
    area = jnp.maximum(h[image] * w[image], 1)
    within = local % area
    m = merge_size
    blocks_w = jnp.maximum(w[image] // m, 1)
    block_row = within // (m * m * blocks_w)
    block_col = (within // (m * m)) % blocks_w
    positions = jnp.stack(
        [block_row * m + (within // m) % m, block_col * m + within % m], axis=-1
    ).astype(jnp.int32)
    frame_start = patch - local + local // area * area  # first patch of the frame
    frame_segments = jnp.where(is_real, frame_start, num_patches).astype(jnp.int32)
    if window_units is None:
        order = jnp.arange(num_patches // (m * m), dtype=jnp.int32)
        return PatchLayout(positions, frame_segments, frame_segments, is_real, order)

    # Window ids per unit; a window id < number of units in its frame <= area, so adding it to
    # the frame's first patch index gives ids unique across frames and images.
    win_row, win_col = block_row // window_units, block_col // window_units
    windows_per_row = -(-blocks_w // window_units)
    window_segments = jnp.where(
        is_real, frame_start + win_row * windows_per_row + win_col, num_patches
    ).astype(jnp.int32)
    # HF's window_index: per image, per frame, windows in raster order, units raster inside each.
    first = slice(None, None, m * m)  # one patch per unit (units are consecutive patches)
    real = is_real[first]
    keys = [
        jnp.where(real, key[first], 0)
        for key in (
            block_col % window_units,
            block_row % window_units,
            win_col,
            win_row,
            frame_start,  # images, then frames, in order
        )
    ]
    # Padding units last (their own leading key); lexsort is stable, so they keep their order.
    order = jnp.lexsort((*keys, ~real)).astype(jnp.int32)
    return PatchLayout(positions, frame_segments, window_segments, is_real, order)


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, ...]:
    """HF's axial vision rotary: angles `[h * f, w * f]` with `f` of length head_dim // 4,
    repeated twice over the head dim. positions [P, 2] -> cos, sin [P, head_dim] float32."""
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [P, 2, head_dim // 4]
    angles = angles.reshape(positions.shape[0], -1)  # [P, head_dim // 2]: h freqs, then w freqs
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _norm(config: VisionConfig, dim: int, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
    norm = layers.LayerNorm if config.model_type == "qwen2_vl" else layers.RMSNorm
    return norm(dim, NORM_EPS, param_dtype=param_dtype, rngs=rngs)


class Segments(NamedTuple):
    """Which patches attend to which in one block (rows in the tower's working order)."""

    frames: jax.Array  # [P] frame ids (full attention)
    windows: jax.Array | None  # [P] window ids (Qwen2.5-VL), None without windows
    full: jax.Array | None  # bool scalar: this block uses full attention
    frame_blocks: SegmentBlocks | None = None  # per-frame blocked layout, None = no bound known
    window_blocks: SegmentBlocks | None = None  # per-window blocked layout
    # Blocks of whole examples (the per-example layout), which always hold their frames: full
    # attention runs blocked, masked to frames, with no fallback. None = not that layout.
    example_blocks: SegmentBlocks | None = None


class VisionAttention(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, param_dtype, lora=None, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        units = config.window_units
        self.window_span = None if units is None else (units * config.merge_size) ** 2
        width = config.width
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        # Fused q/k/v as in the checkpoint: output features are (3, heads, head_dim).
        self.qkv = layers.Dense(width, 3 * width, ("vision_embed", "heads"), **kw)
        self.proj = layers.Dense(width, width, ("heads", "vision_embed"), **kw)

    def __call__(self, x, cos, sin, segments: Segments):
        """x [P, W]; cos/sin [P, Dh] -> [P, W]. A patch attends to its own frame in full blocks,
        to its own window in window blocks."""
        num_patches = x.shape[0]
        qkv = self.qkv(x).reshape(num_patches, 3, self.num_heads, -1)
        query, key, value = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [P, H, Dh]
        cos, sin = cos[:, None, :], sin[:, None, :]
        query = layers.apply_rotary(query, cos, sin)
        key = layers.apply_rotary(key, cos, sin)

        def full():
            if segments.example_blocks is not None:
                return blocked_attention(
                    query, key, value, segments.example_blocks, mask_segments=segments.frames
                )
            return within_segments(
                query, key, value, segments.frames, segments.frame_blocks,
                lambda: dense_attention(query, key, value, segments.frames),
            )  # fmt: skip

        def windowed():
            return within_segments(
                query, key, value, segments.windows, segments.window_blocks,
                lambda: local_attention(query, key, value, segments.windows, self.window_span),
            )  # fmt: skip

        # One branch of the cond runs: window blocks never pay for full attention.
        windows = segments.windows is not None
        out = jax.lax.cond(segments.full, full, windowed) if windows else full()
        return self.proj(out.reshape(num_patches, -1))


class VisionMLP(nnx.Module):
    """Qwen2-VL: fc1 -> act -> fc2. Qwen2.5-VL: SwiGLU gate/up/down, all with bias."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, lora=None, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[config.hidden_act]
        self.gated = config.model_type == "qwen2_5_vl"
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        up_axes, down_axes = ("vision_embed", "vision_mlp"), ("vision_mlp", "vision_embed")
        if self.gated:
            self.gate_proj = layers.Dense(config.width, config.mlp_dim, up_axes, **kw)
            self.up_proj = layers.Dense(config.width, config.mlp_dim, up_axes, **kw)
            self.down_proj = layers.Dense(config.mlp_dim, config.width, down_axes, **kw)
        else:
            self.fc1 = layers.Dense(config.width, config.mlp_dim, up_axes, **kw)
            self.fc2 = layers.Dense(config.mlp_dim, config.width, down_axes, **kw)

    def __call__(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, param_dtype, lora=None, rngs: nnx.Rngs):
        self.norm1 = _norm(config, config.width, param_dtype, rngs)
        self.norm2 = _norm(config, config.width, param_dtype, rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        self.attn = VisionAttention(config, **kw)
        self.mlp = VisionMLP(config, **kw)

    def __call__(self, x, cos, sin, segments: Segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Norm, then each `merge x merge` block of patches (consecutive rows) -> one LM token."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, lora=None, rngs: nnx.Rngs):
        merged = config.width * config.merge_size**2
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        self.ln_q = _norm(config, config.width, param_dtype, rngs)
        self.fc1 = layers.Dense(merged, merged, ("vision_mlp", "vision_mlp"), **kw)
        self.fc2 = layers.Dense(merged, config.out_dim, ("vision_mlp", "embed"), **kw)
        self.merged = merged

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.merged)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    """The Qwen2-VL / Qwen2.5-VL vision encoder with its patch merger.

    `vision_config`: the checkpoint's `vision_config` dict (either spelling) or config object;
    `model_type`: "qwen2_vl" or "qwen2_5_vl". `dtype` is the compute dtype, `param_dtype` the
    storage dtype; `remat` a policy name of `layers.REMAT_POLICIES`.
    """

    def __init__(
        self,
        vision_config: Mapping[str, Any],
        model_type: str,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        lora: layers.LoRASpec | None = None,
        rngs: nnx.Rngs,
    ):
        config = parse_vision_config(vision_config, model_type)
        layers.check_remat(remat)  # early: scan_layers checks only at call time
        self.config = config
        self.dtype = dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora)
        self.patch_embed = layers.Dense(
            config.patch_dim, config.width, ("vision_patch", "vision_embed"), use_bias=False,
            rngs=rngs, **kw,
        )  # fmt: skip
        self.blocks = layers.stack_layers(
            lambda block_rngs: VisionBlock(config, rngs=block_rngs, **kw), config.depth, rngs
        )
        self.merger = PatchMerger(config, rngs=rngs, **kw)

    @property
    def out_features(self) -> int:
        return self.config.out_dim

    def __call__(
        self,
        pixel_values,
        image_grid_thw,
        max_image_patches: int | None = None,
        images_per_example: int | None = None,
    ):
        """pixel_values [P, C*T*ps*ps] (HF's flattened patches, maybe zero-padded rows),
        image_grid_thw [N, 3] (maybe all-zero rows) -> [P // merge**2, out_features] in `dtype`:
        the merged features of every real image in HF's order, then zero rows for padding.

        `max_image_patches`: a static bound on one frame's patches (h * w), e.g. the per-example
        patch budget. With it, or with a concrete grid, attention runs per frame / per window
        through a blocked layout (cost linear in the number of images); an input that breaks
        the bound falls back, inside the same program, to the packed path (always correct).

        `images_per_example` (with `max_image_patches` = each example's patch rows): the inputs
        are the per-example layout packed by `modeling.pack_example_images` (grid rows in groups
        of `images_per_example` per example, each example's patches at most
        `max_image_patches`, consecutive). Then, under a traced grid, full-attention blocks run
        blocked over whole examples, masked to frames: every example fits that layout whatever
        its images (videos included), so there is no fallback to compile (the packed path over
        the whole batch would attend over all P patches). Cost per example: its patches times
        `max_image_patches`. Window blocks keep their per-window bound and fallback.
        Raises ValueError on shapes that cannot be patches of this tower."""
        config = self.config
        pixel_values = jnp.asarray(pixel_values)
        unit = config.merge_size**2
        if pixel_values.ndim != 2 or pixel_values.shape[1] != config.patch_dim:
            raise ValueError(
                f"pixel_values shape {pixel_values.shape}; expected [P, {config.patch_dim}] "
                f"(channels {config.in_channels} x temporal {config.temporal_patch_size} x "
                f"{config.patch_size}x{config.patch_size})"
            )
        if pixel_values.shape[0] % unit:
            raise ValueError(
                f"{pixel_values.shape[0]} patch rows is not a multiple of merge_size**2 = {unit}"
            )
        num_patches = pixel_values.shape[0]
        _check_grid(image_grid_thw, num_patches, config.merge_size)
        if num_patches == 0:  # reshapes below cannot infer sizes from zero rows
            return jnp.zeros((0, config.out_dim), self.dtype)
        layout = patch_layout(image_grid_thw, num_patches, config.merge_size, config.window_units)
        x = self.patch_embed(pixel_values)
        cos, sin = rotary_cos_sin(layout.positions, config.head_dim, config.rope_theta)
        examples = _example_ids(image_grid_thw, num_patches, max_image_patches, images_per_example)
        per_patch = (x, cos, sin, layout.frame_segments, layout.window_segments, examples)
        if config.window_units is not None:  # windows contiguous, as HF orders them
            per_patch = tuple(
                None if a is None else _permute_units(a, layout.window_order, unit)
                for a in per_patch
            )
        x, cos, sin, frame_segments, window_segments, examples = per_patch
        full_blocks = jnp.asarray(config.fullatt_block_indexes, jnp.int32).reshape(-1)

        bounds = _block_bounds(config, image_grid_thw, num_patches, max_image_patches)
        frame_blocks = window_blocks = example_blocks = None
        is_real = layout.is_real  # padding rows stay last in the working order
        if bounds is not None:
            if examples is None:
                frame_blocks = segment_blocks(frame_segments, is_real, *bounds.frames)
            if config.window_units is not None:
                window_blocks = segment_blocks(window_segments, is_real, *bounds.windows)
        if examples is not None:
            max_len = max(int(max_image_patches), 1)
            block = min(FRAME_BLOCK, max_len)
            num_examples = int(np.shape(image_grid_thw)[0]) // int(images_per_example)
            # Every example starts a fresh block: sum(ceil(n_e / block)) < P / block + B.
            num_blocks = -(-num_patches // block) + num_examples
            example_blocks = segment_blocks(examples, is_real, max_len, block, num_blocks)

        def apply_block(block, carry):
            x, index = carry  # the layer index rides in the carry: one scan for all blocks
            if config.window_units is None:
                segments = Segments(frame_segments, None, None, frame_blocks, None, example_blocks)
            else:
                full = jnp.any(index == full_blocks)
                segments = Segments(
                    frame_segments, window_segments, full, frame_blocks, window_blocks,
                    example_blocks,
                )  # fmt: skip
            return block(x, cos, sin, segments), index + 1

        x, _ = layers.scan_layers(self.blocks, (x, jnp.int32(0)), apply_block, self.remat)
        merged = self.merger(x)
        if config.window_units is not None:  # back to HF's output order
            merged = jnp.zeros_like(merged).at[layout.window_order].set(merged)
        real_units = layout.is_real[::unit]
        return jnp.where(real_units[:, None], merged, jnp.zeros((), merged.dtype))


FRAME_BLOCK = 128  # rows per block of the per-frame layout (a frame wastes < one block)


class BlockBounds(NamedTuple):
    frames: tuple[int, int, int]  # (max_len, block, num_blocks) for `segment_blocks`
    windows: tuple[int, int, int] | None


def _block_bounds(
    config: VisionConfig, image_grid_thw, num_patches: int, max_image_patches: int | None
) -> BlockBounds | None:
    """Static sizes of the blocked layouts: exact from a concrete grid; from
    `max_image_patches` (frames <= grid rows, square-ish images) when the grid is traced; None
    when neither is known (the packed path then runs)."""
    span = None if config.window_units is None else (config.window_units * config.merge_size) ** 2
    try:
        grid = np.asarray(image_grid_thw).reshape(-1, 3)
    except jax.errors.TracerArrayConversionError:
        grid = None
    if grid is not None:
        t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
        areas = h * w
        max_len = max(int(areas.max(initial=0)), 1)
        block = min(FRAME_BLOCK, max_len)
        frame_blocks = int((t * -(-areas // block)).sum())
        windows = None
        if span is not None:
            side = config.window_units * config.merge_size
            count = int((t * -(-h // side) * -(-w // side)).sum())
            windows = (span, span, max(count, 1))
        return BlockBounds((max_len, block, max(frame_blocks, 1)), windows)
    if max_image_patches is None:
        return None
    max_len = max(int(max_image_patches), 1)
    block = min(FRAME_BLOCK, max_len)
    num_images = int(np.shape(image_grid_thw)[0])
    frames = (max_len, block, -(-num_patches // block) + num_images)
    windows = None
    if span is not None:  # edge windows of a frame: about two sides' worth, plus a corner
        extra = num_images * (2 * int(np.ceil(np.sqrt(max_len / span))) + 1)
        windows = (span, span, -(-num_patches // span) + extra)
    return BlockBounds(frames, windows)


def _example_ids(
    image_grid_thw, num_patches: int, max_image_patches: int | None, images_per_example
) -> jax.Array | None:
    """[P] int32 example of each packed patch row (rows past the real patches: B),
    for the per-example layout under a traced grid; None otherwise (no layout given, or a
    concrete grid, whose exact per-frame bounds are cheaper)."""
    if images_per_example is None or max_image_patches is None:
        return None
    try:
        np.asarray(image_grid_thw)
        return None  # concrete: exact per-frame blocks
    except jax.errors.TracerArrayConversionError:
        pass
    per_example = int(images_per_example)
    num_images = int(np.shape(image_grid_thw)[0])
    if per_example < 1 or num_images % per_example:
        raise ValueError(
            f"{num_images} grid rows do not split into examples of {per_example} images"
        )
    grid = jnp.asarray(image_grid_thw, jnp.int32)
    counts = jnp.prod(grid, axis=-1).reshape(-1, per_example).sum(axis=-1)
    patch = jnp.arange(num_patches, dtype=jnp.int32)
    example, _ = locate_in_runs(counts, patch)
    # Padding rows: an id of their own (their run's length must not count against an example).
    return jnp.where(patch < jnp.sum(counts), example, counts.shape[0]).astype(jnp.int32)


def _check_grid(image_grid_thw, num_patches: int, merge_size: int) -> None:
    """Shape always; values when the grid is concrete (a traced grid cannot be checked)."""
    shape = jnp.shape(image_grid_thw)
    if len(shape) != 2 or shape[1] != 3:
        raise ValueError(f"image_grid_thw shape {shape}; expected [num_images, 3] (t, h, w)")
    try:
        grid = np.asarray(image_grid_thw)
    except jax.errors.TracerArrayConversionError:
        return
    if (grid < 0).any() or (grid[:, 1:] % merge_size).any():
        raise ValueError(
            f"image_grid_thw {grid.tolist()}: expected t, h, w >= 0 with h and w multiples of "
            f"merge_size {merge_size}"
        )
    total = int(np.prod(grid, axis=1).sum())
    if total > num_patches:
        raise ValueError(
            f"image_grid_thw describes {total} patches but pixel_values has {num_patches} rows"
        )


def _permute_units(array: jax.Array, order: jax.Array, unit: int) -> jax.Array:
    """Reorder rows in groups of `unit` consecutive rows (one merge block): HF's
    `permute_input_for_window_attn`."""
    grouped = array.reshape(array.shape[0] // unit, unit, *array.shape[1:])
    return grouped[order].reshape(array.shape)


# ---------------------------------------------------------------------------------------------
# Checkpoint rules
# ---------------------------------------------------------------------------------------------


__all__ = ["VisionConfig", "VisionTower", "parse_vision_config", "patch_layout"]
