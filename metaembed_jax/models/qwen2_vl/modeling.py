"""Qwen2-VL and Qwen2.5-VL backbones (Flax NNX): vision tower + Qwen2 decoder with M-RoPE.

The two share the language model (Qwen2 decoder: GQA with q/k/v bias, RMSNorm, SwiGLU,
multimodal rotary embedding) and differ in the vision tower (`vision.VisionTower`).
`Qwen2VLBackbone` implements the family's Backbone interface (`models/family.py`: `hidden_size`,
`__call__`, `encode_with_suffix`); its output equals transformers'
`model.model(...).last_hidden_state` on every non-padding position.

Parameter paths (used by the loader rules in `params.py`): `embed_tokens`, `layers.*` (stacked on
a leading `layers` axis and scanned), `norm`, `visual.*`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaembed_jax.models import layers
from metaembed_jax.models.qwen2_vl.config import TextConfig, model_type_of, text_config
from metaembed_jax.models.qwen2_vl.rope import (
    image_token_layout,
    locate_in_runs,
    mrope_cos_sin,
    rope_index,
)
from metaembed_jax.models.qwen2_vl.vision import VisionTower

DEFAULT_IMAGE_TOKEN_ID = 151655

# ---------------------------------------------------------------------------------------------
# Config normalisation: published flat spelling and transformers 5's nested `text_config`
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """GQA self-attention with q/k/v bias and M-RoPE. Kernels `[embed, heads*head_dim]`."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        hidden = cfg.hidden_size
        self.q_proj = layers.Dense(hidden, q_size, ("embed", "heads"), use_bias=True, **common)
        self.k_proj = layers.Dense(hidden, kv_size, ("embed", "kv_heads"), use_bias=True, **common)
        self.v_proj = layers.Dense(hidden, kv_size, ("embed", "kv_heads"), use_bias=True, **common)
        self.o_proj = layers.Dense(q_size, hidden, ("heads", "embed"), use_bias=False, **common)

    def __call__(self, x, cos, sin, segments):
        """x [B, L, H]; segments [B, L]: 0 for real tokens, -1 for padding (causal within)."""
        batch, length, _ = x.shape
        query = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
        key = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        value = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        query = layers.apply_rotary(query, cos, sin)
        key = layers.apply_rotary(key, cos, sin)
        out = layers.dot_product_attention(query, key, value, is_causal=True, segment_ids=segments)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        hidden, inner = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = layers.Dense(hidden, inner, ("embed", "mlp"), **common)
        self.up_proj = layers.Dense(hidden, inner, ("embed", "mlp"), **common)
        self.down_proj = layers.Dense(inner, hidden, ("mlp", "embed"), **common)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm Qwen2 decoder layer."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        norm = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.self_attn = Attention(cfg, **kwargs)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.mlp = MLP(cfg, **kwargs)

    def __call__(self, x, cos, sin, segments):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------


def append_text_positions(position_ids: jax.Array, count: int) -> jax.Array:
    """Positions for `count` text tokens appended after the content.

    `position_ids` is `[B, L]` or, for M-RoPE, `[3, B, L]`. Text after content continues from
    the largest position used so far (over every M-RoPE axis), as transformers' `get_rope_index`
    does for text following an image. Returns the positions of the appended tokens only,
    `[B, count]` or `[3, B, count]`.
    """
    per_row_max = position_ids.max(axis=-1)  # [B] or [3, B]
    if position_ids.ndim == 3:
        per_row_max = per_row_max.max(axis=0, keepdims=True)  # [1, B]
    offsets = jnp.arange(1, count + 1, dtype=position_ids.dtype)
    appended = per_row_max[..., None] + offsets
    if position_ids.ndim == 3:
        appended = jnp.broadcast_to(appended, (position_ids.shape[0], *appended.shape[1:]))
    return appended


