"""PEFT adapter directories, the layout the reference PyTorch MetaEmbed saves a trained model in.

`metaembed export --format peft` writes, and `load_reference(base, adapter)` reads:

- `adapter_config.json`: a PEFT LoRA config (r, lora_alpha, lora_dropout, use_rslora,
  `target_modules` (a list of names or a regex over transformers' in-memory module names),
  `modules_to_save` (`prompt_embed_tokens`, and `custom_text_proj` with a projection),
  `base_model_name_or_path`).
- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` [r, in] and
  `.lora_B.weight` [out, r] per adapted module (text decoder, vision tower or projector; our
  `lora_a` is [in, r], `lora_b` [r, out], stacked over layers), the meta table
  `base_model.model.prompt_embed_tokens.weight` [R_q + R_c, H], the projection
  `base_model.model.custom_text_proj.{weight [D, H], bias [D]}` when there is one, and any other
  saved module's tensors (`base_model.model.<module>.weight`; PEFT drops the
  `modules_to_save.default` part of a saved module's key).
- `metaembed_config.json` (ours only; the reference stores no R_q / R_c): R_q, R_c, readout,
  prompt pieces.

`<module>` is transformers' in-memory path (`model.language_model.layers.0.self_attn.q_proj`,
`model.visual.blocks.0.mlp.gate_proj` for Qwen2.5-VL), which the family's rules and aliases tie
to our parameters (`models/rules.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from metaembed_jax.formats.files import METAEMBED_CONFIG, metaembed_config, save_torch_safetensors
from metaembed_jax.models import layers
from metaembed_jax.models.family import family_for
from metaembed_jax.models.lora import adapted_module_names, dense_layers
from metaembed_jax.models.rules import RETRIEVAL_HEAD
from metaembed_jax.models.safetensors_io import SafetensorsReader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META_TABLE = "prompt_embed_tokens"
PEFT_PREFIX = "base_model.model."
META_KEY = f"{PEFT_PREFIX}{META_TABLE}.weight"
PROJECTION_KEYS = (f"{PEFT_PREFIX}{RETRIEVAL_HEAD}.weight", f"{PEFT_PREFIX}{RETRIEVAL_HEAD}.bias")


class AdapterError(ValueError):
    """A PEFT adapter directory that does not fit the model: lists every problem."""


def host(variable) -> np.ndarray:
    """A variable's array on the host."""
    return np.asarray(jax.device_get(variable[...]))


def lora_keys(module: str) -> tuple[str, str]:
    """The adapter's (lora_A, lora_B) weight keys of in-memory module `module`."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


# ----------------------------------------------------------------------------- export


def adapter_tensors(model, hf_config: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list]:
    """{PEFT key: tensor} of `model`'s LoRA adapters, meta table and projection, and the
    adapted modules' in-memory names."""
    family = family_for(hf_config)
    denses = dense_layers(model.backbone, with_lora=True)
    tensors, modules = {}, []
    for path, names in adapted_module_names(model.backbone, family, hf_config).items():
        lora_a, lora_b = host(denses[path].lora_a), host(denses[path].lora_b)
        if lora_a.ndim == 2:  # one layer, not stacked over layers
            lora_a, lora_b = lora_a[None], lora_b[None]
        for name, a, b in zip(names, lora_a, lora_b, strict=True):
            if name is None:  # a layer of the stack that PEFT did not adapt
                continue
            modules.append(name)
            key_a, key_b = lora_keys(name)
            tensors[key_a], tensors[key_b] = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    tensors[META_KEY] = host(model.meta_tokens)
    if model.projection is not None:
        tensors[PROJECTION_KEYS[0]] = np.ascontiguousarray(host(model.projection.kernel).T)
        tensors[PROJECTION_KEYS[1]] = host(model.projection.bias)
    return tensors, modules


def target_modules_regex(modules: list[str]) -> str:
    """A regex PEFT full-matches against module names: exactly the adapted modules, a layer
    index generalised to `\\d+` where every layer of that module is adapted."""
    by_template: dict[str, set[str]] = {}
    for module in modules:
        parts = re.split(r"\.(\d+)\.", module, maxsplit=1)
        template = parts[0] if len(parts) == 1 else f"{parts[0]}.{{}}.{parts[2]}"
        by_template.setdefault(template, set()).update(parts[1:2])
    patterns = []
    for template, indices in sorted(by_template.items()):
        if "{}" not in template:
            patterns.append(re.escape(template))
            continue
        head, tail = (re.escape(part) for part in template.split("{}"))
        contiguous = {str(i) for i in range(len(indices))} == indices
        index = r"\d+" if contiguous else "(?:" + "|".join(sorted(indices, key=int)) + ")"
        patterns.append(head + index + tail)
    return "|".join(f"(?:{p})" for p in patterns)


