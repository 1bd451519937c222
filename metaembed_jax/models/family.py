"""The backbone-family interface: what a vision-language model family provides so that MetaEmbed,
the train step, the data pipeline and evaluation can use it without naming its features.

A family is one folder under `metaembed_jax/models/` (e.g. `qwen2_vl/`) that builds a
`BackboneFamily` and calls `register_family` on import; `BUILTIN_FAMILIES` below maps each
built-in family's name to its module, imported on first use. Everything outside `models/` reaches
a family through `family_for(config)` and the two protocols below (see docs/design.md).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from metaembed_jax import sharding


@runtime_checkable
class Backbone(Protocol):
    """A backbone module (Flax NNX) as MetaEmbed uses it.

    - `hidden_size`: width H of the last hidden states.
    - `__call__(**features)`: last-layer hidden states `[B, L, H]`, equal to transformers'
      `model.model(**features).last_hidden_state` on every non-padding position (the public
      contract of `load_hf`).
    - `encode_with_suffix(suffix, **features)`: run the model on the content of `features` with
      `M` extra input embeddings `suffix [B, M, H]` (or `[1, M, H]`, the same rows for every
      example: MetaEmbed passes its meta-token table so, without knowing which feature holds the
      batch size) appended after the (left-padded) content and return the last-layer states of
      those `M` positions, `[B, M, H]`, in the backbone's compute dtype. The family decides how the
      appended positions are numbered (M-RoPE text positions, 1-indexed positions, ...), masked
      (causal, prefix-LM) and cross-attended (e.g. Mllama: to every tile of every image of their
      row). This is the only model call MetaEmbed makes for its meta tokens.
    """

    @property
    def hidden_size(self) -> int: ...

    def __call__(self, **features: Any) -> jax.Array: ...

    def encode_with_suffix(self, suffix: jax.Array, **features: Any) -> jax.Array: ...


@runtime_checkable
class Processor(Protocol):
    """Texts + images -> one side's features (numpy arrays keyed by the family's `feature_keys`),
    left-padded to a length bucket.

    `texts[i]` is a string (may be empty), `images[i]` a list of PIL images (may be empty), or
    `images` None for a text-only batch. `side` is "query" or "candidate" (prompt prefix).
    `row_ids` name the rows in error messages. `tokenizer`: the text tokenizer; `len(tokenizer)`
    is the vocabulary size a randomly initialised model of the run is built with.
    `pixel_budget`: the most pixels one image becomes (what a PDF page is rendered to).
    `fit_image(image)`: an RGB PIL image resized as the processor would resize it (the processor
    then leaves it as it is), so a corpus can keep fitted images instead of full-size ones; any
    size and aspect ratio is fitted, never refused.
    """

    pad_token_id: int
    tokenizer: Any
    pixel_budget: int

    def fit_image(self, image: Any) -> Any: ...

    def __call__(
        self,
        texts: Sequence[str],
        images: Sequence[Sequence[Any]] | None,
        *,
        side: str,
        row_ids: Sequence[Any] | None = None,
    ) -> dict[str, np.ndarray]: ...

    def save_pretrained(self, path: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class BackboneFamily:
    """One backbone family, as code.

    Attributes:
      name: the family's name (its folder under `models/`, its key in `BUILTIN_FAMILIES`).
      model_types: the `config.json` `model_type` values it loads (e.g. "qwen2_5_vl").
      build: `build(config_dict, *, dtype, param_dtype, lora, remat, rngs) -> Backbone`, from the
        raw `config.json` dict (every spelling the family's published checkpoints use).
      rules: `rules(config_dict) -> [Rule]`, the declarative checkpoint-key table
        (`rules.Rule`).
      feature_keys: the keyword names of one side's features the backbone takes; batches carry
        only these (and the train step passes only these).
      make_processor: `make_processor(data_config, path=None) -> Processor` with the data
        config's image settings and length buckets; `path` is a tokenizer / checkpoint dir
        (default: the built-in tokenizer under `data_config.dir`).
      static_shapes: `static_shapes(data_config, batch_size, *, multiple=1, same_shapes=False)`
        -> a callable that pads one side's features to the family's static image shapes (one
        compiled program per bucket; `multiple`: row counts divisible by the batch shards;
        `same_shapes`: always the largest bucket, for several processes).
      tiny_config: `tiny_config(vocab_size, **overrides) -> config dict`, a small random-weight
        model of the family for tests, the demo and benchmarks (loadable by transformers).
      special_tokens: tokens the built-in tokenizer must add for this family's prompts, given
        ids 0, 1, ... in this order (the first is the pad token).
      key_aliases: checkpoint-key prefix rewrites, so that every published key layout (and
        transformers 5's `save_pretrained` one) reaches the same `rules`.
      axis_rules: logical-axis rules (`sharding.LOGICAL_AXIS_RULES` format) the family adds for
        logical names of its own.
      in_memory_aliases: prefix rewrites from the keys the rules spell to transformers'
        in-memory module names (`model.language_model.layers.0.self_attn.q_proj`), the names
        PEFT adapters use (`rules.in_memory_name`); empty when the rules spell those already.
    """

    name: str
    model_types: tuple[str, ...]
    build: Callable[..., Backbone]
    rules: Callable[[Mapping[str, Any]], Sequence[Any]]
    feature_keys: tuple[str, ...]
    make_processor: Callable[..., Processor]
    static_shapes: Callable[..., Callable[[dict[str, Any]], dict[str, Any]]]
    tiny_config: Callable[..., dict[str, Any]]
    special_tokens: tuple[str, ...] = ()
    key_aliases: tuple[tuple[str, str], ...] = ()
    axis_rules: tuple[tuple[str, Any], ...] = ()
    in_memory_aliases: tuple[tuple[str, str], ...] = ()


# family name -> module that registers it on import (lazy: loading one family imports no other).
BUILTIN_FAMILIES: dict[str, str] = {
    "qwen2_vl": "metaembed_jax.models.qwen2_vl",
    "paligemma": "metaembed_jax.models.paligemma",
    "mllama": "metaembed_jax.models.mllama",
}

_FAMILIES: dict[str, BackboneFamily] = {}  # by family name
_BY_MODEL_TYPE: dict[str, str] = {}  # model_type -> family name


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Make `family_for` / `load_hf` / `from_config` handle `family.model_types`."""
    for model_type in family.model_types:
        owner = _BY_MODEL_TYPE.get(model_type)
        if owner is not None and owner != family.name:
            raise ValueError(f"model_type {model_type!r} is already registered by {owner!r}")
    _FAMILIES[family.name] = family
    sharding.register_axis_rules(family.axis_rules)
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family.name
    return family


def _import_builtins() -> None:
    for name, module in BUILTIN_FAMILIES.items():
        if name not in _FAMILIES:
            importlib.import_module(module)


def family_for(config_or_model_type: Mapping[str, Any] | str) -> BackboneFamily:
    """The registered family of a `config.json` dict (its `model_type`), a model_type or a family
    name. Raises ValueError naming the supported model types."""
    key = config_or_model_type
    if isinstance(key, Mapping):
        key = key.get("model_type")
    if key in BUILTIN_FAMILIES and key not in _FAMILIES:
        importlib.import_module(BUILTIN_FAMILIES[key])
    if key not in _FAMILIES and key not in _BY_MODEL_TYPE:
        _import_builtins()
    if key in _FAMILIES:
        return _FAMILIES[key]
    if key in _BY_MODEL_TYPE:
        return _FAMILIES[_BY_MODEL_TYPE[key]]
    raise ValueError(f"model_type {key!r} is not supported; supported: {sorted(_BY_MODEL_TYPE)}")


def registered_families() -> dict[str, BackboneFamily]:
    """Every family (built-in ones imported), by name."""
    _import_builtins()
    return dict(_FAMILIES)
