"""metaembed-jax: MetaEmbed multi-vector multimodal retrieval in JAX / Flax NNX."""

from metaembed_jax.metaembed import MetaEmbed

__all__ = ["MetaEmbed", "QdrantIndex", "load_trained"]


def __getattr__(name: str):
    # load_trained pulls in the training stack (optax, orbax): imported on first use only.
    if name == "load_trained":
        from metaembed_jax.trained import load_trained

        return load_trained
    # QdrantIndex: its optional Qdrant packages load only once it opens or pushes a collection.
    if name == "QdrantIndex":
        from metaembed_jax.qdrant_index import QdrantIndex

        return QdrantIndex
    raise AttributeError(f"module 'metaembed_jax' has no attribute {name!r}")
