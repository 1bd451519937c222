"""layers.dot_product_attention: every implementation equals a numpy transcription of masked
softmax attention for causal, padded, prefix-LM, sliding-window and segment masks, with GQA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metaembed_jax import sharding
from metaembed_jax.models import layers

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 24, 4, 2, 8
IMPLS = layers.ATTENTION_IMPLS


def numpy_attention(query, key, value, allowed):
    """Softmax attention in float64 with a boolean `[B, L, S]` mask; rows with no key are 0."""
    query, key, value = (np.asarray(a, np.float64) for a in (query, key, value))
    groups = query.shape[2] // key.shape[2]
    key, value = np.repeat(key, groups, axis=2), np.repeat(value, groups, axis=2)
    scores = np.einsum("blhd,bshd->bhls", query, key) / np.sqrt(query.shape[-1])
    mask = allowed[:, None]
    scores = np.where(mask, scores, -np.inf)
    peak = np.max(np.where(mask, scores, -1e300), axis=-1, keepdims=True)
    weights = np.where(mask, np.exp(scores - peak), 0.0)
    total = weights.sum(-1, keepdims=True)
    probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return np.einsum("bhls,bshd->blhd", probs, value)


def qkv(seed=0, length=LENGTH):
    keys = jax.random.split(jax.random.key(seed), 3)
    query = jax.random.normal(keys[0], (BATCH, length, HEADS, HEAD_DIM), jnp.float32)
    key = jax.random.normal(keys[1], (BATCH, length, KV_HEADS, HEAD_DIM), jnp.float32)
    value = jax.random.normal(keys[2], (BATCH, length, KV_HEADS, HEAD_DIM), jnp.float32)
    return query, key, value


LENGTHS = np.array([LENGTH, 15])
PREFIX = np.array([5, 11])
SEGMENTS = np.array([[0] * 10 + [1] * 9 + [-1] * 5, [3] * 4 + [7] * 12 + [2] * 8])
L, S = np.arange(LENGTH)[:, None], np.arange(LENGTH)[None, :]
CAUSAL = np.broadcast_to(S <= L, (BATCH, LENGTH, LENGTH))

# name -> (keywords of dot_product_attention, the allowed [B, L, S] mask they mean)
CASES = {
    "causal": (dict(is_causal=True), CAUSAL),
    "padded": (
        dict(is_causal=True, seq_lengths=LENGTHS),
        CAUSAL & (S[None] < LENGTHS[:, None, None]) & (L[None] < LENGTHS[:, None, None]),
    ),
    "prefix_lm": (
        dict(is_causal=True, prefix_lengths=PREFIX, seq_lengths=LENGTHS),
        (CAUSAL | (S[None] < PREFIX[:, None, None]))
        & (S[None] < LENGTHS[:, None, None])
        & (L[None] < LENGTHS[:, None, None]),
    ),
    "sliding_window": (dict(is_causal=True, window=4), CAUSAL & (L - S < 4)[None]),
    "segments": (
        dict(segment_ids=SEGMENTS),
        (SEGMENTS[:, :, None] == SEGMENTS[:, None, :]) & (SEGMENTS[:, None, :] >= 0),
    ),
    "causal_segments": (
        dict(is_causal=True, segment_ids=SEGMENTS),
        CAUSAL & (SEGMENTS[:, :, None] == SEGMENTS[:, None, :]) & (SEGMENTS[:, None, :] >= 0),
    ),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_path_equals_numpy(impl, case):
    keywords, allowed = CASES[case]
    query, key, value = qkv()
    out = layers.dot_product_attention(query, key, value, implementation=impl, **keywords)
    assert out.shape == query.shape and out.dtype == query.dtype
    np.testing.assert_allclose(
        np.asarray(out), numpy_attention(query, key, value, allowed), atol=2e-5, rtol=2e-5
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_dense_mask_left_padding(impl):
    """The dense mask (left padding, as the Qwen decoder builds it) on every path; a fully
    padded row gives zeros, not NaN."""
    real = np.ones((BATCH, LENGTH), bool)
    real[1, :9] = False
    allowed = CAUSAL & real[:, None, :]
    query, key, value = qkv(1)
    out = layers.dot_product_attention(
        query, key, value, jnp.asarray(allowed)[:, None], implementation=impl
    )
    expected = numpy_attention(query, key, value, allowed)
    assert np.all(np.asarray(out)[1, :9] == 0)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)


# Mllama's vision mask: a pair is masked only when query AND key are padding.
REAL = np.arange(LENGTH)[None, :] < LENGTHS[:, None]
EITHER_REAL = REAL[:, :, None] | REAL[:, None, :]
BLOCKED_CASES = {
    **CASES,
    "dense_rows": (dict(mask=EITHER_REAL[:, None]), EITHER_REAL),
    "dense_keys_only": (
        dict(mask=REAL[:, None, None, :]),
        np.broadcast_to(REAL[:, None], CAUSAL.shape),
    ),
}


@pytest.mark.parametrize("case", sorted(BLOCKED_CASES))
def test_reference_over_query_blocks_equals_numpy(case, monkeypatch):
    """Long sequences run the reference path over blocks of query rows (5 rows here: 24 queries
    = 5 blocks, the last padded): the same values, and the same gradients as one block."""
    keywords, allowed = BLOCKED_CASES[case]
    query, key, value = qkv(4)
    weights = jax.random.normal(jax.random.key(8), query.shape)

    def loss(q, k, v):
        out = layers.dot_product_attention(q, k, v, implementation="reference", **keywords)
        return jnp.sum(out * weights), out

    (_, whole), whole_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        query, key, value
    )
    monkeypatch.setattr(layers, "QUERY_BLOCK_ROWS", 5)
    (_, blocked), blocked_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        query, key, value
    )
    expected = numpy_attention(query, key, value, allowed)
    np.testing.assert_allclose(np.asarray(blocked), expected, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(whole), expected, atol=2e-5, rtol=2e-5)
    for got, want in zip(blocked_grads, whole_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_reference_over_query_blocks_with_soft_cap(monkeypatch):
    """Gemma 2's soft-capped scores through the blocked path equal one block."""
    query, key, value = qkv(5)
    run = functools.partial(
        layers.dot_product_attention, is_causal=True, logit_softcap=2.0, implementation="reference"
    )
    whole = run(query, key, value)
    monkeypatch.setattr(layers, "QUERY_BLOCK_ROWS", 7)
    np.testing.assert_allclose(np.asarray(run(query, key, value)), whole, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gradients_equal_reference(impl):
    """Training differentiates through the chosen path: its gradients equal the reference's."""
    query, key, value = qkv(2)
    keywords = dict(is_causal=True, segment_ids=SEGMENTS, seq_lengths=LENGTHS)
    weights = jax.random.normal(jax.random.key(9), query.shape)

    def loss(q, k, v, name):
        out = layers.dot_product_attention(q, k, v, implementation=name, **keywords)
        return jnp.sum(out * weights)

    grads = jax.grad(loss, argnums=(0, 1, 2))(query, key, value, impl)
    expected = jax.grad(loss, argnums=(0, 1, 2))(query, key, value, "reference")
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_pallas_several_blocks():
    """A sequence longer than one 128-row kernel block (padded up to 256) with segments."""
    length = 160
    query, key, value = qkv(3, length)
    segments = np.repeat(np.arange(5), 32)[None].repeat(BATCH, 0)
    allowed = segments[:, :, None] == segments[:, None, :]
    out = layers.dot_product_attention(
        query, key, value, segment_ids=segments, is_causal=True, implementation="pallas"
    )
    causal = np.arange(length)[None, :] <= np.arange(length)[:, None]
    expected = numpy_attention(query, key, value, allowed & causal[None])
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)


