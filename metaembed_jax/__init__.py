"""metaembed-jax: MetaEmbed multi-vector multimodal retrieval in JAX / Flax NNX."""

from metaembed_jax.metaembed import MetaEmbed

__all__ = ["MetaEmbed", "QdrantIndex", "load_reference", "load_trained"]

# Names loaded on first use: they pull in the training stack (optax, orbax) or, for QdrantIndex,
# the optional Qdrant packages (loaded once it opens or pushes a collection).
_LAZY = {
    "load_trained": "metaembed_jax.formats.trained",
    "load_reference": "metaembed_jax.formats.reference",
    "QdrantIndex": "metaembed_jax.retrieval.qdrant",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metaembed_jax' has no attribute {name!r}")
