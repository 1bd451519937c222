"""Reading Hugging Face checkpoints into Flax NNX backbones, tensor by tensor, without torch.

The backbone family of a checkpoint (`models/family.py`, found from `config.json`'s `model_type`
by `family_for`) provides:
- `build(config, dtype=, param_dtype=, lora=, remat=, rngs=)` -> the NNX module, from the raw
  `config.json` dict (both the published flat spelling and transformers 5's nested `text_config`);
- `rules(config)` -> a declarative table of `Rule`s mapping checkpoint keys to parameter paths;
- `key_aliases`: prefix rewrites so that every published key layout reaches the same rules.

`load_hf` builds the module abstractly (`nnx.eval_shape`, no memory for weights), then walks the
parameters: each one is assembled on the host from its checkpoint tensor(s) (memory-mapped, so only
one parameter is materialised at a time), cast, and placed on its device / sharding. Every
problem (missing, unexpected, wrongly-shaped tensors) is collected and raised as one error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaembed_jax import sharding
from metaembed_jax.models.family import BackboneFamily, family_for
from metaembed_jax.models.hub import resolve_checkpoint
from metaembed_jax.models.lora import select_lora
from metaembed_jax.models.rules import (
    RETRIEVAL_HEAD,
    TRANSFORMS,
    CheckpointMismatchError,
    config_to_dict,
    is_retrieval_head,
    normalise_key,
    path_string,
    read_config,
)
from metaembed_jax.models.safetensors_io import SafetensorsReader


class OverlayReader:
    """A checkpoint's tensors with some replaced: `overrides` ({key: tensor}, in any key layout
    the family's aliases know, e.g. a PEFT adapter's saved modules) win over the base's tensors
    of the same key."""

    def __init__(self, base: SafetensorsReader, overrides: Mapping[str, np.ndarray], aliases):
        replaced = {normalise_key(key, aliases) for key in overrides}
        self._base = base
        self._overrides = dict(overrides)
        self._keys = sorted(
            [k for k in base if normalise_key(k, aliases) not in replaced] + list(overrides)
        )

    def keys(self) -> list[str]:
        return self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._overrides[key] if key in self._overrides else self._base[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self[key]))


def read_retrieval_head(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """The checkpoint's `custom_text_proj` (weight [D, H], bias [D]; ColQwen / ColPali bases),
    or None when it has none."""
    reader = SafetensorsReader(resolve_checkpoint(path))
    weight_key, bias_key = f"{RETRIEVAL_HEAD}.weight", f"{RETRIEVAL_HEAD}.bias"
    if weight_key not in reader:
        return None
    weight = np.asarray(reader[weight_key], np.float32)
    bias = np.asarray(reader[bias_key], np.float32) if bias_key in reader else None
    return weight, np.zeros(weight.shape[0], np.float32) if bias is None else bias


def _match_checkpoint_keys(
    reader: SafetensorsReader, family: BackboneFamily, config, problems: list[str]
) -> dict[str, list[tuple[int | None, str, str]]]:
    """Group checkpoint keys by target parameter path: {target: [(layer, key, transform)]}."""
    compiled = [(re.compile(rule.pattern), rule) for rule in family.rules(config)]
    by_target: dict[str, list[tuple[int | None, str, str]]] = {}
    for key in reader:
        name = normalise_key(key, family.key_aliases)
        if is_retrieval_head(name):
            continue  # MetaEmbed's own head, not the backbone's (read_retrieval_head)
        for regex, rule in compiled:
            found = regex.fullmatch(name)
            if found is None:
                continue
            if rule.target is not None:
                layer = found.groupdict().get("layer")
                target = rule.target.format(**found.groupdict())
                by_target.setdefault(target, []).append(
                    (None if layer is None else int(layer) - rule.layer_offset, key, rule.transform)
                )
            break
        else:
            problems.append(f"unexpected tensor {key} {reader.shape(key)}")
    return by_target


def _assemble(reader, sources, shape, np_dtype, path: str, problems: list[str]):
    """Build one parameter array on the host from its checkpoint tensor(s), or None on error."""
    array = np.empty(shape, dtype=np_dtype)
    filled = np.zeros(shape[0] if sources[0][0] is not None else 1, dtype=bool)
    for layer, key, transform in sources:
        tensor = TRANSFORMS[transform](reader[key])
        expected = shape[1:] if layer is not None else shape
        if tuple(tensor.shape) != tuple(expected):
            problems.append(
                f"wrong shape for {path} from {key}: got {tuple(tensor.shape)} after "
                f"'{transform}', expected {tuple(expected)}"
            )
            return None
        if layer is None:
            array[...] = tensor.astype(np_dtype)
            filled[0] = True
        elif layer >= shape[0]:
            problems.append(f"unexpected tensor {key}: layer {layer} >= {shape[0]} layers")
            return None
        else:
            array[layer] = tensor.astype(np_dtype)
            filled[layer] = True
    if not filled.all():
        missing = np.flatnonzero(~filled).tolist()
        problems.append(f"missing tensor for {path} at layers {missing}")
        return None
    return array


def _iter_variables(state) -> Iterator[tuple[str, Any]]:
    for path, variable in nnx.to_flat_state(state):
        yield path_string(path), variable


def from_config(
    config: Any,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    lora=None,
    remat: str = "none",
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A randomly initialised backbone from a transformers config object or its dict."""
    config = config_to_dict(config)
    family = family_for(config)
    backbone = family.build(
        config, dtype=dtype, param_dtype=param_dtype or dtype, lora=lora, remat=remat, rngs=rngs
    )
    if lora is not None:
        select_lora(backbone, lora, family, config)
    return backbone


