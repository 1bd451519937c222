"""metaembed-jax: MetaEmbed multi-vector multimodal retrieval in JAX / Flax NNX."""

from metaembed_jax.metaembed import MetaEmbed

__all__ = ["MetaEmbed"]
