"""Llama-3.2-Vision (Mllama) backbone in Flax NNX: the vision model, the multimodal projector and
the Llama 3 text decoder with gated cross-attention layers, equal to transformers'
`MllamaModel(...).last_hidden_state` on every non-padding position.

Images do not enter the sequence: the projected vision states `[B, images * tiles * patches, H]`
are keys / values of the cross-attention layers at `cross_attention_layers`; which text position
sees which tile is `cross_attention_mask [B, L, images, tiles]`, expanded to patches as
transformers' `_prepare_cross_attention_mask` does (see `cross_attention_masks`).

Layer stacking (compile time flat in depth): the self-attention layers between two
cross-attention layers form one stacked, scanned block (`self_blocks.N`, loaded with a
`layer_offset` rule); the cross-attention layers (`cross_layers.N`, 8 in the 11B model) are
applied one by one between the blocks. The program therefore holds one scan per run of
self-attention layers and one cross-attention layer body per cross-attention layer, whatever the
number of self-attention layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaembed_jax.models import layers
from metaembed_jax.models.mllama.config import (
    DEFAULT_IMAGE_TOKEN_ID,
    EXTRA_EMBEDDING_ROWS,
    MODEL_TYPES,
    TextConfig,
    text_config,
    vision_config,
)
from metaembed_jax.models.mllama.vision import VisionModel


def rope_inverse_frequencies(cfg: TextConfig) -> np.ndarray:
    """`[head_dim / 2]` float32 inverse frequencies, with the `llama3` scaling when configured
    (transformers' `_compute_llama3_parameters`, computed in float32 as it does)."""
    rope = dict(cfg.rope)
    f32 = np.float32
    inv_freq = layers.inverse_frequencies(cfg.head_dim, f32(rope["rope_theta"]))
    if rope["rope_type"] != "llama3":
        return inv_freq
    factor, low, high = (f32(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old_context = f32(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def cross_attention_masks(
    cross_attention_mask: jax.Array, num_patches: int
) -> tuple[jax.Array, jax.Array]:
    """transformers' `_prepare_cross_attention_mask` as booleans.

    cross_attention_mask `[B, L, images, tiles]` (1 = this text position sees this tile) ->
    (`allowed [B, 1, L, images * tiles * num_patches]`, `text_row [B, L, 1]`). A text position
    that sees no tile at all (text before the first image, a row without images) gets
    `text_row = False`, which zeroes its cross-attention MLP output, and, as in transformers, an
    all-True `allowed` row (its attention output is NOT zeroed: it attends to every vision state
    of its row).
    """
    tiles = jnp.asarray(cross_attention_mask).astype(bool)
    batch, length = tiles.shape[:2]
    sees_any = tiles.any(axis=(2, 3))
    allowed = jnp.repeat(tiles.reshape(batch, length, -1), num_patches, axis=-1)
    allowed = allowed | ~sees_any[..., None]
    return allowed[:, None], sees_any[..., None]


def _gate(rngs: nnx.Rngs, param_dtype) -> nnx.Param:
    return layers.make_param(rngs, nnx.initializers.zeros, (1,), (None,), param_dtype)


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        hidden, inner = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = layers.Dense(hidden, inner, ("embed", "mlp"), **kw)
        self.up_proj = layers.Dense(hidden, inner, ("embed", "mlp"), **kw)
        self.down_proj = layers.Dense(inner, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class _Projections(nnx.Module):
    """q / k / v / o projections of GQA attention (no biases). Kernels `[embed, heads*head_dim]`."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        hidden = cfg.hidden_size
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = layers.Dense(hidden, q_size, ("embed", "heads"), **kw)
        self.k_proj = layers.Dense(hidden, kv_size, ("embed", "kv_heads"), **kw)
        self.v_proj = layers.Dense(hidden, kv_size, ("embed", "kv_heads"), **kw)
        self.o_proj = layers.Dense(q_size, hidden, ("heads", "embed"), **kw)

    def heads(self, projection, x: jax.Array, count: int) -> jax.Array:
        return projection(x).reshape(*x.shape[:2], count, self.head_dim)

    def output(self, attended: jax.Array) -> jax.Array:
        return self.o_proj(attended.reshape(*attended.shape[:2], -1))


class SelfAttention(_Projections):
    """Causal GQA self-attention with rotary positions."""

    def __call__(self, x, cos, sin, mask):
        query = layers.apply_rotary(self.heads(self.q_proj, x, self.num_heads), cos, sin)
        key = layers.apply_rotary(self.heads(self.k_proj, x, self.num_kv_heads), cos, sin)
        value = self.heads(self.v_proj, x, self.num_kv_heads)
        return self.output(layers.dot_product_attention(query, key, value, mask))


class CrossAttention(_Projections):
    """GQA attention from text to vision states, with RMSNorm on query and key heads."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        norm = dict(param_dtype=param_dtype, rngs=rngs)
        self.q_norm = layers.RMSNorm(cfg.head_dim, cfg.rms_norm_eps, **norm)
        self.k_norm = layers.RMSNorm(cfg.head_dim, cfg.rms_norm_eps, **norm)

    def __call__(self, x, vision_states, mask):
        query = self.q_norm(self.heads(self.q_proj, x, self.num_heads))
        key = self.k_norm(self.heads(self.k_proj, vision_states, self.num_kv_heads))
        value = self.heads(self.v_proj, vision_states, self.num_kv_heads)
        return self.output(layers.dot_product_attention(query, key, value, mask))


class SelfAttentionLayer(nnx.Module):
    """Pre-norm Llama decoder layer."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        norm = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.self_attn = SelfAttention(cfg, **kw)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class CrossAttentionLayer(nnx.Module):
    """transformers' `MllamaCrossAttentionDecoderLayer`: cross-attention and MLP branches scaled
    by `tanh` gates; the MLP branch is zeroed at text positions that see no tile (`text_row`).

    `row_gate [B, 1, 1]` (None = ones) scales both branches per row: `encode_with_suffix` sets
    it to 0 for rows without images, so that they do not attend at all.
    """

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        norm = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.cross_attn = CrossAttention(cfg, **kw)
        self.cross_attn_attn_gate = _gate(rngs, param_dtype)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.mlp = MLP(cfg, **kw)
        self.cross_attn_mlp_gate = _gate(rngs, param_dtype)

    def __call__(self, x, vision_states, mask, text_row, row_gate=None):
        attended = self.cross_attn(self.input_layernorm(x), vision_states, mask)
        transformed_scale = text_row.astype(x.dtype)
        if row_gate is not None:
            attended = attended * row_gate.astype(x.dtype)
            transformed_scale = transformed_scale * row_gate.astype(x.dtype)
        x = x + jnp.tanh(self.cross_attn_attn_gate[...].astype(x.dtype)) * attended
        transformed = self.mlp(self.post_attention_layernorm(x)) * transformed_scale
        return x + jnp.tanh(self.cross_attn_mlp_gate[...].astype(x.dtype)) * transformed


def layer_plan(cfg: TextConfig) -> tuple[tuple[str, int, int], ...]:
    """The decoder in order: ("self", first layer, layer count) for each run of self-attention
    layers and ("cross", layer index, 1) for each cross-attention layer."""
    plan, start = [], 0
    for index in (*cfg.cross_attention_layers, cfg.num_layers):
        if index > start:
            plan.append(("self", start, index - start))
        if index < cfg.num_layers:
            plan.append(("cross", index, 1))
        start = index + 1
    return tuple(plan)


class MllamaBackbone(nnx.Module):
    """Llama-3.2-Vision without the LM head: inputs -> last-layer hidden states `[B, L, H]`.

    Built from a raw `config.json` dict by `hf_loading.from_config` / `load_hf`. Keyword names
    are transformers': `input_ids`, `attention_mask`, `pixel_values [B, images, tiles, 3, S, S]`,
    `aspect_ratio_ids [B, images]`, `aspect_ratio_mask [B, images, tiles]`,
    `cross_attention_mask [B, L, images, tiles]`. Text positions are `0 .. L-1` over the padded
    row, as transformers' `MllamaModel` numbers them when it is given no `position_ids`.

    Meta tokens (`encode_with_suffix`): the `M` suffix rows come after the content, positions
    continuing (`L .. L+M-1`), causal, and cross-attend to every real tile of every image of
    their row (the row's `cross_attention_mask` extended with its tiles' union), as the
    reference PyTorch MetaEmbed extends the mask with ones. Rows without any image differ from
    the reference on purpose: it gives text-only training rows a dummy all-ones image with an
    all-zero mask, which in transformers' Mllama still changes the row (a row that sees no tile
    attends to every vision state of the dummy image; only its MLP branch is zeroed), so a
    text-only embedding would depend on a made-up image and on the batch it is in. Here such a
    row attends to nothing: its cross-attention layers add zero, exactly what transformers
    computes for the same row in a text-only batch (cross-attention layers skipped), so a text
    input has one embedding whatever it is batched with, and needs no vision compute.
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
        if config.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"model_type {config.get('model_type')!r}; expected {MODEL_TYPES}")
        cfg = text_config(config)
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.plan = layer_plan(cfg)
        self.image_token_id = int(config.get("image_token_index", DEFAULT_IMAGE_TOKEN_ID))
        vision = dict(config.get("vision_config") or {})
        self.num_vision_patches = vision_config(vision).num_patches
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora)
        self.embed_tokens = layers.make_param(
            rngs,
            nnx.initializers.normal(0.02),
            (cfg.vocab_size + EXTRA_EMBEDDING_ROWS, cfg.hidden_size),
            ("vocab", "embed"),
            param_dtype,
        )
        self.self_blocks = nnx.List(
            [
                layers.stack_layers(lambda r: SelfAttentionLayer(cfg, rngs=r, **kw), count, rngs)
                for kind, _, count in self.plan
                if kind == "self"
            ]
        )
        self.cross_layers = nnx.List(
            [CrossAttentionLayer(cfg, rngs=rngs, **kw) for _ in cfg.cross_attention_layers]
        )
        self.norm = layers.RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.vision_model = VisionModel(
            vision, dtype=dtype, param_dtype=param_dtype, lora=lora, remat=remat, rngs=rngs
        )
        self.multi_modal_projector = layers.Dense(
            self.vision_model.config.output_dim,
            cfg.hidden_size,
            ("vision_mlp", "embed"),
            use_bias=True,
            dtype=dtype,
            param_dtype=param_dtype,
            lora=lora,
            rngs=rngs,
        )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def embed_tokens_of(self, input_ids) -> jax.Array:
        """Token embeddings `[B, L, H]` in the compute dtype."""
        ids = jnp.asarray(input_ids, jnp.int32)
        return jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.dtype)

    def vision_states(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> jax.Array:
        """Projected vision states `[B, images * tiles * patches, H]`, the cross-attention keys."""
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise ValueError("pixel_values need aspect_ratio_ids and aspect_ratio_mask")
        states = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        states = self.multi_modal_projector(states)
        return states.reshape(states.shape[0], -1, self.hidden_size)

    def _check_cross_mask(self, cross_attention_mask, pixel_values, length: int) -> None:
        expected = (np.shape(pixel_values)[0], length, *np.shape(pixel_values)[1:3])
        if tuple(np.shape(cross_attention_mask)) != expected:
            raise ValueError(
                f"cross_attention_mask shape {np.shape(cross_attention_mask)}; expected "
                f"[B, L, images, tiles] = {expected}"
            )

    def decode(self, hidden, attention_mask, vision=None, cross_mask=None, row_gate=None):
        """The decoder + final norm. hidden `[B, L, H]`; vision `[B, V, H]` or None (cross-attention
        layers skipped, as transformers does without images); cross_mask `[B, L, images, tiles]`."""
        batch, length = hidden.shape[:2]
        real = jnp.asarray(attention_mask).astype(bool)
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None, None] & real[:, None, None, :]  # [B, 1, L, S]
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        cos, sin = layers.rope_cos_sin(positions, rope_inverse_frequencies(self.config))
        if vision is not None:
            allowed, text_row = cross_attention_masks(cross_mask, self.num_vision_patches)

        def apply_layer(layer, carry):
            return layer(carry, cos, sin, mask)

        blocks, crosses = iter(self.self_blocks), iter(self.cross_layers)
        for kind, _, _ in self.plan:
            if kind == "self":
                hidden = layers.scan_layers(next(blocks), hidden, apply_layer, remat=self.remat)
                continue
            layer = next(crosses)
            if vision is not None:
                hidden = self._cross(layer, hidden, vision, allowed, text_row, row_gate)
        return self.norm(hidden)

    def _cross(self, layer, hidden, vision, allowed, text_row, row_gate):
        def apply(layer, hidden):
            return layer(hidden, vision, allowed, text_row, row_gate)

        if self.remat != "none":
            policy = layers.REMAT_POLICIES[self.remat]
            apply = nnx.remat(apply, policy=policy, prevent_cse=False)
        return apply(layer, hidden)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        aspect_ratio_ids=None,
        aspect_ratio_mask=None,
        cross_attention_mask=None,
    ) -> jax.Array:
        """Last-layer hidden states `[B, L, H]` (numpy or jax inputs, transformers' names).

        Without `pixel_values` the cross-attention layers are skipped; with them and no
        `cross_attention_mask`, every position sees every tile (transformers' `None`).
        Raises ValueError for images without aspect ratios or a mis-shaped cross mask.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        hidden = self.embed_tokens_of(input_ids)
        if pixel_values is None:
            return self.decode(hidden, attention_mask)
        if cross_attention_mask is None:
            batch, images, tiles = np.shape(pixel_values)[:3]
            cross_attention_mask = jnp.ones((batch, input_ids.shape[1], images, tiles), jnp.int32)
        self._check_cross_mask(cross_attention_mask, pixel_values, input_ids.shape[1])
        vision = self.vision_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self.decode(hidden, attention_mask, vision, cross_attention_mask)

    def encode_with_suffix(
        self,
        suffix,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        aspect_ratio_ids=None,
        aspect_ratio_mask=None,
        cross_attention_mask=None,
    ) -> jax.Array:
        """Last-layer states `[B, M, H]` of `suffix [B or 1, M, H]` appended after the content
        (see the class docstring for positions and cross-attention). Raises ValueError for
        images without a `cross_attention_mask` (the meta rows' tiles are read from it)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        batch, count = input_ids.shape[0], np.shape(suffix)[1]
        # [1, M, H]: the same rows for every example (MetaEmbed passes its meta-token table so)
        suffix = jnp.broadcast_to(
            jnp.asarray(suffix).astype(self.dtype), (batch, count, self.hidden_size)
        )
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        hidden = jnp.concatenate([self.embed_tokens_of(input_ids), suffix], axis=1)
        mask = jnp.concatenate(
            [jnp.asarray(attention_mask, jnp.int32), jnp.ones((batch, count), jnp.int32)], axis=1
        )
        if pixel_values is None:
            return self.decode(hidden, mask)[:, -count:]
        if cross_attention_mask is None:
            raise ValueError("encode_with_suffix with pixel_values needs cross_attention_mask")
        self._check_cross_mask(cross_attention_mask, pixel_values, input_ids.shape[1])
        content = jnp.asarray(cross_attention_mask, jnp.int32)
        row_tiles = content.max(axis=1)  # [B, images, tiles]: the tiles any content position sees
        meta = jnp.broadcast_to(row_tiles[:, None], (batch, count, *row_tiles.shape[1:]))
        extended = jnp.concatenate([content, meta], axis=1)
        row_gate = row_tiles.max(axis=(1, 2)).reshape(batch, 1, 1)  # 0 = the row has no image
        vision = self.vision_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self.decode(hidden, mask, vision, extended, row_gate)[:, -count:]
