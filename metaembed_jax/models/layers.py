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
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.pallas.ops.gpu import attention as gpu_flash
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

from metaembed_jax import sharding

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
    """Low-rank adapter on a dense layer (PEFT's LoRA): `y += dropout(x) @ A @ B * scale`, with
    `scale = alpha / rank` (`alpha / sqrt(rank)` with `use_rslora`). B starts at zero, so an
    adapted model starts equal to its base.

    `targets` / `exclude` choose the adapted layers as PEFT's `target_modules` /
    `exclude_modules` do, over transformers' in-memory module names (`models/lora.py`): a string
    is a regex that must match the whole name; a tuple holds names, each matching a module of
    that name or ending with "." + it (`("q_proj", "v_proj")`). Modules (and their submodules)
    named in `modules_to_save` are saved whole by PEFT and never adapted.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ()
    use_rslora: bool = False
    exclude: tuple[str, ...] | str = ()
    modules_to_save: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


class Dense(nnx.Module):
    """`y = x @ kernel + bias`, kernel `[in, out]`, computed in `dtype`; optional LoRA adapter.

    LoRA weights are `nnx.LoRAParam` (not `nnx.Param`), so a LoRA run filters them as the only
    trainable backbone weights and the base kernel stays bit-identical. In a stacked layer whose
    adapter PEFT put on some layers only, `lora_layers` lists those (None = every layer); the
    others keep zero A / B.
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
        self.lora_scale = None if lora is None else lora.scale
        self.lora_layers: tuple[int, ...] | None = None
        if lora is not None:
            a = nnx.initializers.he_uniform()(rngs.params(), (in_features, lora.rank), param_dtype)
            b = jnp.zeros((lora.rank, out_features), param_dtype)
            self.lora_a = nnx.LoRAParam(a, out_sharding=(axes[0], None), eager_sharding=False)
            self.lora_b = nnx.LoRAParam(b, out_sharding=(None, axes[1]), eager_sharding=False)
            self.lora_dropout = nnx.Dropout(lora.dropout, rngs=rngs)

    def remove_lora(self) -> None:
        """Drop the adapter (a layer that no LoRA target selects)."""
        if self.lora_scale is not None:
            del self.lora_a, self.lora_b, self.lora_dropout
            self.lora_scale = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = _matmul(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_scale is not None:
            low_rank = jnp.dot(self.lora_dropout(x), self.lora_a[...].astype(self.dtype))
            y = y + jnp.dot(low_rank, self.lora_b[...].astype(self.dtype)) * self.lora_scale
        return y


@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` (x `[..., in]`, kernel `[in, out]`) whose kernel gradient transposes `x`.

    For `dW = x^T dy` XLA:CPU made the token axis of `dy` minor and fused that transposing write
    into the op producing `dy` (the SwiGLU's gradient, for the MLP), ~160 ms per layer and side
    at hidden 512 / MLP 2752 (`benchmarks/profile_train_step.py`). The backward here transposes
    `x` instead, behind an optimization barrier so that XLA keeps it a plain transpose: at the
    MLP's input `x` is 5x narrower than `dy`. qwen_shaped gradients 9.58 -> 8.36 s. The same
    products and sums; a weight that needs no gradient (LoRA's base) has its dot removed by XLA.
    """
    return jnp.dot(x, kernel)


def _matmul_forward(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _matmul_backward(residuals, grad):
    x, kernel = residuals
    x_transposed = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)  # [in, tokens]
    grad_kernel = jnp.dot(x_transposed, grad.reshape(-1, grad.shape[-1]))
    return jnp.dot(grad, kernel.T), grad_kernel


_matmul.defvjp(_matmul_forward, _matmul_backward)


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


def is_concrete(*arrays) -> bool:
    """True when no array is a tracer: values are known (outside jit), so they can be checked."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """The default rotary embedding's `1 / theta ** (2i / head_dim)`, float32 `[head_dim / 2]`."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
    return (1.0 / (theta**exponents)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions `[B, L]` -> cos, sin `[B, L, 1, head_dim]` float32 (HF's cat(freqs, freqs))."""
    freqs = jnp.asarray(positions).astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
    """HF's rotate_half: `[-x2, x1]` for the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in float32. x `[..., L, H, Dh]`; cos/sin broadcastable `[..., L, 1, Dh]`."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


ATTENTION_IMPLS = ("reference", "xla", "pallas")
_attention_impl = ["reference"]  # the process-wide choice; one element so it can be reassigned


def set_attention_impl(name: str) -> None:
    """Choose the attention implementation every family's `dot_product_attention` uses.

    "reference": the einsum with a dense mask and float32 softmax (exact, any backend).
    "xla": `jax.nn.dot_product_attention(implementation=None)`, so XLA (or cuDNN's fused kernel
    on GPU where the shapes and dtypes allow) chooses. "pallas": a Pallas flash-attention kernel
    with segment ids (TPU: `pallas.ops.tpu.flash_attention`; GPU: `pallas.ops.gpu.attention`;
    CPU: the GPU kernel in interpret mode, for tests), for the masks such a kernel takes (causal,
    key padding, segment ids, self-attention); other masks fall back to "xla".
    It is read when a function is traced: set it before jitting. Raises ValueError on a name
    outside ATTENTION_IMPLS.
    """
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {name!r}; expected one of {ATTENTION_IMPLS}")
    _attention_impl[0] = name


def attention_impl() -> str:
    """The current process-wide attention implementation (see `set_attention_impl`)."""
    return _attention_impl[0]


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which keys each query may attend to, in the structured form fused kernels take.

    Every field narrows the allowed set (they combine with AND), except `prefix_lengths`, which
    widens a causal mask: keys `s < prefix_lengths[b]` are visible to every query (prefix-LM).
    - dense: boolean, broadcastable to `[B, Hq, L, S]` (True = may attend), or None.
    - is_causal: key s visible to query l only if `s <= l` (self-attention positions).
    - seq_lengths: `[B]` int (self-attention, right padding): positions `>= seq_lengths[b]` are
      padding, as keys (never attended) and as queries (zero rows).
    - segment_ids: `[B, L]` int (self-attention, L == S): queries see keys of their own id;
      negative ids are padding (they see nothing).
    - window: sliding window, key s visible to query l only if `l - s < window`.
    """

    dense: jax.Array | None = None
    is_causal: bool = False
    seq_lengths: jax.Array | None = None
    segment_ids: jax.Array | None = None
    prefix_lengths: jax.Array | None = None
    window: int | None = None

    def allowed(
        self, q_len: int, kv_len: int, query_rows: jax.Array | None = None
    ) -> jax.Array | None:
        """The dense boolean mask `[B or 1, Hq or 1, L, S]` these fields describe (None = all).

        `query_rows` ([l] int): only those query positions' rows, `[.., l, S]` (the blocks of
        the reference path); rows past `q_len` read as the last query row."""
        rows = jnp.arange(q_len) if query_rows is None else jnp.minimum(query_rows, q_len - 1)
        query = rows[:, None]
        key = jnp.arange(kv_len)[None, :]
        mask = None

        def both(a, b):
            return b if a is None else a & b

        if self.is_causal:
            causal = (key <= query)[None, None]
            if self.prefix_lengths is not None:
                prefix = jnp.asarray(self.prefix_lengths)[:, None, None, None]
                causal = causal | (key[None, None] < prefix)
            mask = both(mask, causal)
        if self.window is not None:
            mask = both(mask, (query - key < self.window)[None, None])
        if self.seq_lengths is not None:
            lengths = jnp.asarray(self.seq_lengths)[:, None, None, None]
            mask = both(mask, (key[None, None] < lengths) & (query[None, None] < lengths))
        if self.segment_ids is not None:
            seg = jnp.asarray(self.segment_ids)
            seg_q = seg if query_rows is None else jnp.take(seg, rows, axis=1)
            same = (seg_q[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
            mask = both(mask, same[:, None])
        if self.dense is not None:
            dense = jnp.asarray(self.dense, bool)
            if query_rows is not None and dense.ndim >= 2 and dense.shape[-2] != 1:
                dense = jnp.take(dense, rows, axis=dense.ndim - 2)
            mask = both(mask, dense)
        return mask


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    is_causal: bool = False,
    seq_lengths: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    prefix_lengths: jax.Array | None = None,
    window: int | None = None,
    implementation: str | None = None,
    scale: float | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:
    """Grouped-query attention with a float32 softmax: the one attention entry point.

    query `[B, L, Hq, Dh]`, key/value `[B, S, Hkv, Dh]` with `Hq % Hkv == 0`. The mask is
    `mask` (boolean, broadcastable to `[B, Hq, L, S]`, True = may attend) combined with the
    structured keywords of `MaskSpec` (is_causal, seq_lengths, segment_ids, prefix_lengths,
    window), which fused kernels take without a dense mask. `implementation`: one of
    ATTENTION_IMPLS, None = the process-wide `attention_impl()`.
    `scale` multiplies the scores (default `Dh**-0.5`; Gemma 2 uses `query_pre_attn_scalar**-0.5`);
    `logit_softcap` (Gemma 2) caps the scaled scores as `c * tanh(scores / c)` before the mask:
    no fused kernel takes a soft-cap, so a capped call always runs the reference path.
    Returns `[B, L, Hq, Dh]` in the query's dtype. Rows with no allowed key give zeros (not NaN),
    which only happens at padding positions. Raises ValueError on bad head counts or names.
    """
    num_heads, num_kv_heads = query.shape[2], key.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads not divisible by {num_kv_heads} kv heads")
    self_only = is_causal or segment_ids is not None or seq_lengths is not None
    if self_only and query.shape[1] != key.shape[1]:
        raise ValueError(
            "is_causal / segment_ids / seq_lengths need self-attention; got "
            f"{query.shape[1]} queries and {key.shape[1]} keys"
        )
    if prefix_lengths is not None and not is_causal:
        raise ValueError("prefix_lengths widens a causal mask; pass is_causal=True with it")
    spec = MaskSpec(mask, is_causal, seq_lengths, segment_ids, prefix_lengths, window)
    implementation = attention_impl() if implementation is None else implementation
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(
            f"attention implementation {implementation!r}; expected one of {ATTENTION_IMPLS}"
        )
    if implementation == "reference" or logit_softcap is not None:
        return _blocked_reference_attention(query, key, value, spec, scale, logit_softcap)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "pallas" and _pallas_supports(spec):
        out = _pallas_attention(query, key, value, spec, scale)
    else:
        out = _xla_attention(query, key, value, spec, scale)
    return _zero_rows_without_keys(out, spec, key.shape[1])


# The reference path splits the queries into blocks of at most this many rows once there are
# more than two blocks' worth: a long sequence's float32 scores [B, H, L, S] are then computed,
# masked and normalised one block at a time, which bounds their memory and runs faster on
# XLA:CPU than one piece (docs/results.md, "Attention"). The rows' math is unchanged.
QUERY_BLOCK_ROWS = 256


def _blocked_reference_attention(query, key, value, spec, scale, logit_softcap) -> jax.Array:
    """`_reference_attention` under `spec`, over blocks of query rows for long sequences.

    The blocks run head-major (`[B, Hkv, G, rows, Dh]` against keys `[B, Hkv, S, Dh]`,
    transposed once): with the token-major layout XLA re-transposed the keys in every block."""
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    if q_len <= 2 * QUERY_BLOCK_ROWS:
        mask = spec.allowed(q_len, kv_len)
        return _reference_attention(query, key, value, mask, scale, logit_softcap)
    groups = num_heads // num_kv_heads
    num_blocks = -(-q_len // QUERY_BLOCK_ROWS)
    block = -(-q_len // num_blocks)
    padded = jnp.pad(query, ((0, 0), (0, num_blocks * block - q_len), (0, 0), (0, 0)))
    padded = padded.reshape(batch, -1, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    key_heads, value_heads = (jnp.swapaxes(a, 1, 2) for a in (key, value))  # [B, Hkv, S, Dh]

    def one_block(index):
        rows_query = jax.lax.dynamic_slice_in_dim(padded, index * block, block, axis=3)
        scores = jnp.einsum(
            "bkgld,bksd->bkgls", rows_query, key_heads, preferred_element_type=jnp.float32
        )
        mask = spec.allowed(q_len, kv_len, query_rows=index * block + jnp.arange(block))
        probs = _masked_softmax(scores, mask, head_dim, scale, logit_softcap)
        return jnp.einsum("bkgls,bksd->bkgld", probs.astype(value.dtype), value_heads)

    out = jax.lax.map(one_block, jnp.arange(num_blocks))  # [blocks, B, Hkv, G, rows, Dh]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, num_blocks * block, num_heads, -1)
    return out[:, :q_len]


def _masked_softmax(scores, mask, head_dim, scale, logit_softcap):
    """Scaled (and soft-capped) float32 scores `[B, Hkv, G, L, S]` -> probabilities, zero at
    masked keys (`mask` broadcastable to `[B, Hq, L, S]`), so a row without keys gives zeros."""
    scores = scores * (head_dim**-0.5 if scale is None else scale)
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    batch, num_kv_heads, groups, q_len, kv_len = scores.shape
    mask = jnp.broadcast_to(mask, (batch, num_kv_heads * groups, q_len, kv_len))
    mask = mask.reshape(scores.shape)
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.where(mask, probs, 0.0)


def _reference_attention(query, key, value, mask, scale=None, logit_softcap=None) -> jax.Array:
    """The einsum path: float32 scores `[B, Hkv, G, L, S]`, masked, softmax, zeros where a row
    has no allowed key.

    Queries, keys and values are made head-major (`[B, Hkv, G, L, Dh]`, `[B, Hkv, S, Dh]`)
    before the products, so that the scores come out of the matmul in the layout the softmax
    and the second product read: with token-major operands XLA:CPU wrote every layer's scores
    (and their gradients) through transposing copies, ~9% of the summed op time of a train
    step's gradients (hidden 512, head dim 16, length 208, `benchmarks/profile_train_step.py`;
    forward + backward 7.36 -> 6.88 s). Transposing the operands instead moves `Dh`-wide rows,
    not `S`-wide ones."""
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    query = query.reshape(batch, q_len, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    key_heads, value_heads = (jnp.swapaxes(a, 1, 2) for a in (key, value))  # [B, Hkv, S, Dh]
    scores = jnp.einsum("bkgld,bksd->bkgls", query, key_heads, preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores, mask, head_dim, scale, logit_softcap)
    out = jnp.einsum("bkgls,bksd->bkgld", probs.astype(value.dtype), value_heads)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim)


def _zero_rows_without_keys(out: jax.Array, spec: MaskSpec, kv_len: int) -> jax.Array:
    """Fused kernels give a row with no allowed key some average of values; the reference gives
    zeros. The any-reduction over the boolean mask fuses in XLA (no `[L, S]` scores are kept)."""
    mask = spec.allowed(out.shape[1], kv_len)
    if mask is None:
        return out
    has_key = jnp.any(mask, axis=-1)  # [B or 1, H or 1, L]
    has_key = jnp.broadcast_to(has_key, (out.shape[0], has_key.shape[1], out.shape[1]))
    has_key = jnp.swapaxes(has_key, 1, 2)[..., None]  # [B, L, H or 1, 1]
    return jnp.where(has_key, out, jnp.zeros((), out.dtype))


def _xla_attention(query, key, value, spec: MaskSpec, scale: float) -> jax.Array:
    """`jax.nn.dot_product_attention` with the causal flag, right-padding lengths and window
    passed natively (cuDNN takes them fused); segment ids, a prefix and a dense mask as a mask."""
    native_causal = spec.is_causal and spec.prefix_lengths is None
    rest = dataclasses.replace(
        spec, is_causal=spec.is_causal and not native_causal, seq_lengths=None, window=None
    )
    mask = rest.allowed(query.shape[1], key.shape[1])
    if mask is not None:
        mask = jnp.broadcast_to(mask, (mask.shape[0], query.shape[2], *mask.shape[2:]))
    lengths = None
    if spec.seq_lengths is not None:
        lengths = jnp.broadcast_to(jnp.asarray(spec.seq_lengths, jnp.int32), (query.shape[0],))
    window = None if spec.window is None else (spec.window - 1, key.shape[1])
    out = jax.nn.dot_product_attention(
        query,
        key.astype(query.dtype),
        value.astype(query.dtype),
        mask=mask,
        is_causal=native_causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=window,
        scale=scale,
        implementation=None,
    )
    return out.astype(query.dtype)


def _pallas_supports(spec: MaskSpec) -> bool:
    """The Pallas kernels take causal + segment ids; key padding becomes a segment."""
    return spec.dense is None and spec.prefix_lengths is None and spec.window is None


def _pallas_attention(query, key, value, spec: MaskSpec, scale: float) -> jax.Array:
    """Pallas flash attention (self-attention): kv heads repeated to the query heads (the
    kernels have no GQA), padding keys given a segment of their own."""
    batch, length, num_heads, _ = query.shape
    groups = num_heads // key.shape[2]
    key, value = (jnp.repeat(a, groups, axis=2).astype(query.dtype) for a in (key, value))
    segments = jnp.zeros((batch, length), jnp.int32)
    if spec.segment_ids is not None:
        segments = jnp.broadcast_to(jnp.asarray(spec.segment_ids, jnp.int32), (batch, length))
    if spec.seq_lengths is not None:
        lengths = jnp.asarray(spec.seq_lengths, jnp.int32).reshape(-1, 1)
        segments = jnp.where(jnp.arange(length)[None] < lengths, segments, -1)
    # Padding (negative ids) attends within itself in the kernel; those rows are zeroed after.
    # The kernels tile the sequence in blocks of 128 (32 in the GPU backward): pad up to them.
    padded = max(32, 1 << (length - 1).bit_length()) if length < 128 else -(-length // 128) * 128
    if padded != length:
        widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
        query, key, value = (jnp.pad(a, widths) for a in (query, key, value))
        segments = jnp.pad(segments, ((0, 0), (0, padded - length)), constant_values=-1)
    return _pallas_kernel(query, key, value, segments, spec.is_causal, scale)[:, :length]


def _pallas_kernel(query, key, value, segments, is_causal: bool, scale: float) -> jax.Array:
    """The Pallas flash kernel on `[B, L, H, Dh]` (L a multiple of its blocks) of the platform
    the program is traced for, under `jax.shard_map` over the batch and head axes of the mesh in
    context (`jax.sharding.get_abstract_mesh()`, which the train and encode steps set): a Mosaic
    kernel cannot be partitioned by XLA, so each device runs it on its own rows and heads."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    kernel = functools.partial(_flash_kernel, is_causal=is_causal, scale=scale, platform=platform)
    if mesh.empty:
        return kernel(query, key, value, segments)
    rules = dict(sharding.axis_rules())
    batch = _dividing_axes(mesh, rules["batch"], query.shape[0])
    heads = _dividing_axes(mesh, rules["heads"], query.shape[2])
    spec = jax.sharding.PartitionSpec(batch, None, heads, None)
    return jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(batch, None)),
        out_specs=spec,
        check_vma=False,
    )(query, key, value, segments)


def _dividing_axes(mesh, target, size: int):
    """The mesh axes of a rule's `target` that `mesh` has with more than one device, or None
    when they do not divide `size` (that dimension is then not split)."""
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    ways = math.prod(mesh.shape[a] for a in axes)
    if not axes or size % ways:
        return None
    return axes[0] if len(axes) == 1 else axes


def _flash_kernel(query, key, value, segments, *, is_causal: bool, scale: float, platform: str):
    """One device's flash attention: TPU `pallas.ops.tpu.flash_attention`; elsewhere the GPU
    kernel (`pallas.ops.gpu.attention`, in interpret mode on CPU, for tests)."""
    if platform == "tpu":
        ids = tpu_flash.SegmentIds(q=segments, kv=segments)
        out = tpu_flash.flash_attention(
            *(jnp.swapaxes(a, 1, 2) for a in (query, key, value)),
            segment_ids=ids,
            causal=is_causal,
            sm_scale=scale,
        )
        return jnp.swapaxes(out, 1, 2)
    block = gpu_flash.BlockSizes.get_default()
    return gpu_flash.mha(
        query,
        key,
        value,
        segments,
        sm_scale=scale,
        causal=is_causal,
        block_sizes=block,
        interpret=platform == "cpu",
    )


def stack_layers(
    make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs
) -> nnx.Module:
    """`num_layers` copies of `make_layer(rngs)`, parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(layer_rngs)

    return create(rngs)


# Layer stacks up to this depth run unrolled (see scan_layers). The environment variable
# METAEMBED_UNROLL_MAX_LAYERS sets it at import: 0 scans every stack, which compiles faster and
# is what the test suite uses.
UNROLL_MAX_LAYERS = int(os.environ.get("METAEMBED_UNROLL_MAX_LAYERS", "4"))


def scan_layers(
    layers: nnx.Module,
    carry: Any,
    apply_layer: Callable[[nnx.Module, Any], Any],
    remat: str = "none",
) -> Any:
    """Run `carry = apply_layer(layer, carry)` over a stacked module with `nnx.scan`.

    Compile time does not grow with depth. Stacks of at most `UNROLL_MAX_LAYERS` layers are
    unrolled (the same program without a loop): the loop's per-layer slicing of the weights and
    stacking of the backward's residuals cost more than the layers themselves at small sizes
    (docs/experiments/2026-12-speed-work.md, "Train step"), at the price of compile time growing
    with depth.
    `remat` is a key of `REMAT_POLICIES`; anything other than "none" recomputes the layer in the
    backward pass under that policy.
    """
    check_remat(remat)
    depth = jax.tree.leaves(nnx.state(layers))[0].shape[0]

    def body(carry, layer):
        return apply_layer(layer, carry)

    if remat != "none":
        body = nnx.remat(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    unroll = depth <= UNROLL_MAX_LAYERS
    return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=unroll)(carry, layers)
