"""metaembed-jax: MetaEmbed multi-vector multimodal retrieval in JAX / Flax NNX."""

# Before anything imports jax: libtpu (with jax[tpu] installed) must never query a metadata
# server from a machine without a TPU (tpu_env.py).
from metaembed_jax import tpu_env

tpu_env.set_offline_tpu_env()

from metaembed_jax.metaembed import MetaEmbed  # noqa: E402

__all__ = [
    "MetaEmbed",
    "MultiVectorIndex",
    "QdrantIndex",
    "Retriever",
    "load_reference",
    "load_trained",
]

# Names loaded on first use: they pull in the training stack (optax, orbax); QdrantIndex's
# optional Qdrant packages load only once it opens or pushes a collection.
_LAZY = {
    "load_trained": "metaembed_jax.formats.trained",
    "load_reference": "metaembed_jax.formats.reference",
    "QdrantIndex": "metaembed_jax.retrieval.qdrant",
    "MultiVectorIndex": "metaembed_jax.retrieval.index",
    "Retriever": "metaembed_jax.retrieval.retriever",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metaembed_jax' has no attribute {name!r}")
