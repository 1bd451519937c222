"""metaembed-jax: MetaEmbed multi-vector multimodal retrieval in JAX / Flax NNX."""

# Before anything imports jax: libtpu (with jax[tpu] installed) must never query a metadata
# server from a machine without a TPU (tpu_env.py).
from metaembed_jax import tpu_env

tpu_env.set_offline_tpu_env()

from metaembed_jax.metaembed import MetaEmbed  # noqa: E402

__all__ = ["MetaEmbed", "load_trained"]


def __getattr__(name: str):
    # load_trained pulls in the training stack (optax, orbax): imported on first use only.
    if name == "load_trained":
        from metaembed_jax.trained import load_trained

        return load_trained
    raise AttributeError(f"module 'metaembed_jax' has no attribute {name!r}")