def export_peft(model, processor, hf_config, out: Path, lora, base_model: str | None) -> Path:
    """Write `model` (a LoRA-trained MetaEmbed) as a PEFT adapter directory `out` (module
    docstring); `lora` is its LoRASpec, `base_model` the checkpoint it was trained from.

    Raises AdapterError for a model without LoRA or without meta tokens (the reference layout
    has no place for a last-token readout: use the hf export).
    """
    if lora is None or not dense_layers(model.backbone, with_lora=True):
        raise AdapterError("a PEFT adapter needs a LoRA run (config.lora.enabled); use --format hf")
    if model.readout != "meta":
        raise AdapterError(
            f"readout={model.readout!r}: the reference adapter layout holds meta tokens only; "
            "use --format hf"
        )
    tensors, modules = adapter_tensors(model, hf_config)
    out.mkdir(parents=True, exist_ok=True)
    save_torch_safetensors(tensors, out / ADAPTER_WEIGHTS)
    saved = [META_TABLE] + ([RETRIEVAL_HEAD] if model.projection is not None else [])
    config = {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model,
        "r": int(lora.rank),
        "lora_alpha": float(lora.alpha),
        "lora_dropout": float(lora.dropout),
        "target_modules": target_modules_regex(modules),
        "modules_to_save": saved,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": bool(lora.use_rslora),
        "use_dora": False,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    (out / METAEMBED_CONFIG).write_text(json.dumps(metaembed_config(model, processor), indent=2))
    return out


# ----------------------------------------------------------------------------- reading


def _unsupported_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `adapter_config.json` this loader cannot reproduce exactly."""
    checks = {
        "peft_type": config.get("peft_type") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "layers_to_transform": config.get("layers_to_transform") not in (None, []),
        "target_parameters": bool(config.get("target_parameters")),
    }
    return {name: config.get(name) for name, bad in checks.items() if bad}


def _names(value: Any, field: str, config_file: Path) -> tuple[str, ...] | str:
    """A PEFT module selection (`target_modules` / `exclude_modules`): a regex or names."""
    if value is None:
        return ()
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterError(f"{config_file}: {field}={value!r}; expected a regex or a list of names")


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
    bad = _unsupported_settings(config)
    if bad:
        raise AdapterError(
            f"{config_file}: {bad}; expected a plain LoRA adapter (peft_type LORA, one r and "
            "lora_alpha for every layer, no DoRA, no layers_to_transform)"
        )
    return config, SafetensorsReader(adapter_dir)


def adapter_lora_spec(config: Mapping[str, Any], adapter_dir: str | Path) -> layers.LoRASpec:
    """The LoRASpec the adapter was trained with: r, lora_alpha (rsLoRA scaling with
    use_rslora), lora_dropout, and PEFT's module selection (target_modules, exclude_modules,
    modules_to_save, which PEFT never adapts)."""
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    return layers.LoRASpec(
        int(config["r"]),
        float(config.get("lora_alpha", config["r"])),
        float(config.get("lora_dropout", 0.0)),
        _names(config.get("target_modules"), "target_modules", config_file),
        bool(config.get("use_rslora", False)),
        _names(config.get("exclude_modules"), "exclude_modules", config_file),
        tuple(_names(config.get("modules_to_save"), "modules_to_save", config_file)),
    )


def meta_table(reader: SafetensorsReader) -> np.ndarray:
    """The adapter's meta-token table [R_q + R_c, H]; raises AdapterError without one."""
    if META_KEY not in reader:
        raise AdapterError(
            f"the adapter has no meta table {META_KEY!r} (saved through modules_to_save "
            f"[{META_TABLE!r}]): it is not a MetaEmbed adapter"
        )
    return np.asarray(reader[META_KEY], np.float32)


def adapter_projection(reader: SafetensorsReader) -> tuple[np.ndarray, np.ndarray] | None:
    """The adapter's `custom_text_proj` (weight [D, H], bias [D]), or None."""
    weight_key, bias_key = PROJECTION_KEYS
    if weight_key not in reader:
        return None
    bias = reader[bias_key] if bias_key in reader else np.zeros(reader.shape(weight_key)[0])
    return np.asarray(reader[weight_key], np.float32), np.asarray(bias, np.float32)


def saved_split(adapter_dir: str | Path) -> tuple[int, int] | None:
    """(R_q, R_c) from the adapter's metaembed_config.json (our export writes one), else None."""
    settings = Path(adapter_dir) / METAEMBED_CONFIG
    if not settings.exists():
        return None
    values = json.loads(settings.read_text())
    return int(values["num_query_tokens"]), int(values["num_candidate_tokens"])


PAPER_SPLIT = (16, 64)


def resolve_split(
    rows: int, r_q: int | None, r_c: int | None, saved: tuple[int, int] | None
) -> tuple[int, int]:
    """(R_q, R_c) of a meta table of `rows` rows: the ones given, else the adapter's saved
    ones, else the paper's 16 / 64 when the table has 80 rows. Raises AdapterError when the
    split is not known or does not add up, naming what to pass."""
    if r_q is None and r_c is None and saved is not None:
        r_q, r_c = saved
    if r_q is None and r_c is None:
        if rows != sum(PAPER_SPLIT):
            raise AdapterError(
                f"the adapter's meta table has {rows} rows and nothing says how many are query "
                "tokens (the reference code stores neither R_q nor R_c): pass num_query_tokens "
                f"(--r_q), e.g. num_query_tokens={rows // 5} for R_c={rows - rows // 5}"
            )
        r_q, r_c = PAPER_SPLIT
    r_q = rows - r_c if r_q is None else r_q
    r_c = rows - r_q if r_c is None else r_c
    if r_q < 1 or r_c < 1 or r_q + r_c != rows:
        raise AdapterError(
            f"R_q={r_q} + R_c={r_c} != the adapter's {rows} meta-table rows (each at least 1)"
        )
    return r_q, r_c
