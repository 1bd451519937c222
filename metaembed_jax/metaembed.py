"""MetaEmbed: a vision-language backbone plus learnable meta tokens whose last hidden states are
the multi-vector embedding of an input (arXiv 2509.18095).

Layout, as the reference implementation does it: all `R_q + R_c` meta tokens (query tokens first)
are appended after the content of every input, query or candidate. Inputs are left-padded, so the
meta tokens are the last positions; their position ids continue as ordinary text positions after
the content; attention stays the backbone's causal mask. A query reads the states of the `R_q`
query meta tokens, a candidate those of the `R_c` candidate meta tokens.

The backbone family decides what "after the content" means for its inputs (positions, masks,
cross-attention): MetaEmbed only calls `backbone.encode_with_suffix(meta_tokens, **features)`
(`models/family.py`), so it works on every registered family without naming their features.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaembed_jax.models import from_config, layers, load_hf
from metaembed_jax.models.hf_loading import read_retrieval_head

Side = Literal["query", "candidate"]
READOUTS = ("meta", "last_token")


def l2_normalise(vectors: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`vectors / max(||vectors||, eps)` over the last axis, in float32."""
    vectors = vectors.astype(jnp.float32)
    norm = jnp.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / jnp.maximum(norm, eps)


class MetaEmbed(nnx.Module):
    """Backbone + meta tokens + readout.

    Args:
      backbone: a module with the family Backbone interface (`hidden_size`, `__call__`,
        `encode_with_suffix`; `models/family.py`), e.g. from `metaembed_jax.models.load_hf`.
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

    def set_projection(self, weight, bias) -> None:
        """Set the projection from a torch-layout linear layer: weight [D, H], bias [D] (a
        base's or an adapter's `custom_text_proj`). Raises ValueError for other shapes."""
        expected = (self.embedding_dim, self.backbone.hidden_size)
        if self.projection is None or tuple(np.shape(weight)) != expected:
            raise ValueError(
                f"custom_text_proj weight {tuple(np.shape(weight))} does not fit the "
                f"projection of this model (projection_dim="
                f"{self.embedding_dim if self.projection else None}, hidden "
                f"{self.backbone.hidden_size}): expected {expected}"
            )
        for variable, value in (
            (self.projection.kernel, np.asarray(weight).T),
            (self.projection.bias, bias),
        ):
            current = variable[...]
            variable[...] = jax.device_put(
                jnp.asarray(value, current.dtype), getattr(current, "sharding", None)
            )

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
        """A MetaEmbed on a Hugging Face checkpoint dir (or Hub id), in inference mode (LoRA
        dropout off; `model.train()` turns it on); `backbone_kwargs` go to `load_hf` (dtype,
        param_dtype, lora, remat, mesh, rules). The meta tokens start fresh.

        A base with a retrieval head (`custom_text_proj`, ColQwen2.5 / ColPali checkpoints)
        gives the projection its weights when `projection_dim` is the head's width; otherwise
        the head is not used, and a warning says so. A model trained with the reference PyTorch
        code (a PEFT adapter on a base) loads with `metaembed_jax.load_reference`.
        """
        if "adapter" in backbone_kwargs:
            raise TypeError(
                "MetaEmbed.from_pretrained(..., adapter=...) moved: load a PEFT adapter with "
                "metaembed_jax.load_reference(base, adapter, num_query_tokens=...)"
            )
        backbone = load_hf(path, **backbone_kwargs)
        model = cls(
            backbone, num_query_tokens, num_candidate_tokens, projection_dim, readout, rngs=rngs
        )
        head = read_retrieval_head(path)
        if head is not None and projection_dim == head[0].shape[0]:
            model.set_projection(*head)
        elif head is not None:
            logging.warning(
                "%s: its retrieval head custom_text_proj (%d x %d) is not used (projection_dim="
                "%s); pass projection_dim=%d to apply it",
                path, *head[0].shape, projection_dim, head[0].shape[0],
            )  # fmt: skip
        model.eval()
        return model

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
        """A randomly initialised MetaEmbed from a transformers config (object or dict), in
        inference mode (`model.train()` turns LoRA dropout on)."""
        backbone = from_config(hf_config, rngs=rngs, **backbone_kwargs)
        model = cls(
            backbone, num_query_tokens, num_candidate_tokens, projection_dim, readout, rngs=rngs
        )
        model.eval()
        return model

    def num_vectors(self, side: Side) -> int:
        if self.readout == "last_token":
            return 1
        return self.num_query_tokens if side == "query" else self.num_candidate_tokens

    def embed(self, side: Side, **features: Any) -> jax.Array:
        """Multi-vector embedding of a batch: `[B, R_q, D]` for queries, `[B, R_c, D]` for
        candidates (`[B, 1, D]` with readout "last_token"); L2-normalised float32.

        `features` are the backbone family's keyword inputs (`BackboneFamily.feature_keys`: the
        left-padded `input_ids` / `attention_mask` and the family's image arrays), numpy or jax
        arrays.
        """
        if side not in ("query", "candidate"):
            raise ValueError(f"side={side!r}; expected 'query' or 'candidate'")
        if self.readout == "last_token":
            # Left padding puts the last content token at the last position.
            hidden = self.backbone(**features)[:, -1:]
        else:
            meta = self.backbone.encode_with_suffix(self.meta_tokens[...][None], **features)
            hidden = (
                meta[:, : self.num_query_tokens]
                if side == "query"
                else meta[:, self.num_query_tokens :]
            )
        if self.projection is not None:
            hidden = self.projection(hidden)
        return l2_normalise(hidden)
