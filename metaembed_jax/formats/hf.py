"""The hf export: a MetaEmbed as a transformers checkpoint (`metaembed export --format hf`).

`--format hf` writes OUT as a transformers checkpoint of the backbone with the LoRA adapters
merged into their base weights (`config.json`, `model.safetensors` in the published key layout,
the tokenizer and `preprocessor_config.json`), loadable by `from_pretrained`, plus what MetaEmbed
adds to it: `metaembed.safetensors` (`meta_tokens` [R_q + R_c, H], query tokens first;
`projection.weight` [D, H] / `projection.bias` when the run has a projection) and
`metaembed_config.json` (R_q, R_c, readout, prompt pieces, the run's data settings). A PyTorch
user appends the meta tokens as extra embedding rows after the content of every (left-padded)
input, and reads the last R_q + R_c hidden states: `formats/torch_embed.py` does it, on the
features of `load_exported_processor(OUT)`.

The published key of each parameter comes from inverting the backbone family's `rules`: every
`Rule` maps a checkpoint key pattern to a parameter path through a transform, so the parameter
path gives the pattern's group values and `rules.INVERSE_TRANSFORMS` undoes the transform.
The checkpoint shapes the inverse needs come from transformers' own model, built on the meta
device (no memory), whose in-memory keys reach the published layout through `key_aliases`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from metaembed_jax.formats.files import (
    METAEMBED_CONFIG,
    METAEMBED_WEIGHTS,
    metaembed_config,
    save_torch_safetensors,
)
from metaembed_jax.models import layers
from metaembed_jax.models.family import BackboneFamily, family_for
from metaembed_jax.models.rules import (
    INVERSE_TRANSFORMS,
    normalise_key,
    path_string,
    published_pieces,
    read_config,
    rule_inverse,
)
from metaembed_jax.models.safetensors_io import SafetensorsReader


class ExportError(ValueError):
    """The model's parameters do not map onto the checkpoint layout: lists every problem."""


# ----------------------------------------------------------------------------- LoRA merge


def merged_backbone_params(backbone: nnx.Module) -> dict[str, np.ndarray]:
    """{parameter path: host array} of the backbone's base parameters, each LoRA adapter folded
    into its kernel (`kernel + lora_a @ lora_b * alpha / rank`, in float32, then cast back to
    the kernel's dtype). The LoRA parameters themselves are not in the result."""
    params = {
        path_string(path): variable
        for path, variable in nnx.to_flat_state(nnx.state(backbone, nnx.Param))
    }
    merged = {
        name: np.asarray(variable[...])
        for name, variable in params.items()
        if not isinstance(variable, nnx.LoRAParam)
    }
    for path, module in nnx.iter_graph(backbone):
        if not isinstance(module, layers.Dense) or module.lora_scale is None:
            continue
        prefix = path_string(path) + "." if path else ""
        kernel = merged[prefix + "kernel"]
        low_rank = jnp.einsum(
            "...ir,...ro->...io",
            jnp.asarray(params[prefix + "lora_a"][...], jnp.float32),
            jnp.asarray(params[prefix + "lora_b"][...], jnp.float32),
        )
        total = jnp.asarray(kernel, jnp.float32) + low_rank * module.lora_scale
        merged[prefix + "kernel"] = np.asarray(total.astype(kernel.dtype))
    return merged