def test_pallas_under_a_mesh_is_shard_mapped_and_equals_reference():
    """Under a mesh in context (as the train and encode steps trace), the Pallas kernel runs
    under shard_map over the batch (data x fsdp) and head (tensor) axes, since XLA cannot
    partition a Mosaic kernel: outputs and gradients equal the reference path's (interpret
    mode on 8 CPU devices)."""
    mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=sharding.AUTO_AXES)
    keys = jax.random.split(jax.random.key(4), 4)
    batch = 4  # divisible by data x fsdp, heads (4) by tensor
    query = jax.random.normal(keys[0], (batch, LENGTH, HEADS, HEAD_DIM))
    key, value = (jax.random.normal(k, (batch, LENGTH, KV_HEADS, HEAD_DIM)) for k in keys[1:3])
    weights = jax.random.normal(keys[3], query.shape)
    segments = np.concatenate([SEGMENTS, SEGMENTS[::-1]])

    def loss(q, k, v, name):
        out = layers.dot_product_attention(
            q, k, v, implementation=name, is_causal=True, segment_ids=segments
        )
        return jnp.sum(out * weights), out

    def run(name):
        fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        with sharding.mesh_context(mesh):
            return jax.jit(fn, static_argnums=3)(query, key, value, name)

    with sharding.mesh_context(mesh):
        traced = jax.make_jaxpr(loss, static_argnums=3)(query, key, value, "pallas")
    assert "shard_map" in str(traced)
    (_, out), grads = run("pallas")
    (_, expected_out), expected = run("reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected_out), atol=2e-5, rtol=2e-5)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_process_wide_choice_and_errors():
    query, key, value = qkv()
    try:
        layers.set_attention_impl("xla")
        assert layers.attention_impl() == "xla"
        out = layers.dot_product_attention(query, key, value, is_causal=True)
    finally:
        layers.set_attention_impl("reference")
    np.testing.assert_allclose(
        np.asarray(out), numpy_attention(query, key, value, CAUSAL), atol=2e-5, rtol=2e-5
    )
    with pytest.raises(ValueError, match="expected one of"):
        layers.set_attention_impl("flash")
    with pytest.raises(ValueError, match="not divisible"):
        layers.dot_product_attention(query, key[:, :, :1].repeat(3, 2), value, is_causal=True)
    with pytest.raises(ValueError, match="prefix_lengths"):
        layers.dot_product_attention(query, key, value, prefix_lengths=PREFIX)


class _Affine(nnx.Module):
    """One layer of a stack: x -> tanh(x @ w + b)."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 4)) * 0.5)
        self.b = nnx.Param(jax.random.normal(rngs.params(), (4,)))

    def __call__(self, x):
        return jnp.tanh(x @ self.w + self.b)


@pytest.mark.parametrize("depth", [2, 6])  # unrolled, scanned (at the default threshold 4)
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_layers_equals_a_python_loop(depth, remat, monkeypatch):
    """Short stacks run unrolled, deeper ones under a scan: both are the layer-by-layer loop,
    values and gradients. (The suite otherwise scans every stack: conftest sets
    METAEMBED_UNROLL_MAX_LAYERS=0 for compile time.)"""
    monkeypatch.setattr(layers, "UNROLL_MAX_LAYERS", 4)

    @nnx.vmap(in_axes=0, out_axes=0)
    def stack(key):
        return _Affine(nnx.Rngs(params=key))

    stacked = stack(jax.random.split(jax.random.key(0), depth))
    x = jax.random.normal(jax.random.key(1), (3, 4))

    def by_scan(module, x):
        return jnp.sum(layers.scan_layers(module, x, lambda layer, h: layer(h), remat) ** 2)

    def by_loop(module, x):
        w, b = module.w.value, module.b.value
        for i in range(depth):
            x = jnp.tanh(x @ w[i] + b[i])
        return jnp.sum(x**2)

    got, want = nnx.value_and_grad(by_scan)(stacked, x), nnx.value_and_grad(by_loop)(stacked, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
