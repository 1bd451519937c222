"""The checkpoint-key rule tables of the backbone families, and their inversion.

A family's `rules(config)` is a list of `Rule`s mapping checkpoint keys (regex, full match, after
the family's `key_aliases`) to parameter paths through a named transform: `hf_loading.load_hf`
reads checkpoints with it, export writes them with its inverse. Every rule pattern is literal text
plus named groups, so a parameter path gives the group values and thereby the one checkpoint key
that loads it (per layer, for a stacked parameter); `in_memory_name` turns such a key into
transformers' in-memory module name (what PEFT adapters are keyed by) with the family's
`in_memory_aliases`, without building a transformers model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metaembed_jax.models.family import BackboneFamily

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda tensor: tensor,
    # torch nn.Linear weight [out, in] -> our kernel [in, out]
    "linear": lambda tensor: tensor.T,
    # a patch-embedding Conv (kernel == stride) as a linear map on flattened patches
    # [out, C, (T,) P, P] -> [C*(T*)P*P, out], in the order HF flattens pixel_values.
    "conv_to_linear": lambda tensor: tensor.reshape(tensor.shape[0], -1).T,
}

# The inverse of each TRANSFORMS entry (export): our parameter -> the checkpoint tensor of
# `shape` (the shape the checkpoint format expects; "conv_to_linear" cannot be undone without it).
INVERSE_TRANSFORMS: dict[str, Callable[[np.ndarray, tuple[int, ...]], np.ndarray]] = {
    "identity": lambda array, shape: array,
    "linear": lambda array, shape: array.T,
    "conv_to_linear": lambda array, shape: array.T.reshape(shape),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Checkpoint key `pattern` (regex, full match) -> parameter `target` (dot path in
    `nnx.state(module)`), through `TRANSFORMS[transform]`.

    A named group `layer` in the pattern puts the tensor at index `layer - layer_offset` of the
    target's leading (stacked `layers`) axis (`layer_offset`: for a stack that holds a run of
    checkpoint layers starting there, e.g. Mllama's self-attention layers between two
    cross-attention layers). `target=None` marks checkpoint tensors deliberately not used
    (e.g. `lm_head.weight`: MetaEmbed reads hidden states, not logits).
    """

    pattern: str
    target: str | None
    transform: str = "identity"
    layer_offset: int = 0


# A retrieval head some bases carry beside the backbone (ColQwen2.5 / ColPali checkpoints'
# `custom_text_proj.{weight,bias}`, the reference's projection): not a backbone tensor, read by
# MetaEmbed itself (`hf_loading.read_retrieval_head`).
RETRIEVAL_HEAD = "custom_text_proj"


def is_retrieval_head(key: str) -> bool:
    return key.startswith(RETRIEVAL_HEAD + ".")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the module: lists every problem at once."""


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint dir: no config.json")
    return json.loads(config_file.read_text())


def config_to_dict(config: Any) -> dict[str, Any]:
    """A transformers config object, or a dict in either spelling, as a plain dict."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"expected a transformers config or a dict, got {type(config).__name__}")


def path_string(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(part, "key", part)) for part in path)


def normalise_key(key: str, aliases: Sequence[tuple[str, str]]) -> str:
    for old, new in aliases:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


# ---------------------------------------------------------------------------------------------
# Inversion: parameter path -> checkpoint key -> in-memory module name
# ---------------------------------------------------------------------------------------------


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


def checkpoint_key(pattern: str, groups: Mapping[str, Any]) -> str:
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


RuleInverse = list[tuple[re.Pattern, Rule]]


def rule_inverse(family: BackboneFamily, hf_config: Mapping[str, Any]) -> RuleInverse:
    """[(regex over parameter paths, Rule)] of the family's rules that load a parameter."""
    rules = [rule for rule in family.rules(hf_config) if rule.target is not None]
    return [(_target_regex(rule), rule) for rule in rules]


def published_keys(
    name: str, inverse: RuleInverse, depth: int | None = None
) -> tuple[Rule | None, list[str]]:
    """(the Rule that loads parameter `name`, its checkpoint keys): one key per layer of a
    stacked parameter (a rule with a `layer` group; `depth` = the stack's length), else one;
    (None, []) when no rule of `inverse` maps `name`."""
    for regex, rule in inverse:
        found = regex.fullmatch(name)
        if found is None:
            continue
        groups = found.groupdict()
        if "(?P<layer>" not in rule.pattern:
            return rule, [checkpoint_key(rule.pattern, groups)]
        if depth is None:
            raise ValueError(f"parameter {name} is stacked over layers: give its depth")
        layers = range(rule.layer_offset, rule.layer_offset + depth)
        return rule, [checkpoint_key(rule.pattern, {**groups, "layer": i}) for i in layers]
    return None, []


def published_pieces(name: str, value, inverse: RuleInverse) -> tuple[Rule | None, list]:
    """(the Rule that loads parameter `name`, [(checkpoint key, piece of `value`)]): one piece
    per index of the leading axis for a stacked parameter, else `value` whole."""
    rule, keys = published_keys(name, inverse, np.shape(value)[0] if np.ndim(value) else None)
    if rule is None:
        return None, []
    if "(?P<layer>" in rule.pattern:
        return rule, list(zip(keys, value, strict=True))
    return rule, [(keys[0], value)]


def in_memory_name(key: str, family: BackboneFamily) -> str:
    """transformers' in-memory name of the checkpoint key `key` as the family's rules spell it
    (the first matching prefix of `family.in_memory_aliases` rewritten; unchanged without one)."""
    for canonical, in_memory in family.in_memory_aliases:
        if key.startswith(canonical):
            return in_memory + key[len(canonical) :]
    return key


def module_names(
    kernel_path: str, depth: int | None, family: BackboneFamily, inverse: RuleInverse
) -> tuple[Rule | None, list[str]]:
    """(the loading Rule, the in-memory module name of each layer) of the dense kernel at
    `kernel_path` (`layers.self_attn.q_proj.kernel` -> `model.language_model.layers.0.self_attn
    .q_proj`, ...); (None, []) when no rule loads it."""
    rule, keys = published_keys(kernel_path, inverse, depth)
    names = [in_memory_name(key, family).removesuffix(".weight") for key in keys]
    return rule, names


def rule_for_key(key: str, family: BackboneFamily, hf_config: Mapping[str, Any]) -> Rule | None:
    """The family's Rule that matches checkpoint key `key` (any layout its aliases know)."""
    name = normalise_key(key, family.key_aliases)
    for rule in family.rules(hf_config):
        if re.fullmatch(rule.pattern, name):
            return rule
    return None