def hf_tensors(
    params: Mapping[str, np.ndarray],
    family: BackboneFamily,
    hf_config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """{published checkpoint key: tensor} of backbone parameters `params` (paths as in
    `nnx.state(backbone)`), by inverting `family.rules(hf_config)`; `shapes` are the checkpoint's
    tensor shapes by published key. A stacked parameter (rule with a `layer` group) gives one
    tensor per index of its leading axis.

    Raises ExportError listing every parameter no rule maps and every shape that disagrees.
    """
    inverse = rule_inverse(family, hf_config)
    tensors, problems = {}, []
    for name, value in params.items():
        rule, pieces = published_pieces(name, value, inverse)
        if rule is None:
            problems.append(f"parameter {name} {value.shape}: no rule maps it to a checkpoint key")
            continue
        for key, piece in pieces:
            if key not in shapes:
                problems.append(f"parameter {name} -> {key}: not a tensor of the checkpoint")
                continue
            tensor = INVERSE_TRANSFORMS[rule.transform](piece, tuple(shapes[key]))
            if tuple(tensor.shape) != tuple(shapes[key]):
                problems.append(
                    f"parameter {name} -> {key}: shape {tuple(tensor.shape)} after inverting "
                    f"'{rule.transform}', the checkpoint's is {tuple(shapes[key])}"
                )
                continue
            tensors[key] = np.ascontiguousarray(tensor)
    if problems:
        raise ExportError(f"{len(problems)} problem(s) exporting:\n  " + "\n  ".join(problems))
    return tensors


# ----------------------------------------------------------------------------- transformers side


def transformers_model_on_meta(hf_config: Mapping[str, Any]):
    """transformers' model of `hf_config` built on the meta device (shapes only, no memory):
    its config's `architectures` entry, else the image-text-to-text auto class."""
    import torch
    import transformers

    config = dict(hf_config)
    hf = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    names = list(getattr(hf, "architectures", None) or [])
    with torch.device("meta"):
        if names and hasattr(transformers, names[0]):
            return getattr(transformers, names[0])(hf)
        return transformers.AutoModelForImageTextToText.from_config(hf)


def checkpoint_shapes(hf_model, family: BackboneFamily) -> dict[str, tuple[int, ...]]:
    """{published key: shape} of a transformers model's state dict (`family.key_aliases`)."""
    return {
        normalise_key(key, family.key_aliases): tuple(tensor.shape)
        for key, tensor in hf_model.state_dict().items()
    }


def _unmapped_from_base(shapes, tensors, base_dir: str | None) -> dict[str, np.ndarray]:
    """Checkpoint tensors MetaEmbed never reads (rule target None, e.g. the LM head): copied
    from the base checkpoint when there is one; else left to transformers' initialisation."""
    missing = sorted(set(shapes) - set(tensors))
    if not missing:
        return {}
    if base_dir:
        reader = SafetensorsReader(base_dir)
        found = {key: reader[key] for key in missing if key in reader}
        missing = [key for key in missing if key not in found]
    else:
        found = {}
    if missing:
        logging.warning(
            "export: not written (unused by MetaEmbed, initialised by transformers on loading): %s",
            ", ".join(missing),
        )
    return found


def export_hf(
    model, processor, hf_config: Mapping[str, Any], out: Path, base_dir=None, data_config=None
) -> Path:
    """Write `model` (a MetaEmbed) to `out` in the hf layout (module docstring); returns `out`.

    `processor` writes the tokenizer and `preprocessor_config.json`; `data_config` (the run's
    `config.data`) is recorded in `metaembed_config.json` ("data") so that
    `load_exported_processor(out)` builds the same processor.
    Raises ExportError when a parameter does not map onto the transformers checkpoint.
    """
    family = family_for(hf_config)
    hf_model = transformers_model_on_meta(hf_config)
    shapes = checkpoint_shapes(hf_model, family)
    tensors = hf_tensors(merged_backbone_params(model.backbone), family, hf_config, shapes)
    tensors.update(_unmapped_from_base(shapes, tensors, base_dir))
    out.mkdir(parents=True, exist_ok=True)
    hf_model.config.architectures = [type(hf_model).__name__]
    hf_model.config.save_pretrained(out)
    save_torch_safetensors(tensors, out / "model.safetensors")
    processor.save_pretrained(out)
    own = {"meta_tokens": np.asarray(model.meta_tokens[...])}
    if model.projection is not None:
        own["projection.weight"] = np.asarray(model.projection.kernel[...]).T
        own["projection.bias"] = np.asarray(model.projection.bias[...])
    save_torch_safetensors(own, out / METAEMBED_WEIGHTS)
    settings = metaembed_config(model, processor)
    if data_config is not None:
        settings["data"] = json.loads(json.dumps(data_config.to_dict()))
    (out / METAEMBED_CONFIG).write_text(json.dumps(settings, indent=2))
    return out


def load_exported_processor(directory: str | os.PathLike):
    """Our processor (numpy features) for a directory written by `metaembed export --format hf`:
    the family's `make_processor` on the directory's tokenizer / `preprocessor_config.json`
    with the run's data settings (`metaembed_config.json` "data"), i.e. the processor the run
    trained with. Its features go to `MetaEmbed.embed` or, in PyTorch, to
    `formats.torch_embed.ExportedMetaEmbed.embed`.

    Raises FileNotFoundError / ValueError naming the missing file or field.
    """
    settings_file = Path(directory) / METAEMBED_CONFIG
    if not settings_file.is_file():
        raise FileNotFoundError(f"{settings_file} not found: not a `metaembed export` directory")
    data = json.loads(settings_file.read_text()).get("data")
    if data is None:
        raise ValueError(
            f"{settings_file} has no 'data' entry (the run's config.data): export the run again "
            "with `metaembed export --format hf`"
        )
    family = family_for(read_config(directory))
    return family.make_processor(ConfigDict(data), os.fspath(directory))
