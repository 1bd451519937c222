"""Layers shared by every backbone: parameters with logical axis names, dense, norms, rotary
embedding, attention, and the scanned layer stack.

Conventions (every backbone follows them, the loader and `sharding.py` rely on them):
- A dense kernel is stored `[in, out]` (the transpose of torch's `nn.Linear.weight`).
- Every parameter carries logical axis names in its `out_sharding` metadata; stacked layers add
  a leading `"layers"` axis. Names used: `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`,
  `vision_embed`, `vision_mlp`, `vision_patch`, `layers`, `norm`, `meta`.
- `dtype` is the compute dtype, `param_dtype` the storage dtype. Norms, softmax and rotary
  angles run in float32 whatever `dtype` is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def check_remat(remat: str) -> None:
    """Raise ValueError unless `remat` names a policy of REMAT_POLICIES."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")


def make_param(
    rngs: nnx.Rngs,
    initializer: Callable[..., jax.Array],
    shape: Sequence[int],
    axes: Axes,
    param_dtype: Any,
) -> nnx.Param:
    """A parameter initialised with `initializer`, tagged with logical axis names `axes`.

    Sharding is applied later by `sharding.py` from the names (no eager sharding at creation).
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    value = initializer(rngs.params(), tuple(shape), param_dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Low-rank adapter on a dense layer (PEFT's LoRA): `y += dropout(x) @ A @ B * alpha / rank`.

    `targets` names the dense layers that get one (HF names: q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj, down_proj). B starts at zero, so an adapted model starts equal to its base.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ()


class Dense(nnx.Module):
    """`y = x @ kernel + bias`, kernel `[in, out]`, computed in `dtype`; optional LoRA adapter.

    LoRA weights are `nnx.LoRAParam` (not `nnx.Param`), so a LoRA run filters them as the only
    trainable backbone weights and the base kernel stays bit-identical.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str | None, str | None],
        *,
        use_bias: bool,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        lora: LoRASpec | None = None,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)
        self.kernel = make_param(rngs, init, (in_features, out_features), axes, param_dtype)
        self.bias = (
            make_param(rngs, nnx.initializers.zeros, (out_features,), (axes[1],), param_dtype)
            if use_bias
            else None
        )
        self.lora_scale = None if lora is None else lora.alpha / lora.rank
        if lora is not None:
            a = nnx.initializers.he_uniform()(rngs.params(), (in_features, lora.rank), param_dtype)
            b = jnp.zeros((lora.rank, out_features), param_dtype)
            self.lora_a = nnx.LoRAParam(a, out_sharding=(axes[0], None), eager_sharding=False)
            self.lora_b = nnx.LoRAParam(b, out_sharding=(None, axes[1]), eager_sharding=False)
            self.lora_dropout = nnx.Dropout(lora.dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_scale is not None:
            low_rank = jnp.dot(self.lora_dropout(x), self.lora_a[...].astype(self.dtype))
            y = y + jnp.dot(low_rank, self.lora_b[...].astype(self.dtype)) * self.lora_scale
        return y


class RMSNorm(nnx.Module):
    """Qwen2 / Llama RMSNorm: normalise in float32, cast back, then scale (HF's order)."""

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        axis_name: str = "norm",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed


class LayerNorm(nnx.Module):
    """LayerNorm with bias, computed in float32 and cast back to the input dtype."""

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        axis_name: str = "norm",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)
        self.bias = make_param(rngs, nnx.initializers.zeros, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """HF's rotate_half: `[-x2, x1]` for the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in float32. x `[..., L, H, Dh]`; cos/sin broadcastable `[..., L, 1, Dh]`."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    *,
    scale: float | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:
    """Grouped-query attention with a float32 softmax.

    query `[B, L, Hq, Dh]`, key/value `[B, S, Hkv, Dh]` with `Hq % Hkv == 0`;
    mask boolean, broadcastable to `[B, Hq, L, S]` (True = may attend) or None.
    `scale` multiplies the scores (default `Dh**-0.5`; Gemma 2 uses `query_pre_attn_scalar**-0.5`);
    `logit_softcap` (Gemma 2) caps the scaled scores as `c * tanh(scores / c)` before the mask.
    Returns `[B, L, Hq, Dh]` in the query's dtype. Rows with no allowed key give zeros
    (not NaN), which only happens at padding positions.
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads not divisible by {num_kv_heads} kv heads")
    groups = num_heads // num_kv_heads
    query = query.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    scores = jnp.einsum("blkgd,bskd->bkgls", query, key, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5 if scale is None else scale)
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, num_heads, q_len, key.shape[1]))
        mask = mask.reshape(batch, num_kv_heads, groups, q_len, key.shape[1])
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bkgls,bskd->blkgd", probs.astype(value.dtype), value)
    return out.reshape(batch, q_len, num_heads, head_dim)


def stack_layers(
    make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs
) -> nnx.Module:
    """`num_layers` copies of `make_layer(rngs)`, parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(layer_rngs)

    return create(rngs)


def scan_layers(
    layers: nnx.Module,
    carry: Any,
    apply_layer: Callable[[nnx.Module, Any], Any],
    remat: str = "none",
) -> Any:
    """Run `carry = apply_layer(layer, carry)` over a stacked module with `nnx.scan`.

    Compile time does not grow with depth. `remat` is a key of `REMAT_POLICIES`; anything other
    than "none" recomputes the layer in the backward pass under that policy.
    """
    check_remat(remat)

    def body(carry, layer):
        return apply_layer(layer, carry)

    if remat != "none":
        body = nnx.remat(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(carry, layers)
