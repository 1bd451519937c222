"""The SigLIP vision tower of PaliGemma (Flax NNX) and PaliGemma's multimodal projector.

Equal to transformers' `SiglipVisionModel(...).last_hidden_state` (no pooling head: PaliGemma
never reads it) followed by `PaliGemmaMultiModalProjector`: the patch-embedding convolution
(kernel = stride = patch) as a linear map on flattened patches, learned position embeddings,
pre-norm encoder blocks (full attention over the image's patches), `post_layernorm`, one linear
projection to the decoder's width. Blocks are stacked on a `layers` axis and scanned.

Parameter paths (the rules below): `patch_embed`, `position_embedding`, `blocks.*`,
`post_layernorm`, `projector`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from metaembed_jax.models import layers
from metaembed_jax.models.paligemma.config import VisionConfig


def patchify(pixel_values: jax.Array, patch_size: int) -> jax.Array:
    """`[N, C, H, W]` images -> `[N, (H/p)*(W/p), C*p*p]` patches, in the conv's output order
    (row-major over the patch grid) and flattened as the conv kernel is (channel, row, column)."""
    num, channels, height, width = pixel_values.shape
    gh, gw = height // patch_size, width // patch_size
    x = pixel_values.reshape(num, channels, gh, patch_size, gw, patch_size)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(num, gh * gw, channels * patch_size**2)


class VisionAttention(nnx.Module):
    """Full multi-head self-attention over one image's patches, q/k/v/out with bias."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, lora=None, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        width = config.hidden_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        self.q_proj = layers.Dense(width, width, ("vision_embed", "heads"), **kw)
        self.k_proj = layers.Dense(width, width, ("vision_embed", "heads"), **kw)
        self.v_proj = layers.Dense(width, width, ("vision_embed", "heads"), **kw)
        self.out_proj = layers.Dense(width, width, ("heads", "vision_embed"), **kw)

    def __call__(self, x):
        num, length, width = x.shape
        shape = (num, length, self.num_heads, width // self.num_heads)
        query, key, value = (p(x).reshape(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = layers.dot_product_attention(query, key, value, None)
        return self.out_proj(out.reshape(num, length, width))


class VisionBlock(nnx.Module):
    """Pre-norm SigLIP encoder layer: LayerNorm -> attention, LayerNorm -> fc1 / gelu / fc2."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, lora=None, rngs: nnx.Rngs):
        norm = dict(axis_name="norm", param_dtype=param_dtype, rngs=rngs)
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        width, inner = config.hidden_size, config.intermediate_size
        self.gelu_approximate = config.gelu_approximate
        self.layer_norm1 = layers.LayerNorm(width, config.layer_norm_eps, **norm)
        self.self_attn = VisionAttention(
            config, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs
        )
        self.layer_norm2 = layers.LayerNorm(width, config.layer_norm_eps, **norm)
        self.fc1 = layers.Dense(width, inner, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = layers.Dense(inner, width, ("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        hidden = jax.nn.gelu(self.fc1(self.layer_norm2(x)), approximate=self.gelu_approximate)
        return x + self.fc2(hidden)


class VisionTower(nnx.Module):
    """SigLIP encoder + projector: `[N, C, H, W]` images -> `[N, patches, projection_dim]`.

    Images must have the config's `image_size` (PaliGemma's processor resizes to it; the position
    table has one row per patch and is not interpolated, as transformers' default)."""

    def __init__(
        self,
        config: VisionConfig,
        *,
        dtype,
        param_dtype,
        remat: str = "none",
        lora=None,
        rngs: nnx.Rngs,
    ):
        layers.check_remat(remat)
        self.config = config
        self.dtype = dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora=lora)
        width = config.hidden_size
        self.patch_embed = layers.Dense(
            config.patch_dim, width, ("vision_patch", "vision_embed"), use_bias=True,
            rngs=rngs, **kw,
        )  # fmt: skip
        self.position_embedding = layers.make_param(
            rngs,
            nnx.initializers.normal(0.02),
            (config.num_patches, width),
            (None, "vision_embed"),
            param_dtype,
        )
        self.blocks = layers.stack_layers(
            lambda r: VisionBlock(config, rngs=r, **kw), config.num_layers, rngs
        )
        self.post_layernorm = layers.LayerNorm(
            width, config.layer_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.projector = layers.Dense(
            width, config.projection_dim, ("vision_embed", "embed"), use_bias=True, rngs=rngs, **kw
        )

    def encode(self, pixel_values) -> jax.Array:
        """The SigLIP tower alone: `[N, C, H, W]` -> last hidden states `[N, patches, width]`
        (transformers' `vision_tower(pixel_values).last_hidden_state`).

        Raises ValueError for images of another size or channel count than the config's."""
        config = self.config
        pixel_values = jnp.asarray(pixel_values)
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values shape {pixel_values.shape}; expected [N, *{expected}]")
        x = self.patch_embed(patchify(pixel_values.astype(self.dtype), config.patch_size))
        x = x + self.position_embedding[...].astype(self.dtype)
        x = layers.scan_layers(self.blocks, x, lambda block, h: block(h), self.remat)
        return self.post_layernorm(x)

    def __call__(self, pixel_values) -> jax.Array:
        """`[N, C, H, W]` -> projected image features `[N, patches, projection_dim]` in `dtype`
        (transformers' `get_image_features(pixel_values).pooler_output`)."""
        return self.projector(self.encode(pixel_values))
