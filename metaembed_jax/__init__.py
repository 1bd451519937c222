"""metaembed-jax: MetaEmbed multi-vector multimodal retrieval in JAX / Flax NNX."""

from metaembed_jax.metaembed import MetaEmbed

__all__ = ["MetaEmbed", "load_trained"]


def __getattr__(name: str):
    # load_trained pulls in the training stack (optax, orbax): imported on first use only.
    if name == "load_trained":
        from metaembed_jax.trained import load_trained

        return load_trained
    raise AttributeError(f"module 'metaembed_jax' has no attribute {name!r}")
