"""What a run directory says about the model it trained, and the checks against it.

A training run writes `DIR/config.json` (the full config) and, for a LoRA run, whose checkpoints
hold only the adapters, `DIR/base_fingerprint.json`: the base model's transformers config, every
frozen tensor's shape and dtype, and a sha256 over a fixed sample of each tensor's values.
Evaluation, `load_trained` and a resume compare against them and refuse, naming every
difference, instead of evaluating or continuing a different model under the run's name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from metaembed_jax.training.config import base_config

CONFIG_FILE = "config.json"
FINGERPRINT_FILE = "base_fingerprint.json"
# The config fields that decide which model a checkpoint holds.
IDENTITY_FIELDS = ("init_from", "model", "loss", "lora")
# How to compute, not what was trained: may differ between training and evaluation.
COMPUTE_ONLY = ("model.dtype", "model.remat")
SAMPLES_PER_TENSOR = 4096  # hashed
STORED_SAMPLES = 64  # kept in the file, compared with a tolerance (see check_base_fingerprint)


class RunMismatchError(ValueError):
    """The config (or base checkpoint) given is not the one the run was trained with."""


def _plain(config: Any) -> dict[str, Any]:
    """A config as plain JSON data (tuples as lists), as `config.json` stores it."""
    if isinstance(config, ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def read_saved_config(workdir: str | os.PathLike) -> ConfigDict:
    """The config a training run in `workdir` saved, as a ConfigDict on top of `base_config()`.

    Raises FileNotFoundError when the run has no config.json, ValueError when it is not JSON.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a training run directory (train.py writes "
            "config.json there)"
        )
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    config = base_config()
    _update(config, saved, "")
    return config


def _update(config: ConfigDict, saved: dict[str, Any], where: str) -> None:
    for key, value in saved.items():
        current = config.get(key) if key in config else None
        if isinstance(value, dict) and isinstance(current, ConfigDict) and key != "hf_config":
            _update(current, value, f"{where}{key}.")
        elif key == "hf_config":
            config[key] = ConfigDict(value)
        else:
            # JSON has no tuples; the config's sequences are tuples (hashable, as recipes set).
            config[key] = _tuples(value) if isinstance(value, list) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def identity_differences(saved: Any, given: Any) -> list[str]:
    """Every identity field (`IDENTITY_FIELDS`, less `COMPUTE_ONLY`) that differs, as
    "field: run has X, config has Y" lines; [] when they agree."""
    saved_flat, given_flat = (
        {
            k: v
            for k, v in _flatten({f: _plain(c).get(f) for f in IDENTITY_FIELDS}).items()
            if k not in COMPUTE_ONLY
        }
        for c in (saved, given)
    )
    return _differences(saved_flat, given_flat, ("run has", "config has"))


