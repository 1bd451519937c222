"""PaliGemma / PaliGemma 2 backbones (Flax NNX): SigLIP tower + Gemma / Gemma 2 decoder.

Equal to transformers 5.23's `PaliGemmaModel(...).last_hidden_state` on every non-padding
position. What it reproduces, read from transformers:
- Token embeddings times `sqrt(hidden_size)` in the compute dtype (`GemmaTextScaledWordEmbedding`);
  the image features replace the `<image>` positions *after* that scaling (they are not scaled),
  the k-th `<image>` token of the batch (row-major) taking patch k of the concatenated images.
- Positions `1..L` for every row, whatever its left padding (`arange(L) + 1`: transformers'
  PaliGemma does not shift them by the padding).
- The mask: causal over the real (attention_mask) keys; with `token_type_ids`, tokens of type 0
  (the prefix) also see each other in both directions. Gemma 2's sliding layers additionally drop
  keys `window` or more indices back (the prefix block stays bidirectional, as transformers ORs
  it on top). Layer `i` of Gemma 2 slides when `layer_types[i]` says so (default: even `i`).
- Gemma's RMSNorm `x * (1 + w)` in float32, cast back; GeGLU with the config's gelu; Gemma 2's
  attention scale `query_pre_attn_scalar**-0.5`, attention logit soft-capping and the extra
  post-attention / pre- and post-feed-forward norms.

transformers quirk, not reproduced: PaliGemma's config sets `use_bidirectional_attention=True`,
which its SDPA path honours only when it skips the mask (a batch with no padding and no
`token_type_ids`): then attention is fully bidirectional, while any padded batch, the eager path
and Gemma 2 are causal. This module is always causal there (the documented semantics).

Parameter paths (the rules in `params.py`): `embed_tokens`, `layers.*` (stacked, scanned), `norm`,
`visual.*` (vision.py).
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
from metaembed_jax.models.paligemma.config import (
    MODEL_TYPES,
    SLIDING,
    TextConfig,
    image_token_id,
    text_config,
    vision_config,
)
from metaembed_jax.models.paligemma.vision import VisionTower


class GemmaRMSNorm(nnx.Module):
    """Gemma's RMSNorm: normalise and scale by `1 + w` in float32, then cast back (HF's order).
    The stored `scale` is `w` (zeros = identity), as in the checkpoint."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = layers.make_param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-query / grouped attention with rotary positions (Gemma 2: scale and soft-cap)."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        self.cfg = cfg
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        common = dict(
            use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs
        )
        hidden = cfg.hidden_size
        self.q_proj = layers.Dense(hidden, q_size, ("embed", "heads"), **common)
        self.k_proj = layers.Dense(hidden, kv_size, ("embed", "kv_heads"), **common)
        self.v_proj = layers.Dense(hidden, kv_size, ("embed", "kv_heads"), **common)
        self.o_proj = layers.Dense(q_size, hidden, ("heads", "embed"), **common)

    def __call__(self, x, cos, sin, mask):
        cfg = self.cfg
        batch, length, _ = x.shape
        query = self.q_proj(x).reshape(batch, length, cfg.num_heads, cfg.head_dim)
        key = self.k_proj(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        value = self.v_proj(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        query = layers.apply_rotary(query, cos, sin)
        key = layers.apply_rotary(key, cos, sin)
        out = layers.dot_product_attention(
            query,
            key,
            value,
            mask,
            scale=cfg.attn_scale,
            logit_softcap=cfg.attn_logit_softcapping if cfg.is_gemma2 else None,
        )
        return self.o_proj(out.reshape(batch, length, cfg.num_heads * cfg.head_dim))


class MLP(nnx.Module):
    """GeGLU: `down(gelu(gate(x)) * up(x))`."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        hidden, inner = cfg.hidden_size, cfg.intermediate_size
        self.approximate = cfg.gelu_approximate
        self.gate_proj = layers.Dense(hidden, inner, ("embed", "mlp"), **common)
        self.up_proj = layers.Dense(hidden, inner, ("embed", "mlp"), **common)
        self.down_proj = layers.Dense(inner, hidden, ("mlp", "embed"), **common)

    def __call__(self, x):
        gate = jax.nn.gelu(self.gate_proj(x), approximate=self.approximate)
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Gemma layer (pre-norm); Gemma 2 adds a norm after attention and around the MLP."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, lora, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)

        def norm():
            return GemmaRMSNorm(
                cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
            )

        self.is_gemma2 = cfg.is_gemma2
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, **kwargs)
        self.post_attention_layernorm = norm()
        if cfg.is_gemma2:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(cfg, **kwargs)

    def __call__(self, x, cos, sin, mask):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask)
        if not self.is_gemma2:
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def attention_masks(attention_mask, token_type_ids, sliding_window: int | None):
    """(full, sliding) boolean masks `[B, 1, L, L]` as transformers builds them (see the module
    docstring); `sliding` is None without a window."""
    real = jnp.asarray(attention_mask).astype(bool)
    index = jnp.arange(real.shape[1])
    causal = (index[None, :] <= index[:, None])[None]  # [1, L, S]
    if token_type_ids is None:
        prefix = jnp.zeros((1, 1, 1), bool)
    else:
        in_prefix = jnp.asarray(token_type_ids) == 0
        prefix = in_prefix[:, :, None] & in_prefix[:, None, :]
    keys = real[:, None, :]
    full = ((causal | prefix) & keys)[:, None]
    if sliding_window is None:
        return full, None
    near = (index[None, :] > index[:, None] - sliding_window)[None]
    return full, (((causal & near) | prefix) & keys)[:, None]


def _one_indexed_positions(batch: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(1, length + 1, dtype=jnp.int32), (batch, length))


class PaliGemmaBackbone(nnx.Module):
    """PaliGemma / PaliGemma 2 without the LM head: inputs -> last-layer hidden states.

    Images: `pixel_values` `[N, C, H, W]` (transformers' layout: every image of the batch, in
    order; the k-th `<image>` token of the batch takes patch k) or `[B, M, C, H, W]` (per example:
    row b's images first, then all-zero padding images up to M; the k-th `<image>` token of row b
    takes patch k of row b's images). Which padding images are real follows from the `<image>`
    tokens: row b holds `count_b / image_seq_length` images, the rest are never read.

    Meta tokens (`encode_with_suffix`): appended after the content, positions continuing it
    (`L+1 ...`), as the reference MetaEmbed does through transformers (it appends placeholder ids
    and passes no `token_type_ids`: plain causal attention). When a caller passes
    `token_type_ids`, the appended rows count as suffix (type 1): they attend causally to all of
    the content and to the meta tokens before them, and no content position attends to them, so
    the content's own states (prefix-bidirectional) are exactly those of `__call__`.
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
        layers.check_remat(remat)
        if config.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"model_type {config.get('model_type')!r}; expected {MODEL_TYPES}")
        cfg, vision = text_config(config), vision_config(config)
        if vision.projection_dim != cfg.hidden_size:
            raise ValueError(
                f"projection_dim {vision.projection_dim} must equal the text hidden_size "
                f"{cfg.hidden_size} (image features replace token embeddings)"
            )
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.image_token_id = image_token_id(config)
        self.image_seq_length = vision.num_patches
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
        self.norm = GemmaRMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.visual = VisionTower(
            vision, dtype=dtype, param_dtype=param_dtype, remat=remat, lora=lora, rngs=rngs
        )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def _check_images(self, input_ids, pixel_values) -> None:
        """Ranks always; token / image counts when the inputs are concrete (outside jit)."""
        rank, batch = np.ndim(pixel_values), np.shape(input_ids)[0]
        if rank not in (4, 5) or (rank == 5 and np.shape(pixel_values)[0] != batch):
            raise ValueError(
                f"pixel_values {np.shape(pixel_values)}: expected [N, C, H, W] or "
                f"[{batch}, M, C, H, W] (the batch of input_ids {np.shape(input_ids)})"
            )
        if not layers.is_concrete(input_ids, pixel_values):
            return
        counts = (np.asarray(input_ids) == self.image_token_id).sum(axis=-1)
        if rank == 4:
            counts, available = counts.sum(keepdims=True), [np.shape(pixel_values)[0]]
        else:
            available = [np.shape(pixel_values)[1]] * batch
        for row, (count, images) in enumerate(zip(counts, available, strict=True)):
            where = f"row {row}: " if rank == 5 else ""
            if count % self.image_seq_length or count // self.image_seq_length > images:
                raise ValueError(
                    f"{where}{count} <image> tokens do not fill {images} images of "
                    f"{self.image_seq_length} tokens each (a whole number of images needed)"
                )

    def embed_inputs(self, input_ids, pixel_values=None) -> jax.Array:
        """Scaled token embeddings `[B, L, H]` (compute dtype) with the projected image features
        written into the `<image>` positions (layouts: see the class docstring)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        # transformers maps an out-of-vocabulary image token id to 0 before the lookup.
        lookup = jnp.where(input_ids >= self.config.vocab_size, 0, input_ids)
        embeds = jnp.take(self.embed_tokens[...], lookup, axis=0).astype(self.dtype)
        embeds = embeds * jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)
        if pixel_values is None:
            return embeds
        self._check_images(input_ids, pixel_values)
        pixel_values = jnp.asarray(pixel_values)
        per_example = pixel_values.ndim == 5
        images = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        if images.shape[0] == 0:  # an empty image axis: nothing to scatter
            return embeds
        features = self.visual(images).astype(self.dtype)  # [N or B*M, T, H]
        is_image = input_ids == self.image_token_id
        if per_example:  # ordinals within each row, offset to the row's own images
            ordinal = jnp.cumsum(is_image, axis=1) - 1
            ordinal = ordinal + jnp.arange(input_ids.shape[0])[:, None] * (
                pixel_values.shape[1] * self.image_seq_length
            )
        else:
            ordinal = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(is_image.shape)
        flat = features.reshape(-1, features.shape[-1])
        rows = jnp.clip(ordinal, 0, flat.shape[0] - 1)
        return jnp.where(is_image[..., None], flat[rows], embeds)

    def position_ids(self, input_ids, attention_mask=None) -> jax.Array:
        """`[B, L]` int32 positions `1..L` for every row (transformers' PaliGemma ignores the
        left padding here: `attention_mask` is accepted for the interface and unused)."""
        del attention_mask
        return _one_indexed_positions(*np.shape(input_ids))

    def decode(self, inputs_embeds, attention_mask, position_ids, token_type_ids=None):
        """The decoder stack + final norm: `[B, L, H]` embeddings -> last hidden states, with the
        masks of `attention_masks` (one scanned body; Gemma 2's window rides as per-layer data)."""
        cfg = self.config
        hidden = jnp.asarray(inputs_embeds).astype(self.dtype)
        full, sliding = attention_masks(attention_mask, token_type_ids, cfg.sliding_window)
        cos, sin = layers.rope_cos_sin(
            position_ids, layers.inverse_frequencies(cfg.head_dim, cfg.rope_theta)
        )
        slides = jnp.asarray([t == SLIDING for t in cfg.layer_types])

        def apply_layer(layer, carry):
            x, index = carry  # the layer index rides in the carry: one scan for both kinds
            mask = full if sliding is None else jnp.where(slides[index], sliding, full)
            return layer(x, cos, sin, mask), index + 1

        hidden, _ = layers.scan_layers(
            self.layers, (hidden, jnp.int32(0)), apply_layer, remat=self.remat
        )
        return self.norm(hidden)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None):
        """Last-layer hidden states `[B, L, H]` (numpy or jax inputs, HF keyword names)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        embeds = self.embed_inputs(input_ids, pixel_values)
        positions = self.position_ids(input_ids, attention_mask)
        return self.decode(embeds, attention_mask, positions, token_type_ids)

    def encode_with_suffix(
        self, suffix, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None
    ) -> jax.Array:
        """Last-layer states `[B, M, H]` of `suffix` (`[B, M, H]`, or `[1, M, H]` for every row)
        appended after the content (see the class docstring for positions and masking).

        Raises ValueError for a suffix of another rank, batch or width."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        suffix = jnp.asarray(suffix).astype(self.dtype)
        batch = input_ids.shape[0]
        if (
            suffix.ndim != 3
            or suffix.shape[0] not in (1, batch)
            or suffix.shape[2] != self.hidden_size
        ):
            raise ValueError(
                f"suffix shape {suffix.shape}; expected [{batch} or 1, M, {self.hidden_size}]"
            )
        count = suffix.shape[1]
        suffix = jnp.broadcast_to(suffix, (batch, count, self.hidden_size))
        embeds = jnp.concatenate([self.embed_inputs(input_ids, pixel_values), suffix], axis=1)
        ones = jnp.ones((batch, count), jnp.int32)
        mask = jnp.concatenate([jnp.asarray(attention_mask, jnp.int32), ones], axis=1)
        if token_type_ids is not None:
            token_type_ids = jnp.concatenate([jnp.asarray(token_type_ids, jnp.int32), ones], 1)
        positions = _one_indexed_positions(batch, embeds.shape[1])
        return self.decode(embeds, mask, positions, token_type_ids)[:, -count:]
