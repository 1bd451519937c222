"""The files an export writes besides the backbone's weights: MetaEmbed's own settings
(`metaembed_config.json`) and weights (`metaembed.safetensors`), saved in the format transformers
reads."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

METAEMBED_WEIGHTS = "metaembed.safetensors"
METAEMBED_CONFIG = "metaembed_config.json"
TORCH_INSTALL = (
    'pip install "metaembed-jax[export]" (the CPU build of torch: pip install torch==2.13.0 '
    "--index-url https://download.pytorch.org/whl/cpu)"
)


class MissingTorchError(ImportError):
    """Export needs PyTorch (transformers' model and safetensors' torch writer)."""


def require_torch() -> None:
    """Raise MissingTorchError, saying how to install it, when torch cannot be imported. Call it
    before anything imports transformers, which prints a warning of its own without torch."""
    try:
        import torch  # noqa: F401
    except ImportError as error:
        raise MissingTorchError(
            f"metaembed export needs PyTorch, which is not installed ({error}): {TORCH_INSTALL}"
        ) from None


def save_torch_safetensors(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """safetensors with the "pt" format tag transformers expects; bfloat16 kept bfloat16."""
    import torch
    from safetensors.torch import save_file

    def as_torch(array: np.ndarray):
        if array.dtype == jnp.bfloat16:
            return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(array, order="C"))  # a copy: C order, writable

    save_file({k: as_torch(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def metaembed_config(model, processor) -> dict[str, Any]:
    """What a PyTorch user needs besides the weights: R_q, R_c, readout, prompt pieces."""
    prefixes = getattr(processor, "prefixes", {})
    return {
        "num_query_tokens": int(model.num_query_tokens),
        "num_candidate_tokens": int(model.num_candidate_tokens),
        "readout": model.readout,
        "projection_dim": None if model.projection is None else int(model.embedding_dim),
        "meta_tokens": "appended after the content of every left-padded input, query tokens "
        "first; a query reads the first num_query_tokens of their last hidden states, a "
        "candidate the last num_candidate_tokens; then L2 normalisation",
        "query_prefix": prefixes.get("query"),
        "candidate_prefix": prefixes.get("candidate"),
        "image_instruction": getattr(processor, "image_instruction", None),
    }
