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


def save_torch_safetensors(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """safetensors with the "pt" format tag transformers expects; bfloat16 kept bfloat16."""
    import torch
    from safetensors.torch import save_file

    def as_torch(array: np.ndarray):
        if array.dtype == jnp.bfloat16:
            return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(array))

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