# Parameters the checkpoint holds; everything else (LoRA adapters, RNG state) starts fresh.
CHECKPOINT_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def load_hf(
    path: str | os.PathLike,
    dtype=jnp.float32,
    param_dtype=None,
    lora=None,
    remat: str = "none",
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    overrides: Mapping[str, np.ndarray] | None = None,
) -> nnx.Module:
    """A Hugging Face checkpoint directory -> Flax NNX backbone with its weights.

    `dtype` is the compute dtype, `param_dtype` the storage dtype (default: `dtype`). With `mesh`,
    every variable (checkpoint weights, fresh LoRA adapters and RNG streams) is placed directly
    onto the sharding its logical axis names get from `rules` (default: `sharding.axis_rules()`),
    once: callers need not place it again. `overrides` ({checkpoint key: tensor}) replace the
    checkpoint's tensors of the same key (a PEFT adapter's fully saved modules); an override no
    rule maps is an unexpected tensor. A retrieval head beside the backbone (`custom_text_proj`)
    is not read here (`read_retrieval_head`).
    Raises FileNotFoundError for a missing dir/config/weights and CheckpointMismatchError listing
    every missing, unexpected or wrongly-shaped tensor.
    """
    path = resolve_checkpoint(path)
    config = read_config(path)
    family = family_for(config)

    def build():
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, lora=lora, remat=remat)
        return from_config(config, rngs=nnx.Rngs(0), **kwargs)

    rules = rules or sharding.axis_rules()
    graphdef, checkpoint_state, abstract_fresh = nnx.split(
        nnx.eval_shape(build), CHECKPOINT_PARAMS, ...
    )
    # Only the small non-checkpoint state (LoRA adapters, RNG streams) is materialised, directly
    # in its shards: XLA drops the unused base weights.
    fresh_shardings = (
        None if mesh is None else sharding.state_shardings(abstract_fresh, mesh, rules)
    )
    fresh_state = jax.jit(
        lambda: nnx.state(build(), nnx.Not(CHECKPOINT_PARAMS)), out_shardings=fresh_shardings
    )()
    reader = SafetensorsReader(path)
    if overrides:
        reader = OverlayReader(reader, overrides, family.key_aliases)
    problems: list[str] = []
    by_target = _match_checkpoint_keys(reader, family, config, problems)
    for name, variable in _iter_variables(checkpoint_state):
        sources = by_target.pop(name, None)
        if sources is None:
            problems.append(f"missing tensor for parameter {name} {tuple(variable.shape)}")
            continue
        value = _assemble(reader, sources, variable.shape, np.dtype(variable.dtype), name, problems)
        if value is None:
            continue
        if mesh is not None:
            spec = sharding.logical_to_spec(
                sharding.variable_axes(variable),
                value.shape,
                mesh,
                rules,
            )
            variable.set_value(jax.device_put(value, jax.sharding.NamedSharding(mesh, spec)))
        else:
            variable.set_value(jnp.asarray(value))
    for target, sources in by_target.items():
        problems.append(f"rule target {target} (from {sources[0][1]}) is not a parameter")
    if problems:
        raise CheckpointMismatchError(
            f"{len(problems)} problem(s) loading {path}:\n  " + "\n  ".join(sorted(problems))
        )
    return nnx.merge(graphdef, checkpoint_state, fresh_state)
