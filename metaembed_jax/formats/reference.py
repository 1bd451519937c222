"""Models trained with the reference PyTorch MetaEmbed: a PEFT adapter directory on a base.

`load_reference(base, adapter)` returns the MetaEmbed the reference code embeds with (LoRA on
whatever modules the adapter's `target_modules` chose, text decoder and vision tower alike, the
meta table, the optional `custom_text_proj` projection, any other saved module), in inference
mode. `import_reference(base, adapter, out)` turns it into a run directory, so that evaluation,
indexing, search and export (`eval.py --workdir`, `metaembed index ...`, `metaembed export`)
take it like a run trained here. The adapter layout is described in `peft_adapter.py`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metaembed_jax.formats.peft import (
    META_KEY,
    PEFT_PREFIX,
    PROJECTION_KEYS,
    AdapterError,
    adapter_lora_spec,
    adapter_projection,
    lora_keys,
    meta_table,
    read_adapter,
    resolve_split,
    saved_split,
)
from metaembed_jax.metaembed import MetaEmbed
from metaembed_jax.models import load_hf
from metaembed_jax.models.family import family_for
from metaembed_jax.models.hf_loading import read_retrieval_head
from metaembed_jax.models.hub import resolve_checkpoint
from metaembed_jax.models.lora import adapted_module_names, dense_layers
from metaembed_jax.models.rules import read_config, rule_for_key
from metaembed_jax.training import recipes as config_files
from metaembed_jax.training.checkpointing import Checkpointer
from metaembed_jax.training.loop import record_base_fingerprint, write_run_files
from metaembed_jax.training.recipes import load_recipe
from metaembed_jax.training.state import create_train_state, make_optimizer

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _split_adapter_keys(reader) -> tuple[list[str], dict[str, np.ndarray], list[str]]:
    """(LoRA keys, {key: tensor} of other saved modules, keys outside PEFT's prefix)."""
    lora, saved, foreign = [], {}, []
    for key in reader:
        if key in (META_KEY, *PROJECTION_KEYS):
            continue
        if not key.startswith(PEFT_PREFIX):
            foreign.append(key)
        elif key.endswith(LORA_SUFFIXES):
            lora.append(key)
        else:
            saved[key[len(PEFT_PREFIX) :]] = np.asarray(reader[key])
    return lora, saved, foreign


def _place(variable, value: np.ndarray, name: str, problems: list[str]) -> None:
    if tuple(value.shape) != tuple(variable.shape):
        problems.append(
            f"{name}: adapter shape {tuple(value.shape)}, model {tuple(variable.shape)}"
        )
        return
    current = variable[...]
    variable[...] = jax.device_put(jnp.asarray(value, current.dtype), current.sharding)


def _set_lora(model, reader, hf_config, problems: list[str]) -> set[str]:
    """Set every adapted layer's A / B from the adapter (zeros on the layers of a stack PEFT did
    not adapt); returns the adapter keys used."""
    family = family_for(hf_config)
    denses = dense_layers(model.backbone, with_lora=True)
    used = set()
    for path, names in adapted_module_names(model.backbone, family, hf_config).items():
        dense = denses[path]
        a = np.zeros(dense.lora_a.shape, np.float32)
        b = np.zeros(dense.lora_b.shape, np.float32)
        for index, name in enumerate(names):
            if name is None:
                continue
            key_a, key_b = lora_keys(name)
            if key_a not in reader or key_b not in reader:
                problems.append(f"LoRA layer {name}: the adapter has no {key_a} / {key_b}")
                continue
            used |= {key_a, key_b}
            rows = (index,) if len(dense.lora_a.shape) == 3 else ()
            a_value, b_value = (np.asarray(reader[k], np.float32).T for k in (key_a, key_b))
            if a_value.shape != a[rows].shape or b_value.shape != b[rows].shape:
                problems.append(
                    f"LoRA layer {name}: A {a_value.T.shape} / B {b_value.T.shape} in the "
                    f"adapter, the model's are {a[rows].T.shape} / {b[rows].T.shape}"
                )
                continue
            a[rows], b[rows] = a_value, b_value
        _place(dense.lora_a, a, path + ".lora_a", problems)
        _place(dense.lora_b, b, path + ".lora_b", problems)
    return used


def _unused_lora(keys, used, hf_config, problems: list[str]) -> list[str]:
    """Adapter LoRA modules the model has no adapted layer for: a problem, except on modules
    MetaEmbed never runs (the LM head), which are returned to be reported."""
    family = family_for(hf_config)
    ignored = set()
    for key in sorted(set(keys) - used):
        module = key[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0]
        rule = rule_for_key(module + ".weight", family, hf_config)
        if rule is not None and rule.target is None:
            ignored.add(module)
        else:
            problems.append(f"adapter layer {module}: the model has no such LoRA layer")
    return sorted(ignored)


def _projection(reader, base: str, projection_dim: int | None):
    """(weight [D, H], bias [D]) of the projection to apply, or None: the adapter's
    `custom_text_proj`, else the base's when `projection_dim` asks for one."""
    found = adapter_projection(reader)
    if found is not None:
        if projection_dim not in (None, found[0].shape[0]):
            raise AdapterError(
                f"projection_dim={projection_dim}, but the adapter's custom_text_proj has "
                f"{found[0].shape[0]} outputs"
            )
        return found
    head = read_retrieval_head(base)
    if projection_dim is None:
        if head is not None:
            logging.warning(
                "%s: its retrieval head custom_text_proj (%d x %d) is not used (the adapter "
                "has none); pass projection_dim=%d to apply it",
                base, *head[0].shape, head[0].shape[0],
            )  # fmt: skip
        return None
    if head is None or head[0].shape[0] != projection_dim:
        raise AdapterError(
            f"projection_dim={projection_dim}: neither the adapter nor the base {base} has a "
            f"custom_text_proj of {projection_dim} outputs (the base's: "
            f"{None if head is None else head[0].shape})"
        )
    return head


def load_reference(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    num_query_tokens: int | None = None,
    num_candidate_tokens: int | None = None,
    *,
    projection_dim: int | None = None,
    rngs: nnx.Rngs | None = None,
    **backbone_kwargs: Any,
) -> MetaEmbed:
    """The MetaEmbed of a reference-trained PEFT adapter on `base` (a checkpoint dir or Hub
    id), in inference mode.

    Takes: `adapter` (adapter_config.json + adapter_model.safetensors), R_q / R_c
    (`num_query_tokens` / `num_candidate_tokens`: the reference stores neither; default the
    adapter's metaembed_config.json, else the paper's 16 / 64 for an 80-row table),
    `projection_dim` (apply the base's `custom_text_proj` of that width when the adapter has
    none; an adapter's own is always applied), `backbone_kwargs` for `load_hf` (dtype,
    param_dtype, remat, mesh, rules). LoRA r / alpha / rsLoRA / dropout and the adapted modules
    come from the adapter.
    Raises AdapterError (a ValueError) listing every tensor that does not fit, and for an
    unknown split of the meta table, naming what to pass.
    """
    if "lora" in backbone_kwargs:
        raise ValueError("load_reference: LoRA comes from the adapter; do not pass lora")
    config, reader = read_adapter(adapter)
    table = meta_table(reader)
    r_q, r_c = resolve_split(
        table.shape[0], num_query_tokens, num_candidate_tokens, saved_split(adapter)
    )
    base = resolve_checkpoint(base)
    hf_config = read_config(base)
    lora_keys_found, saved, foreign = _split_adapter_keys(reader)
    if foreign:
        raise AdapterError(f"adapter tensors outside {PEFT_PREFIX!r}: {', '.join(foreign)}")
    projection = _projection(reader, base, projection_dim)
    backbone = load_hf(
        base, lora=adapter_lora_spec(config, adapter), overrides=saved, **backbone_kwargs
    )
    width = None if projection is None else projection[0].shape[0]
    model = MetaEmbed(backbone, r_q, r_c, width, rngs=rngs or nnx.Rngs(0))
    problems: list[str] = []
    used = _set_lora(model, reader, hf_config, problems)
    ignored = _unused_lora(lora_keys_found, used, hf_config, problems)
    _place(model.meta_tokens, table, "prompt_embed_tokens", problems)
    if problems:
        raise AdapterError(
            f"{len(problems)} problem(s) loading the adapter {adapter}:\n  " + "\n  ".join(problems)
        )
    if ignored:
        logging.warning("%s: LoRA of %s not used (MetaEmbed reads hidden states)", adapter, ignored)
    if projection is not None:
        model.set_projection(*projection)
    model.eval()
    return model


# ----------------------------------------------------------------------------- run directory

# The bundled recipe whose data settings (image budget, length buckets) an imported run takes,
# by backbone family: the reference recipe of that family.
FAMILY_RECIPES = {
    "qwen2_vl": "qwen2_5_vl_7b",
    "paligemma": "paligemma_3b",
    "mllama": "llama3_2_vision_11b",
}


def reference_config(base: str, model: MetaEmbed, lora, recipe: str | None = None):
    """The run config of an imported model: `recipe` (default: the family's reference recipe)
    with the base, the adapter's LoRA and the model's R_q / R_c / projection."""
    family = family_for(read_config(base)).name
    config = load_recipe(config_files.resolve_config_value(recipe or FAMILY_RECIPES[family]))
    config.init_from = str(base)
    config.model.num_query_tokens = model.num_query_tokens
    config.model.num_candidate_tokens = model.num_candidate_tokens
    config.model.projection_dim = model.embedding_dim if model.projection is not None else 0
    config.model.dtype = "float32"
    config.model.remat = "none"
    config.lora.enabled = True
    config.lora.rank, config.lora.alpha, config.lora.dropout = lora.rank, lora.alpha, lora.dropout
    config.lora.rslora = lora.use_rslora
    if isinstance(lora.targets, str):
        config.lora.target_regex = lora.targets
    else:
        config.lora.targets = tuple(lora.targets)
    config.train.steps = 0  # nothing trained here: step 0 is the imported model
    return config


def reference_processor(base: str | os.PathLike, recipe: str | None = None):
    """The processor (tokenizer + image preprocessing) of `base` with the data settings of
    `recipe` (default: the family's reference recipe, e.g. images up to 1024 merged tokens)."""
    base = resolve_checkpoint(base)
    family = family_for(read_config(base))
    config = load_recipe(config_files.resolve_config_value(recipe or FAMILY_RECIPES[family.name]))
    return family.make_processor(config.data, base)


def import_reference(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    num_query_tokens: int | None = None,
    *,
    recipe: str | None = None,
    projection_dim: int | None = None,
) -> Path:
    """Write a run directory `out` (config.json, base_fingerprint.json, checkpoint step 0)
    holding `load_reference(base, adapter, num_query_tokens)`; returns `out`.

    Raises AdapterError as `load_reference`, and for an adapter that replaces base weights
    (modules_to_save other than the meta table and projection: a run keeps its base as is),
    FileExistsError for an `out` that already holds a run.
    """
    out = Path(out)
    if (out / "config.json").exists() or (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a run; choose a new --out")
    settings, reader = read_adapter(adapter)
    _, saved, _ = _split_adapter_keys(reader)
    if saved:
        raise AdapterError(
            f"the adapter replaces base weights ({', '.join(sorted(saved))}): a run directory "
            "keeps its base checkpoint unchanged; use load_reference(base, adapter) in Python"
        )
    base = resolve_checkpoint(base)
    lora = adapter_lora_spec(settings, adapter)
    model = load_reference(base, adapter, num_query_tokens, projection_dim=projection_dim)
    config = reference_config(base, model, lora, recipe)
    tx, _ = make_optimizer(config.optimizer, 1)
    state = create_train_state(model, tx, lora=True)
    write_run_files(config, out, None)
    record_base_fingerprint(config, out, state, None)
    checkpointer = Checkpointer(out, async_save=False)
    try:
        checkpointer.save(state, {"imported_from": str(adapter)}, force=True)
    finally:
        checkpointer.close()
    return out
