"""metaembed-jax: MetaEmbed multi-vector multimodal retrieval in JAX / Flax NNX."""