def check_run_identity(workdir: str | os.PathLike, config, *, action: str) -> None:
    """Refuse `config` for `action` ("evaluate", "resume") unless its identity fields equal
    those of the run's saved config.json; a run without config.json passes.

    Raises RunMismatchError naming every differing field.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return
    differences = identity_differences(json.loads(path.read_text()), config)
    if differences:
        raise RunMismatchError(
            f"cannot {action} the run in {workdir} with this config: it was trained with a "
            f"different model / loss / LoRA / base checkpoint ({path}):\n  "
            + "\n  ".join(differences)
            + "\nleave out --config (the run's own config is used) or use another --workdir"
        )


# ----------------------------------------------------------------------------- base fingerprint


def sample_values(arrays: list[jax.Array], per_tensor: int) -> list[np.ndarray]:
    """`per_tensor` evenly spaced elements of each array (exact values: no reduction, whose
    summation order would depend on the mesh), gathered to every process in one call."""
    positions = []
    for array in arrays:
        size = int(np.prod(array.shape))
        spaced = np.linspace(0, max(size - 1, 0), min(size, per_tensor))
        positions.append(np.unique(spaced).astype(np.int64))

    def take(values):
        return [jnp.ravel(v)[p] for v, p in zip(values, positions, strict=True)]

    shardings = (getattr(a, "sharding", None) for a in arrays)
    mesh = next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)
    if mesh is not None:
        take = jax.jit(take, out_shardings=NamedSharding(mesh, P()))
    return [np.asarray(sample) for sample in jax.device_get(take(arrays))]


def base_fingerprint(frozen: nnx.State, hf_config: dict[str, Any], source: str) -> dict[str, Any]:
    """{"source", "config", "shapes", "sha256", "samples"} of the frozen (base) weights of a
    LoRA model: the sha256 is over `SAMPLES_PER_TENSOR` values of each tensor, "samples" keeps
    `STORED_SAMPLES` of them per tensor."""
    digest = hashlib.sha256()
    shapes, samples = {}, {}
    flat = sorted(nnx.to_flat_state(frozen), key=lambda kv: kv[0])
    values = [variable[...] for _, variable in flat]
    sampled = sample_values(values, SAMPLES_PER_TENSOR)
    for (path, _), value, sample in zip(flat, values, sampled, strict=True):
        name = ".".join(map(str, path))
        shapes[name] = [list(value.shape), str(value.dtype)]
        sample = sample.astype(np.float32)
        digest.update(name.encode())
        digest.update(sample.tobytes())
        stride = max(1, sample.size // STORED_SAMPLES)
        samples[name] = [float(x) for x in sample[::stride][:STORED_SAMPLES]]
    return {
        "source": source,
        "config": _plain(hf_config),
        "shapes": shapes,
        "sha256": digest.hexdigest(),
        "samples": samples,
    }


def write_base_fingerprint(workdir: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
    path = Path(workdir) / FINGERPRINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fingerprint, indent=1))


def check_base_fingerprint(workdir: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
    """Refuse a base model whose fingerprint differs from the one the run saved.

    Raises FileNotFoundError when the run saved none, RunMismatchError naming what differs
    (config fields, tensor shapes, or the weights' values).
    """
    path = Path(workdir) / FINGERPRINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the LoRA run in {workdir} did not record its base model, "
            "so its adapters cannot be checked against the base given"
        )
    saved = json.loads(path.read_text())
    labels = ("run's base has", "given base has")
    problems = [
        f"{kind} {line}"
        for kind in ("config", "shapes")
        for line in _differences(_flatten(saved[kind]), _flatten(fingerprint[kind]), labels)
    ]
    if not problems and saved["sha256"] != fingerprint["sha256"]:
        problems = _value_differences(saved["samples"], fingerprint["samples"])
    if problems:
        shown = problems[:10] + ([f"... {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise RunMismatchError(
            f"the base model given ({fingerprint['source']}) is not the one the LoRA run in "
            f"{workdir} was trained on ({saved['source']}):\n  " + "\n  ".join(shown)
        )


def _value_differences(saved: dict[str, list], given: dict[str, list]) -> list[str]:
    """The tensors whose stored samples differ beyond rounding. A random base re-created on
    another mesh (jit vs eager initialisers) differs from the training one by a few ulps, which
    changes the exact hash but is the same model."""
    lines = []
    for name in sorted(saved):
        want, got = np.asarray(saved[name]), np.asarray(given[name])
        if not np.allclose(want, got, rtol=1e-4, atol=1e-6):
            worst = float(np.abs(want - got).max())
            lines.append(
                f"the weights' values differ: {name} (largest sampled difference {worst:.3g})"
            )
    return lines


def _differences(saved: dict[str, Any], given: dict[str, Any], labels: tuple[str, str]):
    """ "key: <labels[0]> X, <labels[1]> Y" for every flat key whose values differ."""
    missing = object()
    show = lambda v: "nothing" if v is missing else json.dumps(v)  # noqa: E731
    lines = []
    for key in sorted(set(saved) | set(given)):
        first, second = saved.get(key, missing), given.get(key, missing)
        if first != second:
            lines.append(f"{key}: {labels[0]} {show(first)}, {labels[1]} {show(second)}")
    return lines