def pack_example_images(
    pixel_values: jax.Array, image_grid_thw: jax.Array, multiple: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Per-example image layout -> the packed (HF) layout, jit-able with traced grids.

    pixel_values `[B, P_ex, D]` (example b's patches first, then zero rows), image_grid_thw
    `[B, N_ex, 3]` (zero rows = no image) -> (`[B * P_ex (rounded up to multiple), D]` with every
    real patch first, in batch then image order, then zero rows; `[B * N_ex, 3]`). Grid rows just
    flatten: zero rows may then sit between real ones, which every reader of the packed grid
    skips (they contribute no patches and no tokens). Static shapes: the packed row r < total
    real patches is gathered from its example (found by a search over the per-example counts),
    rows past the total are zeros. Equivalent to a stable argsort of "is padding" over the
    flattened patches, at O(P log B) instead of a sort.
    """
    batch, per_example, dim = pixel_values.shape
    grid = jnp.asarray(image_grid_thw, jnp.int32)
    counts = jnp.prod(grid, axis=-1).sum(axis=-1)  # real patches per example [B]
    rows = -(-batch * per_example // multiple) * multiple
    if batch * per_example == 0:
        return jnp.zeros((rows, dim), pixel_values.dtype), grid.reshape(-1, 3)
    packed_row = jnp.arange(rows, dtype=jnp.int32)
    example, offset = locate_in_runs(counts, packed_row)
    source = example * per_example + offset
    is_real = packed_row < jnp.sum(counts)
    flat = pixel_values.reshape(batch * per_example, dim)
    gathered = flat[jnp.clip(jnp.where(is_real, source, 0), 0, batch * per_example - 1)]
    packed = jnp.where(is_real[:, None], gathered, jnp.zeros((), flat.dtype))
    return packed, grid.reshape(-1, 3)


@contextlib.contextmanager
def _split_streams(node: nnx.Module, splits: int):
    """`nnx.split_rngs(node, splits=splits)` for streams whose keys may be stacked (a scanned
    layer stack holds one key per layer: `nnx.split_rngs` draws from a stream as one key). Every
    stream draws once (its count advances, as `split_rngs` does), each of its keys splits into
    `splits` along a new leading axis with zero counts; both are restored on exit."""
    backups = []
    for _, stream in nnx.graph.iter_graph(node):
        if not isinstance(stream, nnx.RngStream):
            continue
        key, count = stream.key[...], stream.count[...]
        flat_key, flat_count = key.reshape(-1), count.reshape(-1)
        drawn = jax.vmap(jax.random.fold_in)(flat_key, flat_count)
        split = jax.vmap(lambda k: jax.random.split(k, splits))(drawn)  # [n, splits]
        backups.append((stream, key, count + 1))
        stream.key.set_value(jnp.moveaxis(split, 1, 0).reshape(splits, *key.shape))
        stream.count.set_value(jnp.zeros((splits, *count.shape), jnp.uint32))
    try:
        yield
    finally:
        for stream, key, count in backups:
            stream.key.set_value(key)
            stream.count.set_value(count)


class Qwen2VLBackbone(nnx.Module):
    """Qwen2-VL / Qwen2.5-VL without the LM head: inputs -> last-layer hidden states.

    Built from a raw `config.json` dict (either spelling) by `hf_loading.from_config` / `load_hf`.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        lora: layers.LoRASpec | None = None,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        layers.check_remat(remat)  # early: scan_layers checks only at call time
        model_type = model_type_of(config)
        cfg = text_config(config)
        vision_config = dict(config.get("vision_config") or {})
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.image_token_id = int(config.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID))
        self.spatial_merge_size = int(vision_config.get("spatial_merge_size", 2))
        # The per-example layout's tower: False packs the batch's images into one tower call,
        # True runs it per example (`_embed_per_example`); `configure_model` sets it from
        # `config.model.vision_per_example`.
        self.vision_per_example = False
        self.embed_tokens = layers.make_param(
            rngs,
            nnx.initializers.normal(0.02),
            (cfg.vocab_size, cfg.hidden_size),
            ("vocab", "embed"),
            param_dtype,
        )
        self.layers = layers.stack_layers(
            lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=r),
            cfg.num_layers,
            rngs,
        )
        self.norm = layers.RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.visual = VisionTower(
            vision_config,
            model_type,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            lora=lora,
            rngs=rngs,
        )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def _check_images(self, input_ids, pixel_values, image_grid_thw) -> None:
        """Clear errors for inputs whose layouts, image tokens, grids and patches disagree. Ranks
        and batch sizes are always checked; values only when known (outside jit)."""
        grid_rank, pixel_rank = np.ndim(image_grid_thw), np.ndim(pixel_values)
        if (grid_rank, pixel_rank) not in ((2, 2), (3, 3)):
            raise ValueError(
                f"pixel_values {np.shape(pixel_values)} / image_grid_thw "
                f"{np.shape(image_grid_thw)}: expected the packed layout [P, D] / [N, 3] or the "
                "per-example layout [B, P_ex, D] / [B, N_ex, 3]"
            )
        batch = np.shape(input_ids)[0]
        if grid_rank == 3 and not (
            np.shape(pixel_values)[0] == np.shape(image_grid_thw)[0] == batch
        ):
            raise ValueError(
                f"per-example pixel_values {np.shape(pixel_values)} / image_grid_thw "
                f"{np.shape(image_grid_thw)} must lead with the batch size {batch} of input_ids"
            )
        if not layers.is_concrete(input_ids, pixel_values, image_grid_thw):
            return
        # Packed: one "example" holding the whole batch. Per example: row b's tokens and patches
        # must match its own grid rows (a per-row mismatch would shift every later image).
        ids = np.asarray(input_ids)
        if grid_rank == 2:
            ids, image_grid_thw = ids.reshape(1, -1), np.asarray(image_grid_thw)[None]
        grids = np.asarray(image_grid_thw)
        for row, grid in enumerate(grids):
            patches = int(np.prod(grid, axis=-1).sum())
            expected_tokens = patches // self.spatial_merge_size**2
            tokens = int((ids[row] == self.image_token_id).sum())
            where = f"example {row}: " if grid_rank == 3 else ""
            if tokens != expected_tokens:
                raise ValueError(
                    f"{where}input_ids hold {tokens} <|image_pad|> tokens but image_grid_thw "
                    f"{grid.tolist()} needs {expected_tokens} (prod(grid) / merge**2 per image)"
                )
            available = np.shape(pixel_values)[grid_rank - 2]
            if available < patches:
                raise ValueError(
                    f"{where}pixel_values has {available} patches; image_grid_thw needs {patches}"
                )

    def embed_inputs(self, input_ids, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """Token embeddings `[B, L, H]` (compute dtype), with the vision tower's merged features
        written, in order, into the `<|image_pad|>` positions.

        Images in either layout (see `processing.py`): packed (`pixel_values [P, D]`,
        `image_grid_thw [N, 3]`, HF's) or per example (`[B, P_ex, D]`, `[B, N_ex, 3]`), which is
        packed here by `pack_example_images`."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        embeds = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        if pixel_values is None or image_grid_thw is None:
            return embeds
        self._check_images(input_ids, pixel_values, image_grid_thw)
        pixel_values = jnp.asarray(pixel_values)
        grid = jnp.asarray(image_grid_thw, jnp.int32)
        if grid.ndim == 3 and self.vision_per_example:
            return self._embed_per_example(input_ids, embeds, pixel_values, grid)
        bound = None  # packed: the tower bounds frames itself when the grid is concrete
        if grid.ndim == 3:
            # An example's patch budget bounds each of its frames: the tower attends per image.
            bound = pixel_values.shape[1]
            pixel_values, grid = pack_example_images(
                pixel_values, grid, multiple=self.spatial_merge_size**2
            )
        features = self.visual(pixel_values, grid, max_image_patches=bound).astype(self.dtype)
        if features.shape[0] == 0:  # no patch rows at all: nothing to scatter
            return embeds
        layout = image_token_layout(input_ids, grid, self.image_token_id, self.spatial_merge_size)
        rows = jnp.clip(layout["ordinal"], 0, features.shape[0] - 1)
        return jnp.where(layout["is_image"][..., None], features[rows], embeds)

    def _embed_per_example(self, input_ids, embeds, pixel_values, grid) -> jax.Array:
        """The per-example layout: the tower runs on each example's own images (`nnx.vmap` over
        the batch axis, so the tower's work splits over the batch shards with the rest of the
        step, and an example's patch budget bounds each of its frames: attention per image
        with no fallback), and example b's k-th `<|image_pad|>` token takes its k-th merged
        feature. Equal to packing the batch first (`pack_example_images`): the tower never
        mixes images. LoRA dropout keys are split over the examples."""
        batch, per_example = pixel_values.shape[:2]
        unit = self.spatial_merge_size**2
        rows = -(-per_example // unit) * unit
        if rows != per_example:
            pixel_values = jnp.pad(pixel_values, ((0, 0), (0, rows - per_example), (0, 0)))
        if batch * rows == 0:
            return embeds
        images = grid.shape[1]

        def tower(visual, example_pixels, example_grid):
            return visual(
                example_pixels, example_grid, max_image_patches=rows, images_per_example=images
            )

        state_axes = nnx.StateAxes({nnx.RngState: 0, ...: None})
        run = nnx.vmap(tower, in_axes=(state_axes, 0, 0), out_axes=0)
        with _split_streams(self.visual, batch):
            features = run(self.visual, pixel_values, grid).astype(self.dtype)  # [B, U_ex, H]
        is_image = input_ids == self.image_token_id
        ordinal = jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1  # within the example
        picks = jnp.clip(ordinal, 0, features.shape[1] - 1)
        gathered = jnp.take_along_axis(features, picks[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered, embeds)

    def position_ids(self, input_ids, attention_mask, image_grid_thw=None) -> jax.Array:
        """M-RoPE position ids `[3, B, L]` int32, as transformers' `get_rope_index`
        (`image_grid_thw` packed `[N, 3]` or per example `[B, N_ex, 3]`)."""
        return rope_index(
            input_ids,
            attention_mask,
            image_grid_thw,
            image_token_id=self.image_token_id,
            spatial_merge_size=self.spatial_merge_size,
        )

    def decode(self, inputs_embeds, attention_mask, position_ids) -> jax.Array:
        """The decoder stack + final norm: `[B, L, H]` embeddings -> last hidden states.

        `position_ids` `[3, B, L]` (M-RoPE, from `position_ids`), or `[B, L]` for plain text
        positions, used on all three axes as transformers does.
        """
        cfg = self.config
        hidden = jnp.asarray(inputs_embeds).astype(self.dtype)
        batch, length = hidden.shape[:2]
        position_ids = jnp.asarray(position_ids)
        if position_ids.shape == (batch, length):
            position_ids = jnp.broadcast_to(position_ids, (3, batch, length))
        if position_ids.shape != (3, batch, length):
            raise ValueError(
                f"position_ids shape {position_ids.shape}; expected (3, {batch}, {length}) "
                f"or ({batch}, {length})"
            )
        real = jnp.asarray(attention_mask).astype(bool)
        # Causal over real tokens as segment ids (padding = -1), the form fused kernels take: a
        # real query sees the real keys before it, a padding query sees nothing (zero row).
        segments = jnp.where(real, 0, -1).astype(jnp.int32)
        cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

        def apply_layer(layer, carry):
            return layer(carry, cos, sin, segments)

        hidden = layers.scan_layers(self.layers, hidden, apply_layer, remat=self.remat)
        return self.norm(hidden)

    def _content(self, input_ids, attention_mask, pixel_values, image_grid_thw):
        """(content embeddings `[B, L, H]`, int32 mask `[B, L]`, M-RoPE positions `[3, B, L]`)."""
        input_ids, attention_mask = _text_inputs(input_ids, attention_mask)
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
        positions = self.position_ids(input_ids, attention_mask, image_grid_thw)
        return embeds, attention_mask, positions

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
    ) -> jax.Array:
        """Last-layer hidden states `[B, L, H]` (numpy or jax inputs, HF keyword names).

        `mm_token_type_ids` is accepted so that a transformers processor's output can be passed
        as is, and ignored: the image positions are derived from `input_ids`.
        """
        del mm_token_type_ids
        embeds, attention_mask, positions = self._content(
            input_ids, attention_mask, pixel_values, image_grid_thw
        )
        return self.decode(embeds, attention_mask, positions)

    def encode_with_suffix(
        self,
        suffix,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
    ) -> jax.Array:
        """Last-layer states `[B, M, H]` of `M` embeddings `suffix` (`[B, M, H]`, or `[1, M, H]`
        for every row) appended after the left-padded content.

        As the reference appends its meta tokens: the appended rows are attended (mask 1), their
        positions continue as text after the content on all three M-RoPE axes
        (`append_text_positions`), and attention stays causal.
        """
        del mm_token_type_ids
        content, attention_mask, positions = self._content(
            input_ids, attention_mask, pixel_values, image_grid_thw
        )
        batch, count = content.shape[0], suffix.shape[1]
        suffix = jnp.broadcast_to(
            jnp.asarray(suffix).astype(content.dtype), (batch, count, content.shape[-1])
        )
        inputs_embeds = jnp.concatenate([content, suffix], axis=1)
        mask = jnp.concatenate([attention_mask, jnp.ones((batch, count), jnp.int32)], axis=1)
        positions = jnp.concatenate([positions, append_text_positions(positions, count)], -1)
        return self.decode(inputs_embeds, mask, positions)[:, -count:]


def _text_inputs(input_ids, attention_mask) -> tuple[jax.Array, jax.Array]:
    """`input_ids` / `attention_mask` as int32 `[B, L]` (mask default: all ones).

    Raises ValueError when they are not both `[batch, length]`.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = (
        jnp.ones_like(input_ids)
        if attention_mask is None
        else jnp.asarray(attention_mask, jnp.int32)
    )
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must "
            "both be [batch, length]"
        )
    return input_ids, attention_mask
