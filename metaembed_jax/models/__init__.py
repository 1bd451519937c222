"""Vision-language backbones in Flax NNX, loaded from Hugging Face checkpoints."""

from metaembed_jax.models.hf_loading import from_config, load_hf

__all__ = ["from_config", "load_hf"]
