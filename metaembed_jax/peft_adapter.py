"""PEFT adapter directories, the layout the reference PyTorch MetaEmbed saves a trained model in.

`metaembed export --format peft` writes, and `MetaEmbed.from_pretrained(base, adapter=DIR)` reads:

- `adapter_config.json`: a PEFT LoRA config (r, lora_alpha, lora_dropout, `target_modules` as a
  regex over transformers' in-memory module names of the adapted language-model layers,
  `modules_to_save: ["prompt_embed_tokens"]`, `base_model_name_or_path`).
- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` [r, in] and
  `.lora_B.weight` [out, r] per adapted layer (our `lora_a` is [in, r], `lora_b` [r, out], stacked
  over layers), and the meta table `base_model.model.prompt_embed_tokens.weight` [R_q + R_c, H]
  (PEFT drops the `modules_to_save.default` part of a saved module's key).
- `metaembed_config.json`: R_q, R_c, readout, prompt pieces (as the hf export writes it).

`<module>` is transformers' in-memory path (`model.language_model.layers.0.self_attn.q_proj` for
Qwen2.5-VL), which the family's `key_aliases` rewrite to the published key the rules read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from metaembed_jax.export import (
    METAEMBED_CONFIG,
    _save_torch_safetensors,
    metaembed_config,
    published_pieces,
    rule_inverse,
    transformers_model_on_meta,
)
from metaembed_jax.models import layers
from metaembed_jax.models.family import family_for
from metaembed_jax.models.hf_loading import SafetensorsReader, _normalise_key, _path_string

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META_TABLE = "prompt_embed_tokens"
PEFT_PREFIX = "base_model.model."
META_KEY = f"{PEFT_PREFIX}{META_TABLE}.weight"


class AdapterError(ValueError):
    """A PEFT adapter directory that does not fit the model: lists every problem."""


def _lora_modules(backbone: nnx.Module) -> dict[str, layers.Dense]:
    """{module path: Dense} of every dense layer of `backbone` that has a LoRA adapter."""
    return {
        _path_string(path): module
        for path, module in nnx.iter_graph(backbone)
        if isinstance(module, layers.Dense) and module.lora_scale is not None
    }


def _layer_keys(module_path: str, stacked: np.ndarray, inverse) -> list[str]:
    """Published weight key of each layer (leading index of `stacked`) of the kernel at
    `module_path`; raises AdapterError when no rule loads it or the rule is not a plain
    transposition (then LoRA A / B do not transpose to PEFT's layout)."""
    rule, pieces = published_pieces(module_path + ".kernel", stacked, inverse)
    if rule is None or rule.transform != "linear":
        raise AdapterError(
            f"LoRA layer {module_path}: its kernel is not loaded by a 'linear' rule "
            f"(found {None if rule is None else rule.transform!r}); no PEFT key corresponds"
        )
    return [key for key, _ in pieces]


def _host(variable) -> np.ndarray:
    return np.asarray(jax.device_get(variable[...]))


def adapter_tensors(model, hf_config: Mapping[str, Any], in_memory: Mapping[str, str]):
    """{PEFT key: tensor} of `model`'s LoRA adapters and meta table; `in_memory` maps published
    weight keys to transformers' in-memory ones. Returns (tensors, adapted module names)."""
    inverse = rule_inverse(family_for(hf_config), hf_config)
    tensors, modules = {}, []
    for path, dense in _lora_modules(model.backbone).items():
        lora_a, lora_b = _host(dense.lora_a), _host(dense.lora_b)
        keys = _layer_keys(path, lora_a, inverse)
        if lora_a.ndim == 2:  # one layer, not stacked over layers
            lora_a, lora_b = lora_a[None], lora_b[None]
        for key, a, b in zip(keys, lora_a, lora_b, strict=True):
            module = in_memory[key].removesuffix(".weight")
            modules.append(module)
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
    tensors[META_KEY] = _host(model.meta_tokens)
    return tensors, modules


def target_modules_regex(modules: list[str]) -> str:
    """A regex PEFT full-matches against module names: exactly the adapted modules, layer
    indices generalised (`model\\.language_model\\.layers\\.\\d+\\.self_attn\\.q_proj`)."""
    patterns = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(m)) for m in modules})
    return "|".join(f"(?:{p})" for p in patterns)


