"""The Mllama (Llama-3.2-Vision) vision model in Flax NNX, equal to transformers'
`MllamaVisionModel`.

Each image is up to `max_num_tiles` tiles of `image_size` pixels. Per tile: a patch embedding
(a conv with kernel == stride, run as a linear map on flattened patches), a class token, a
positional embedding gated between a plain table and a per-aspect-ratio table, and an
aspect-ratio tile embedding before and after the local encoder. The local encoder (plain layers)
and the global encoder (layers whose attention and MLP are scaled by tanh gates) both run over
every tile of an image at once; the patch axis of each tile is zero-padded to a multiple of 8 as
transformers does, and the outputs of the local layers at `intermediate_layers_indices` are
concatenated to the final states, feature-interleaved as transformers' `stack(dim=-1)` leaves
them.

Attention mask (transformers' `_prepare_aspect_ratio_attention_mask`, reproduced exactly): a
pair (query, key) is masked only when BOTH are padding (a padded patch or a padding tile), so
real patches also attend to padding ones.

Parameter paths follow transformers' names under `vision_model.` (see `params.py`): the local and
global layers are stacked on a leading `layers` axis and scanned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaembed_jax.models import layers
from metaembed_jax.models.mllama.config import VisionConfig, vision_config


def _gate(rngs: nnx.Rngs, param_dtype, init=nnx.initializers.zeros) -> nnx.Param:
    """A scalar gate stored as transformers does, shape [1]."""
    return layers.make_param(rngs, init, (1,), (None,), param_dtype)


class VisionAttention(nnx.Module):
    """Multi-head self-attention without biases."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, lora=None, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        width = cfg.hidden_size
        self.q_proj = layers.Dense(width, width, ("vision_embed", "heads"), **kw)
        self.k_proj = layers.Dense(width, width, ("vision_embed", "heads"), **kw)
        self.v_proj = layers.Dense(width, width, ("vision_embed", "heads"), **kw)
        self.o_proj = layers.Dense(width, width, ("heads", "vision_embed"), **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        query = self.q_proj(x).reshape(shape)
        key = self.k_proj(x).reshape(shape)
        value = self.v_proj(x).reshape(shape)
        out = layers.dot_product_attention(query, key, value, mask)
        return self.o_proj(out.reshape(batch, length, width))


class VisionMLP(nnx.Module):
    """`fc2(gelu(fc1(x)))`, exact (erf) GELU as transformers' "gelu"."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, lora=None, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        width, inner = cfg.hidden_size, cfg.intermediate_size
        self.fc1 = layers.Dense(width, inner, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = layers.Dense(inner, width, ("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionLayer(nnx.Module):
    """Pre-norm encoder layer; a gated (global) layer scales both branches by `tanh(gate)`."""

    def __init__(
        self, cfg: VisionConfig, *, gated: bool, dtype, param_dtype, lora=None, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        norm = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = layers.LayerNorm(cfg.hidden_size, cfg.norm_eps, **norm)
        self.self_attn = VisionAttention(cfg, **kw)
        self.post_attention_layernorm = layers.LayerNorm(cfg.hidden_size, cfg.norm_eps, **norm)
        self.mlp = VisionMLP(cfg, **kw)
        self.gated = gated
        if gated:
            self.gate_attn = _gate(rngs, param_dtype)
            self.gate_ffn = _gate(rngs, param_dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        attended = self.self_attn(self.input_layernorm(x), mask)
        if self.gated:
            attended = jnp.tanh(self.gate_attn[...].astype(x.dtype)) * attended
        x = x + attended
        transformed = self.mlp(self.post_attention_layernorm(x))
        if self.gated:
            transformed = jnp.tanh(self.gate_ffn[...].astype(x.dtype)) * transformed
        return x + transformed


class TileEmbedding(nnx.Module):
    """transformers' `MllamaPrecomputedAspectRatioEmbedding`: one `[tiles, H]` table per
    aspect-ratio id, added to every patch of its tile, scaled by `tanh(gate)`."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.shape = (cfg.max_num_tiles, 1, cfg.hidden_size)
        rows, width = cfg.num_aspect_ratios + 1, cfg.max_num_tiles * cfg.hidden_size
        init = nnx.initializers.normal(0.02)
        self.embedding = layers.make_param(rngs, init, (rows, width), (None, None), param_dtype)
        self.gate = _gate(rngs, param_dtype)

    def __call__(self, hidden: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        table = jnp.take(self.embedding[...], aspect_ratio_ids, axis=0).astype(hidden.dtype)
        table = table.reshape(-1, *self.shape) * jnp.tanh(self.gate[...].astype(hidden.dtype))
        return hidden + table


class GatedPositionalEmbedding(nnx.Module):
    """transformers' `MllamaPrecomputedPositionEmbedding`: `(1 - tanh g) * table + tanh g *
    tile_table[aspect_ratio_id]`."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.shape = (cfg.max_num_tiles, cfg.num_patches, cfg.hidden_size)
        init = nnx.initializers.normal(0.02)
        patches, width = cfg.num_patches, cfg.hidden_size
        self.embedding = layers.make_param(
            rngs, init, (patches, width), (None, "vision_embed"), param_dtype
        )
        self.gate = _gate(rngs, param_dtype)
        rows = cfg.num_aspect_ratios + 1
        self.tile_embedding = layers.make_param(
            rngs, init, (rows, int(np.prod(self.shape))), (None, None), param_dtype
        )

    def __call__(self, hidden: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        gate = jnp.tanh(self.gate[...].astype(hidden.dtype))
        hidden = hidden + (1 - gate) * self.embedding[...].astype(hidden.dtype)
        tiles = jnp.take(self.tile_embedding[...], aspect_ratio_ids, axis=0).astype(hidden.dtype)
        return hidden + gate * tiles.reshape(-1, *self.shape)


def tile_attention_mask(aspect_ratio_mask: jax.Array, cfg: VisionConfig) -> jax.Array:
    """`[N, tiles]` real-tile mask -> boolean `[N, 1, S, S]` (S = tiles * padded patches):
    False only where query AND key are padding (transformers' mask, see the module docstring)."""
    real_patch = jnp.arange(cfg.padded_patches) < cfg.num_patches
    real = aspect_ratio_mask.astype(bool)[:, :, None] & real_patch  # [N, tiles, S_tile]
    padding = ~real.reshape(real.shape[0], -1)
    return ~(padding[:, :, None] & padding[:, None, :])[:, None]


class VisionModel(nnx.Module):
    """`MllamaVisionModel`: tiles -> `[B, images, tiles, num_patches, vision_output_dim]`."""

    def __init__(
        self, config: Mapping[str, Any], *, dtype, param_dtype, remat, lora=None, rngs: nnx.Rngs
    ):
        cfg = vision_config(config)
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora)
        self.patch_embedding = layers.Dense(
            cfg.patch_dim,
            cfg.hidden_size,
            ("vision_patch", "vision_embed"),
            use_bias=False,
            rngs=rngs,
            **kw,
        )
        self.class_embedding = layers.make_param(
            rngs, nnx.initializers.normal(0.02), (cfg.hidden_size,), ("vision_embed",), param_dtype
        )
        self.gated_positional_embedding = GatedPositionalEmbedding(
            cfg, param_dtype=param_dtype, rngs=rngs
        )
        self.pre_tile_positional_embedding = TileEmbedding(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_tile_positional_embedding = TileEmbedding(cfg, param_dtype=param_dtype, rngs=rngs)
        # transformers builds both with nn.LayerNorm's default eps, not norm_eps
        norm = dict(param_dtype=param_dtype, rngs=rngs)
        self.layernorm_pre = layers.LayerNorm(cfg.hidden_size, 1e-5, **norm)
        self.layernorm_post = layers.LayerNorm(cfg.hidden_size, 1e-5, **norm)
        self.transformer = layers.stack_layers(
            lambda r: VisionLayer(cfg, gated=False, rngs=r, **kw), cfg.num_layers, rngs
        )
        self.global_transformer = layers.stack_layers(
            lambda r: VisionLayer(cfg, gated=True, rngs=r, **kw), cfg.num_global_layers, rngs
        )

    def _embed_tiles(self, pixel_values: jax.Array, aspect_ratio_ids: jax.Array) -> jax.Array:
        """`[N, tiles, C, H, W]` -> `[N, tiles, num_patches, D]` (class token first), positional
        and pre-tile embeddings added, before `layernorm_pre`."""
        cfg = self.config
        images, tiles, channels, height, width = pixel_values.shape
        p = cfg.patch_size
        rows, cols = height // p, width // p
        patches = pixel_values.reshape(images * tiles, channels, rows, p, cols, p)
        # conv (kernel == stride) as a linear map: each patch flattened as (C, p, p), row-major
        patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(images * tiles, rows * cols, -1)
        hidden = self.patch_embedding(patches).reshape(images, tiles, rows * cols, -1)
        hidden = self.pre_tile_positional_embedding(hidden, aspect_ratio_ids)
        cls = jnp.broadcast_to(
            self.class_embedding[...].astype(hidden.dtype), (images, tiles, 1, hidden.shape[-1])
        )
        hidden = jnp.concatenate([cls, hidden], axis=2)
        return self.gated_positional_embedding(hidden, aspect_ratio_ids)

    def _local_encoder(self, hidden: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The local layers, scanned; also returns the outputs of the intermediate layers,
        `[K, N, S, D]`, collected into a buffer slot as the scan passes them."""
        cfg = self.config
        slot_of_layer = np.full(cfg.num_layers, -1, np.int32)
        for slot, layer_index in enumerate(cfg.intermediate_layers):
            slot_of_layer[layer_index] = slot
        slots = jnp.asarray(slot_of_layer)
        buffer = jnp.zeros((len(cfg.intermediate_layers), *hidden.shape), hidden.dtype)

        def apply_layer(layer, carry):
            x, collected, index = carry
            x = layer(x, mask)
            slot = slots[index]
            safe = jnp.maximum(slot, 0)
            kept = jnp.where(slot >= 0, x, collected[safe])
            collected = jax.lax.dynamic_update_index_in_dim(collected, kept, safe, 0)
            return x, collected, index + 1

        carry = (hidden, buffer, jnp.zeros((), jnp.int32))
        hidden, buffer, _ = layers.scan_layers(
            self.transformer, carry, apply_layer, remat=self.remat
        )
        return hidden, buffer

    def __call__(
        self, pixel_values: jax.Array, aspect_ratio_ids: jax.Array, aspect_ratio_mask: jax.Array
    ) -> jax.Array:
        """pixel_values `[B, images, tiles, C, H, W]`, aspect_ratio_ids `[B, images]`,
        aspect_ratio_mask `[B, images, tiles]` -> `[B, images, tiles, num_patches, output_dim]`.

        Raises ValueError when the tile axis or tile size disagrees with the config (the
        positional tables are sized for `max_num_tiles` tiles of `image_size` pixels)."""
        cfg = self.config
        pixel_values = jnp.asarray(pixel_values).astype(self.dtype)
        batch, images, tiles = pixel_values.shape[:3]
        expected = (cfg.max_num_tiles, cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 6 or tuple(pixel_values.shape[2:]) != expected:
            raise ValueError(
                f"pixel_values shape {pixel_values.shape}; expected [B, images, *{expected}]"
            )
        count = batch * images
        ids = jnp.asarray(aspect_ratio_ids, jnp.int32).reshape(count)
        hidden = self._embed_tiles(pixel_values.reshape(count, *pixel_values.shape[2:]), ids)
        hidden = self.layernorm_pre(hidden)
        pad = cfg.padded_patches - cfg.num_patches
        hidden = jnp.pad(hidden, ((0, 0), (0, 0), (0, pad), (0, 0)))
        mask = tile_attention_mask(jnp.asarray(aspect_ratio_mask).reshape(count, tiles), cfg)
        width = hidden.shape[-1]
        hidden, intermediate = self._local_encoder(hidden.reshape(count, -1, width), mask)
        hidden = self.layernorm_post(hidden).reshape(count, tiles, cfg.padded_patches, width)
        hidden = self.post_tile_positional_embedding(hidden, ids).reshape(count, -1, width)

        def apply_global(layer, carry):
            return layer(carry, mask)

        hidden = layers.scan_layers(self.global_transformer, hidden, apply_global, self.remat)
        hidden = hidden.reshape(count, tiles, cfg.padded_patches, width)[:, :, : cfg.num_patches]
        # [K, N, S, D] -> [N, S, D, K] -> [N, tiles, S_tile, D*K]: transformers' stack(dim=-1)
        intermediate = jnp.moveaxis(intermediate, 0, -1).reshape(
            count, tiles, cfg.padded_patches, -1
        )
        intermediate = intermediate[:, :, : cfg.num_patches]
        out = jnp.concatenate([hidden, intermediate], axis=-1)
        return out.reshape(batch, images, tiles, cfg.num_patches, cfg.output_dim)
