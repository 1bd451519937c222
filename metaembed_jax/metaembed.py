"""MetaEmbed: a vision-language backbone plus learnable meta tokens whose last hidden states are
the multi-vector embedding of an input (arXiv 2509.18095).

Layout, as the reference implementation does it: all `R_q + R_c` meta tokens (query tokens first)
are appended after the content of every input, query or candidate. Inputs are left-padded, so the
meta tokens are the last positions; their position ids continue as ordinary text positions after
the content; attention stays the backbone's causal mask. A query reads the states of the `R_q`
query meta tokens, a candidate those of the `R_c` candidate meta tokens.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from metaembed_jax.models import from_config, layers, load_hf

Side = Literal["query", "candidate"]
READOUTS = ("meta", "last_token")


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


def l2_normalise(vectors: jax.Array, eps: float = 1e-12) -> jax.Array:
    vectors = vectors.astype(jnp.float32)
    norm = jnp.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / jnp.maximum(norm, eps)


class MetaEmbed(nnx.Module):
    """Backbone + meta tokens + readout.

    Args:
      backbone: a module with the backbone interface (`embed_inputs`, `position_ids`, `decode`,
        `hidden_size`), e.g. from `metaembed_jax.models.load_hf`.
      num_query_tokens / num_candidate_tokens: R_q and R_c (official 16 / 64).
      projection_dim: None (default, the reference: D = hidden size) or the width of an optional
        linear projection applied to every meta state before normalisation.
      readout: "meta" (MetaEmbed) or "last_token" (the single-vector baseline: no meta tokens,
        the last content token's state, `[B, 1, D]` on both sides).
    """

    def __init__(
        self,
        backbone: nnx.Module,
        num_query_tokens: int = 16,
        num_candidate_tokens: int = 64,
        projection_dim: int | None = None,
        readout: str = "meta",
        *,
        rngs: nnx.Rngs,
    ):
        if readout not in READOUTS:
            raise ValueError(f"readout={readout!r}; expected one of {READOUTS}")
        if num_query_tokens < 1 or num_candidate_tokens < 1:
            raise ValueError(
                f"need at least one meta token per side, got R_q={num_query_tokens}, "
                f"R_c={num_candidate_tokens}"
            )
        self.backbone = backbone
        self.num_query_tokens = num_query_tokens
        self.num_candidate_tokens = num_candidate_tokens
        self.readout = readout
        hidden = backbone.hidden_size
        self.meta_tokens = layers.make_param(
            rngs,
            nnx.initializers.normal(0.02),
            (num_query_tokens + num_candidate_tokens, hidden),
            ("meta", "embed"),
            jnp.float32,  # trained fully, kept in float32 like other master weights
        )
        self.projection = (
            layers.Dense(hidden, projection_dim, ("embed", None), use_bias=True, rngs=rngs)
            if projection_dim
            else None
        )

    @property
    def embedding_dim(self) -> int:
        return self.projection.kernel.shape[-1] if self.projection else self.backbone.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        num_query_tokens: int = 16,
        num_candidate_tokens: int = 64,
        *,
        rngs: nnx.Rngs,
        projection_dim: int | None = None,
        readout: str = "meta",
        **backbone_kwargs: Any,
    ) -> MetaEmbed:
        """A MetaEmbed on a Hugging Face checkpoint dir; `backbone_kwargs` go to `load_hf`
        (dtype, param_dtype, lora, remat, mesh, rules). Meta tokens start fresh."""
        backbone = load_hf(path, **backbone_kwargs)
        return cls(
            backbone, num_query_tokens, num_candidate_tokens, projection_dim, readout, rngs=rngs
        )

    @classmethod
    def from_config(
        cls,
        hf_config: Any,
        num_query_tokens: int = 16,
        num_candidate_tokens: int = 64,
        *,
        rngs: nnx.Rngs,
        projection_dim: int | None = None,
        readout: str = "meta",
        **backbone_kwargs: Any,
    ) -> MetaEmbed:
        """A randomly initialised MetaEmbed from a transformers config (object or dict)."""
        backbone = from_config(hf_config, rngs=rngs, **backbone_kwargs)
        return cls(
            backbone, num_query_tokens, num_candidate_tokens, projection_dim, readout, rngs=rngs
        )

    def num_vectors(self, side: Side) -> int:
        if self.readout == "last_token":
            return 1
        return self.num_query_tokens if side == "query" else self.num_candidate_tokens

    def embed(
        self,
        side: Side,
        input_ids: Any,
        attention_mask: Any,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
    ) -> jax.Array:
        """Multi-vector embedding of a batch: `[B, R_q, D]` for queries, `[B, R_c, D]` for
        candidates (`[B, 1, D]` with readout "last_token"); L2-normalised float32.

        Inputs are the backbone's (left-padded `input_ids` / `attention_mask` `[B, L]`, optional
        `pixel_values` / `image_grid_thw`), numpy or jax arrays.
        """
        if side not in ("query", "candidate"):
            raise ValueError(f"side={side!r}; expected 'query' or 'candidate'")
        input_ids = jnp.asarray(input_ids, jnp.int32)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must "
                "both be [batch, length]"
            )
        hidden = self._meta_states(input_ids, attention_mask, pixel_values, image_grid_thw)
        if self.readout == "meta":
            hidden = (
                hidden[:, : self.num_query_tokens]
                if side == "query"
                else hidden[:, self.num_query_tokens :]
            )
        if self.projection is not None:
            hidden = self.projection(hidden)
        return l2_normalise(hidden)

    def _meta_states(self, input_ids, attention_mask, pixel_values, image_grid_thw) -> jax.Array:
        """Last-layer states of the appended meta tokens `[B, R_q + R_c, H]` (or, for readout
        "last_token", of the last content position `[B, 1, H]`)."""
        backbone = self.backbone
        content = backbone.embed_inputs(input_ids, pixel_values, image_grid_thw)
        positions = backbone.position_ids(input_ids, attention_mask, image_grid_thw)
        if self.readout == "last_token":
            # Left padding puts the last content token at the last position.
            return backbone.decode(content, attention_mask, positions)[:, -1:]
        batch = input_ids.shape[0]
        count = self.num_query_tokens + self.num_candidate_tokens
        meta = jnp.broadcast_to(
            self.meta_tokens[...].astype(content.dtype)[None], (batch, count, content.shape[-1])
        )
        inputs_embeds = jnp.concatenate([content, meta], axis=1)
        mask = jnp.concatenate([attention_mask, jnp.ones((batch, count), jnp.int32)], axis=1)
        positions = jnp.concatenate([positions, append_text_positions(positions, count)], -1)
        return backbone.decode(inputs_embeds, mask, positions)[:, -count:]