def export_peft(model, processor, hf_config, out: Path, lora, base_model: str | None) -> Path:
    """Write `model` (a LoRA-trained MetaEmbed) as a PEFT adapter directory `out` (module
    docstring); `lora` is its LoRASpec, `base_model` the checkpoint it was trained from.

    Raises AdapterError for a model without LoRA, with a projection or without meta tokens
    (the reference layout has no place for them: use the hf export).
    """
    if lora is None or not _lora_modules(model.backbone):
        raise AdapterError("a PEFT adapter needs a LoRA run (config.lora.enabled); use --format hf")
    if model.projection is not None or model.readout != "meta":
        raise AdapterError(
            f"projection_dim={model.embedding_dim if model.projection else None}, readout="
            f"{model.readout!r}: the reference adapter layout holds neither; use --format hf"
        )
    family = family_for(hf_config)
    in_memory = {
        _normalise_key(key, family.key_aliases): key
        for key in transformers_model_on_meta(hf_config).state_dict()
    }
    tensors, modules = adapter_tensors(model, hf_config, in_memory)
    out.mkdir(parents=True, exist_ok=True)
    _save_torch_safetensors(tensors, out / ADAPTER_WEIGHTS)
    config = {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model,
        "r": int(lora.rank),
        "lora_alpha": float(lora.alpha),
        "lora_dropout": float(lora.dropout),
        "target_modules": target_modules_regex(modules),
        "modules_to_save": [META_TABLE],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    (out / METAEMBED_CONFIG).write_text(json.dumps(metaembed_config(model, processor), indent=2))
    return out


# ----------------------------------------------------------------------------- import


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], SafetensorsReader]:
    """(adapter_config.json, reader of its tensors); raises FileNotFoundError for a missing
    file and AdapterError for a config this loader cannot reproduce (not plain LoRA)."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.exists():
        raise FileNotFoundError(
            f"{adapter_dir} is not a PEFT adapter directory: no {ADAPTER_CONFIG}"
        )
    config = json.loads(config_file.read_text())
    unsupported = {
        "peft_type": config.get("peft_type") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    bad = {name: config.get(name) for name, is_bad in unsupported.items() if is_bad}
    if bad:
        raise AdapterError(
            f"{config_file}: {bad}; expected a plain LoRA adapter (peft_type LORA, one r and "
            "lora_alpha for every layer, no DoRA / rsLoRA)"
        )
    return config, SafetensorsReader(adapter_dir)


def _adapted_modules(reader: SafetensorsReader) -> list[str]:
    """In-memory module names that the adapter's `lora_A` tensors adapt."""
    suffix = ".lora_A.weight"
    keys = reader.keys()  # a reader is not iterable over its keys
    return [
        key[len(PEFT_PREFIX) : -len(suffix)]
        for key in keys
        if key.startswith(PEFT_PREFIX) and key.endswith(suffix)
    ]


def adapter_lora_spec(config: Mapping[str, Any], reader: SafetensorsReader) -> layers.LoRASpec:
    """The LoRASpec the adapter was trained with: r, lora_alpha, lora_dropout, and as targets
    the layer names (`q_proj`, ...) of the modules its weights adapt."""
    modules = _adapted_modules(reader)
    if not modules:
        raise AdapterError(f"the adapter has no `{PEFT_PREFIX}<module>.lora_A.weight` tensors")
    targets = tuple(sorted({module.rsplit(".", 1)[-1] for module in modules}))
    return layers.LoRASpec(
        int(config["r"]),
        float(config.get("lora_alpha", config["r"])),
        float(config.get("lora_dropout", 0.0)),
        targets,
    )


def meta_table(reader: SafetensorsReader) -> np.ndarray:
    """The adapter's meta-token table [R_q + R_c, H]; raises AdapterError without one."""
    if META_KEY not in reader:
        raise AdapterError(
            f"the adapter has no meta table {META_KEY!r} (saved through modules_to_save "
            f"[{META_TABLE!r}]): it is not a MetaEmbed adapter"
        )
    return np.asarray(reader[META_KEY], np.float32)


def saved_query_tokens(adapter_dir: str | Path) -> int | None:
    """R_q from the adapter's metaembed_config.json (our export writes one), else None."""
    settings = Path(adapter_dir) / METAEMBED_CONFIG
    if not settings.exists():
        return None
    return int(json.loads(settings.read_text())["num_query_tokens"])


def _set(variable, value: np.ndarray, name: str, problems: list[str]) -> None:
    if tuple(value.shape) != tuple(variable.shape):
        problems.append(
            f"{name}: adapter shape {tuple(value.shape)}, model {tuple(variable.shape)}"
        )
        return
    current = variable[...]
    variable[...] = jax.device_put(value.astype(current.dtype), current.sharding)


def load_adapter(model, reader: SafetensorsReader, hf_config: Mapping[str, Any]) -> None:
    """Set `model`'s LoRA A / B and meta table from the adapter's tensors, in place.

    Raises AdapterError listing every adapted layer the adapter lacks, every adapter layer the
    model does not adapt and every shape that disagrees.
    """
    family = family_for(hf_config)
    by_published = {
        _normalise_key(module + ".weight", family.key_aliases): module
        for module in _adapted_modules(reader)
    }
    inverse = rule_inverse(family, hf_config)
    problems: list[str] = []
    for path, dense in _lora_modules(model.backbone).items():
        keys = _layer_keys(path, _host(dense.lora_a), inverse)
        missing = [key for key in keys if key not in by_published]
        if missing:
            problems.append(f"LoRA layer {path}: no adapter weights for {', '.join(missing)}")
            continue
        modules = [by_published.pop(key) for key in keys]
        a = [np.asarray(reader[f"{PEFT_PREFIX}{m}.lora_A.weight"], np.float32).T for m in modules]
        b = [np.asarray(reader[f"{PEFT_PREFIX}{m}.lora_B.weight"], np.float32).T for m in modules]
        stacked = len(dense.lora_a.shape) == 3
        _set(dense.lora_a, np.stack(a) if stacked else a[0], path + ".lora_a", problems)
        _set(dense.lora_b, np.stack(b) if stacked else b[0], path + ".lora_b", problems)
    problems += [
        f"adapter layer {m}: the model has no such LoRA layer" for m in by_published.values()
    ]
    _set(model.meta_tokens, meta_table(reader), META_TABLE, problems)
    if problems:
        raise AdapterError(
            f"{len(problems)} problem(s) loading the adapter:\n  " + "\n  ".join(problems)
        )
