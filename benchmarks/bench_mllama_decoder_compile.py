"""Compile time of the Mllama decoder's two layer-stacking choices, at tiny width.

- "segments" (the family's): each run of self-attention layers is one scanned stack, the
  cross-attention layers are applied one by one between them (program size grows with the
  number of cross-attention layers, not with the number of self-attention layers).
- "one scan + lax.cond": every layer holds both kinds' weights and one scan picks the branch
  with `lax.cond` (program size flat in both; built here only to measure, it cannot load a
  checkpoint: each layer carries the other kind's weights too).

Forward pass of the decoder only (hidden 64, 32 text positions, one 4-tile image of 5 patches),
`jit(...).lower(...).compile()` wall time, for depths with one and with several cross-attention
layers (the last one: the 11B model's pattern).

    python -m benchmarks.bench_mllama_decoder_compile
    python -m benchmarks.bench_mllama_decoder_compile --smoke   # 3 layers, no warm-up (a test)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import machine_load
from metaembed_jax.models import layers
from metaembed_jax.models.layers import rope_cos_sin
from metaembed_jax.models.mllama import tiny_config
from metaembed_jax.models.mllama.config import text_config
from metaembed_jax.models.mllama.modeling import (
    CrossAttentionLayer,
    MllamaBackbone,
    SelfAttentionLayer,
    cross_attention_masks,
    rope_inverse_frequencies,
)

BATCH, LENGTH, TILES, PATCHES = 2, 32, 4, 5
PATTERNS = ((4, [2]), (16, [2]), (16, [2, 6, 10, 14]), (40, [3, 8, 13, 18, 23, 28, 33, 38]))
# The smoke run: one depth whose cross-attention layer sits between two self-attention runs.
SMOKE_PATTERNS = ((3, [1]),)


class _BothKinds(nnx.Module):
    def __init__(self, cfg, rngs):
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, lora=None, rngs=rngs)
        self.self_layer = SelfAttentionLayer(cfg, **kw)
        self.cross_layer = CrossAttentionLayer(cfg, **kw)


class CondDecoder(nnx.Module):
    """The alternative: one scan over every layer, the kind chosen by `lax.cond`."""

    def __init__(self, config, rngs):
        self.cfg = text_config(config)
        layer_count = self.cfg.num_layers
        self.is_cross = tuple(i in self.cfg.cross_attention_layers for i in range(layer_count))
        self.layers = layers.stack_layers(lambda r: _BothKinds(self.cfg, r), layer_count, rngs)

    def __call__(self, hidden, attention_mask, vision, cross_mask):
        batch, length = hidden.shape[:2]
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        mask = causal & attention_mask.astype(bool)[:, None, None]
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(self.cfg))
        allowed, text_row = cross_attention_masks(cross_mask, PATCHES)
        flags = jnp.asarray(self.is_cross)

        def apply(layer, carry):
            x, index = carry
            x = jax.lax.cond(
                flags[index],
                lambda x: layer.cross_layer(x, vision, allowed, text_row),
                lambda x: layer.self_layer(x, cos, sin, mask),
                x,
            )
            return x, index + 1

        return layers.scan_layers(self.layers, (hidden, jnp.int32(0)), apply)[0]


def _compile_seconds(function, *args) -> float:
    start = time.perf_counter()
    jax.jit(function).lower(*args).compile()
    return time.perf_counter() - start


def _timings(config, hidden, attention_mask, vision, cross_mask) -> tuple[float, float]:
    """(segments, one scan + lax.cond) compile seconds for one config."""
    segments_def, segments = nnx.split(MllamaBackbone(config, rngs=nnx.Rngs(0)))
    cond_def, cond = nnx.split(CondDecoder(config, nnx.Rngs(0)))

    def run_segments(state, x):
        return nnx.merge(segments_def, state).decode(x, attention_mask, vision, cross_mask)

    def run_cond(state, x):
        return nnx.merge(cond_def, state)(x, attention_mask, vision, cross_mask)

    return _compile_seconds(run_segments, segments, hidden), _compile_seconds(
        run_cond, cond, hidden
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="one depth: 3 layers, cross-attention at 1"
    )
    smoke = parser.parse_args(argv).smoke
    patterns = SMOKE_PATTERNS if smoke else PATTERNS
    # The first pattern is compiled once untimed (one-time costs); the smoke run only checks
    # that everything runs, so it skips that.
    compiled = patterns if smoke else (patterns[0], *patterns)
    print(f"at start: {machine_load.describe()}")
    inputs = (
        jnp.zeros((BATCH, LENGTH, 64)),
        jnp.ones((BATCH, LENGTH), jnp.int32),
        jnp.zeros((BATCH, TILES * PATCHES, 64)),
        jnp.ones((BATCH, LENGTH, 1, TILES), jnp.int32),
    )
    rows = []
    for index, (depth, cross) in enumerate(compiled):
        text = dict(num_hidden_layers=depth, cross_attention_layers=cross)
        timings = _timings(tiny_config(300, text_config=text), *inputs)
        if smoke or index:
            rows.append((depth, len(cross), *timings))
    print(
        "| layers | cross-attention layers | segments (s) | one scan + lax.cond (s) "
        "| segments / one scan |"
    )
    print("|---|---|---|---|---|")
    for depth, crosses, segments_s, cond_s in rows:
        ratio = segments_s / cond_s
        print(f"| {depth} | {crosses} | {segments_s:.2f} | {cond_s:.2f} | {ratio:.2f}x |")
    print(f"\nat end: {machine_load.describe()}")


if __name__ == "__main__":
    main()
