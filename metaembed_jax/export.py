"""Export a trained run for PyTorch / transformers users: `metaembed export --run DIR --out OUT`.

(`--format peft`, a PEFT adapter directory, is `peft_adapter.py`.)

`--format hf` writes OUT as a transformers checkpoint of the backbone with the LoRA adapters
merged into their base weights (`config.json`, `model.safetensors` in the published key layout,
the tokenizer), loadable by `from_pretrained`, plus what MetaEmbed adds to it:
`metaembed.safetensors` (`meta_tokens` [R_q + R_c, H], query tokens first; `projection.weight`
[D, H] / `projection.bias` when the run has a projection) and `metaembed_config.json` (R_q, R_c,
readout, prompt pieces). A PyTorch user appends the meta tokens as extra embedding rows after
the content of every (left-padded) input, and reads the last R_q + R_c hidden states.

The published key of each parameter comes from inverting the backbone family's `rules`: every
`Rule` maps a checkpoint key pattern to a parameter path through a transform, so the parameter
path gives the pattern's group values and `hf_loading.INVERSE_TRANSFORMS` undoes the transform.
The checkpoint shapes the inverse needs come from transformers' own model, built on the meta
device (no memory), whose in-memory keys reach the published layout through `key_aliases`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaembed_jax.models import layers
from metaembed_jax.models.family import BackboneFamily, family_for
from metaembed_jax.models.hf_loading import (
    INVERSE_TRANSFORMS,
    Rule,
    SafetensorsReader,
    _normalise_key,
    _path_string,
)

FORMATS = ("hf", "peft")
METAEMBED_WEIGHTS = "metaembed.safetensors"
METAEMBED_CONFIG = "metaembed_config.json"


class ExportError(ValueError):
    """The model's parameters do not map onto the checkpoint layout: lists every problem."""


# ----------------------------------------------------------------------------- LoRA merge


def merged_backbone_params(backbone: nnx.Module) -> dict[str, np.ndarray]:
    """{parameter path: host array} of the backbone's base parameters, each LoRA adapter folded
    into its kernel (`kernel + lora_a @ lora_b * alpha / rank`, in float32, then cast back to
    the kernel's dtype). The LoRA parameters themselves are not in the result."""
    params = {
        _path_string(path): variable
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
        prefix = _path_string(path) + "." if path else ""
        kernel = merged[prefix + "kernel"]
        low_rank = jnp.einsum(
            "...ir,...ro->...io",
            jnp.asarray(params[prefix + "lora_a"][...], jnp.float32),
            jnp.asarray(params[prefix + "lora_b"][...], jnp.float32),
        )
        total = jnp.asarray(kernel, jnp.float32) + low_rank * module.lora_scale
        merged[prefix + "kernel"] = np.asarray(total.astype(kernel.dtype))
    return merged


# ----------------------------------------------------------------------------- rule inversion


def _pattern_groups(pattern: str) -> dict[str, str]:
    """{group name: its sub-pattern} of the named groups of a Rule pattern."""
    groups = {}
    for found in re.finditer(r"\(\?P<(\w+)>", pattern):
        groups[found.group(1)] = pattern[found.end() : _group_end(pattern, found.start()) - 1]
    return groups


def _target_regex(rule: Rule) -> re.Pattern:
    """A Rule target such as "layers.self_attn.{p}_proj.kernel" as a regex over parameter paths:
    each `{name}` accepts what the pattern's group of that name accepts (`(?P<p>q|k|v)`)."""
    groups = _pattern_groups(rule.pattern)

    def group(found: re.Match) -> str:
        name = found.group(1)
        return f"(?P<{name}>(?:{groups.get(name, '[^.]+')}))"

    return re.compile(re.sub(r"\\\{(\w+)\\\}", group, re.escape(rule.target)))


def _group_end(pattern: str, start: int) -> int:
    """Index just past the group opened at `pattern[start]` ("(")."""
    depth, index = 0, start
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        index += 1
        if depth == 0:
            return index
    raise ValueError(f"unbalanced group in rule pattern {pattern!r}")


def checkpoint_key(pattern: str, groups: Mapping[str, str]) -> str:
    """The checkpoint key a Rule `pattern` matches when its named groups take `groups`' values.

    Raises ValueError for a pattern that is not literal text plus named groups (then no single
    key corresponds to it), or a group value the pattern's group does not accept.
    """
    out, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern) and not pattern[index + 1].isalnum():
            out.append(pattern[index + 1])
            index += 2
        elif pattern.startswith("(?P<", index):
            name = pattern[index + 4 : pattern.index(">", index)]
            if name not in groups:
                raise ValueError(f"no value for group {name!r} of rule pattern {pattern!r}")
            out.append(str(groups[name]))
            index = _group_end(pattern, index)
        elif char in ".^$*+?{}[]|()\\":
            raise ValueError(
                f"rule pattern {pattern!r} is not literal text plus named groups (at {char!r}): "
                "it cannot be inverted to one checkpoint key"
            )
        else:
            out.append(char)
            index += 1
    key = "".join(out)
    if re.fullmatch(pattern, key) is None:
        raise ValueError(f"group values {dict(groups)} do not fit rule pattern {pattern!r}")
    return key


