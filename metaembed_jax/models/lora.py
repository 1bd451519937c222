"""LoRA wherever a PEFT target puts it: the text decoder, the vision tower, the projector.

A backbone built with a `LoRASpec` first gives every dense layer an adapter; `select_lora` then
keeps exactly those whose transformers in-memory module name (derived from the family's rule
table, `rules.module_names`) PEFT's `target_modules` / `exclude_modules` select, as PEFT's
`check_target_module_exists` matches them, and drops the others. So training, loading a PEFT
adapter and exporting one agree on the adapted layers by construction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flax import nnx

from metaembed_jax.models import layers, rules
from metaembed_jax.models.family import BackboneFamily
from metaembed_jax.models.rules import path_string


def _names_match(names: tuple[str, ...] | str, module: str) -> bool:
    """PEFT's rule: a string full-matches as a regex; a list names modules or name suffixes."""
    if isinstance(names, str):
        return bool(names) and re.fullmatch(names, module) is not None
    return any(module == name or module.endswith("." + name) for name in names)


def targets_module(spec: layers.LoRASpec, module: str) -> bool:
    """Whether PEFT would adapt the module named `module` (transformers' in-memory name)."""
    if spec.exclude and _names_match(spec.exclude, module):
        return False
    if any(re.match(rf"(^|.*\.){saved}($|\..*)", module) for saved in spec.modules_to_save):
        return False
    return _names_match(spec.targets, module)


def dense_layers(module: nnx.Module, *, with_lora: bool = False) -> dict[str, layers.Dense]:
    """{module path: Dense} of every dense layer of `module` (only adapted ones: `with_lora`)."""
    return {
        path_string(path): dense
        for path, dense in nnx.iter_graph(module)
        if isinstance(dense, layers.Dense) and (not with_lora or dense.lora_scale is not None)
    }


def stack_depth(dense: layers.Dense) -> int | None:
    """The number of stacked layers of `dense` (its kernel `[L, in, out]`), None if unstacked."""
    return dense.kernel.shape[0] if len(dense.kernel.shape) == 3 else None


def adapted_module_names(
    backbone: nnx.Module, family: BackboneFamily, hf_config: Mapping[str, Any]
) -> dict[str, list[str | None]]:
    """{dense path: per layer, its in-memory module name if it carries an adapter, else None}
    for every adapted dense layer of `backbone`."""
    inverse = rules.rule_inverse(family, hf_config)
    out = {}
    for path, dense in dense_layers(backbone, with_lora=True).items():
        _, names = rules.module_names(path + ".kernel", stack_depth(dense), family, inverse)
        chosen = dense.lora_layers
        out[path] = [n if chosen is None or i in chosen else None for i, n in enumerate(names)]
    return out


def select_lora(
    backbone: nnx.Module,
    spec: layers.LoRASpec,
    family: BackboneFamily,
    hf_config: Mapping[str, Any],
) -> None:
    """Keep the adapters of the dense layers `spec` targets, drop the rest (in place).

    A layer no rule of the family loads has no transformers name and is never adapted.
    Raises ValueError for a target whose weight is not a plain linear map (a patch-embedding
    convolution: PEFT would give it a convolutional adapter, which this model does not have).
    """
    inverse = rules.rule_inverse(family, hf_config)
    for path, dense in dense_layers(backbone, with_lora=True).items():
        rule, names = rules.module_names(path + ".kernel", stack_depth(dense), family, inverse)
        chosen = tuple(i for i, name in enumerate(names) if targets_module(spec, name))
        if not chosen:
            dense.remove_lora()
            continue
        if rule.transform != "linear":
            raise ValueError(
                f"LoRA target {names[chosen[0]]}: its weight is loaded by the "
                f"'{rule.transform}' rule (a convolution), and LoRA is supported on linear "
                "layers only; narrow lora targets / target_modules to exclude it"
            )
        dense.lora_layers = None if len(chosen) == len(names) else chosen


def partially_adapted(backbone: nnx.Module) -> dict[str, tuple[int, ...]]:
    """{dense path: adapted layer indices} of stacked layers adapted on some layers only."""
    return {
        path: dense.lora_layers
        for path, dense in dense_layers(backbone, with_lora=True).items()
        if dense.lora_layers is not None
    }