def _find_rule(name: str, inverse: list[tuple[re.Pattern, Rule]]):
    for regex, rule in inverse:
        found = regex.fullmatch(name)
        if found is not None:
            return rule, found.groupdict()
    return None, None


def _has_layer_group(pattern: str) -> bool:
    return "(?P<layer>" in pattern


def rule_inverse(family: BackboneFamily, hf_config: Mapping[str, Any]):
    """[(regex over parameter paths, Rule)] of the family's rules that load a parameter."""
    rules = [rule for rule in family.rules(hf_config) if rule.target is not None]
    return [(_target_regex(rule), rule) for rule in rules]


def published_pieces(name: str, value, inverse) -> tuple[Rule | None, list[tuple[str, Any]]]:
    """(the Rule that loads parameter `name`, [(published checkpoint key, piece of `value`)]):
    one piece per index of the leading axis for a stacked parameter (rule with a `layer`
    group), else `value` whole; (None, []) when no rule of `inverse` maps `name`."""
    rule, groups = _find_rule(name, inverse)
    if rule is None:
        return None, []
    if _has_layer_group(rule.pattern):
        return rule, [
            (checkpoint_key(rule.pattern, {**groups, "layer": i}), v) for i, v in enumerate(value)
        ]
    return rule, [(checkpoint_key(rule.pattern, groups), value)]


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
        _normalise_key(key, family.key_aliases): tuple(tensor.shape)
        for key, tensor in hf_model.state_dict().items()
    }


def _save_torch_safetensors(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """safetensors with the "pt" format tag transformers expects; bfloat16 kept bfloat16."""
    import torch
    from safetensors.torch import save_file

    def as_torch(array: np.ndarray):
        if array.dtype == jnp.bfloat16:
            return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(array))

    save_file({k: as_torch(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


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


def export_hf(model, processor, hf_config: Mapping[str, Any], out: Path, base_dir=None) -> Path:
    """Write `model` (a MetaEmbed) to `out` in the hf layout (module docstring); returns `out`.

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
    _save_torch_safetensors(tensors, out / "model.safetensors")
    processor.tokenizer.save_pretrained(out)
    own = {"meta_tokens": np.asarray(model.meta_tokens[...])}
    if model.projection is not None:
        own["projection.weight"] = np.asarray(model.projection.kernel[...]).T
        own["projection.bias"] = np.asarray(model.projection.bias[...])
    _save_torch_safetensors(own, out / METAEMBED_WEIGHTS)
    (out / METAEMBED_CONFIG).write_text(json.dumps(metaembed_config(model, processor), indent=2))
    return out


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


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf", step=None):
    """`metaembed export`: the run's checkpoint `step` (default latest) written to `out` in
    format `fmt`; returns `out`. Raises ValueError for an unknown format, and as
    `load_trained` / `export_hf` do."""
    from metaembed_jax.hub import resolve_checkpoint
    from metaembed_jax.trained import load_trained
    from metaembed_jax.training.model import base_hf_config
    from metaembed_jax.training.run_identity import read_saved_config

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; expected one of {FORMATS}")
    config = read_saved_config(run_dir)
    model, processor = load_trained(run_dir, step)
    hf_config = base_hf_config(config, len(processor.tokenizer))
    if fmt == "peft":
        from metaembed_jax.peft_adapter import export_peft
        from metaembed_jax.training.model import lora_spec

        lora = lora_spec(config)
        return export_peft(model, processor, hf_config, Path(out), lora, config.init_from or None)
    base = resolve_checkpoint(config.init_from) if config.init_from else None
    return export_hf(model, processor, hf_config, Path(out), base)
