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

import dataclasses
import json
import mmap
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from metaembed_jax import sharding
from metaembed_jax.models.family import BackboneFamily, family_for

# ---------------------------------------------------------------------------------------------
# Safetensors, read directly (header + memory map), so bfloat16 needs neither torch nor a copy.
# ---------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsReader:
    """All tensors of a checkpoint directory: `model.safetensors` or the sharded layout with
    `model.safetensors.index.json`. Tensors are returned as read-only memory-mapped numpy views."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        index_file = directory / "model.safetensors.index.json"
        if index_file.exists():
            files = _indexed_shards(index_file)
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {directory}")
        self._entries: dict[str, tuple[mmap.mmap, int, dict[str, Any]]] = {}
        self._maps = []
        for name in files:
            self._open(directory / name)

    def _open(self, file: Path) -> None:
        if not file.exists():
            raise FileNotFoundError(f"checkpoint shard {file} listed in the index is missing")
        with open(file, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise ValueError(f"{file}: {size} bytes, too short for a safetensors header")
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps.append(mapped)
        header_len = int.from_bytes(mapped[:8], "little")
        if 8 + header_len > size:
            raise ValueError(
                f"{file} is truncated or not a safetensors file: its header claims {header_len} "
                f"bytes but the file has {size}"
            )
        try:
            header = json.loads(mapped[8 : 8 + header_len])
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{file}: the safetensors header is not valid JSON: {error}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{file}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        data_size = size - 8 - header_len
        for key, info in header.items():
            _check_tensor_extent(file, key, info, data_size)
            self._entries[key] = (mapped, 8 + header_len, info)

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __getitem__(self, key: str) -> np.ndarray:
        mapped, data_start, info = self._entries[key]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key}: unsupported safetensors dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        flat = np.frombuffer(
            mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=data_start + begin
        )
        return flat.reshape(info["shape"])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][2]["shape"])


def _indexed_shards(index_file: Path) -> list[str]:
    """The shard file names of `model.safetensors.index.json`'s weight map, each confined to the
    checkpoint directory (no absolute path, no `..`: a checkpoint names only its own files)."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{index_file}: not a safetensors index with a weight_map ({error})"
        ) from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file}: weight_map is not an object of tensor -> file name")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
            raise ValueError(
                f"{index_file}: weight_map entry {key!r} -> {name!r} is not a file name inside "
                "the checkpoint directory (absolute paths and '..' are refused)"
            )
    return sorted(set(weight_map.values()))


def _check_tensor_extent(file: Path, key: str, info: Any, data_size: int) -> None:
    """A header entry's dtype, shape and data offsets fit the tensor and the file's data."""
    try:
        dtype = np.dtype(_SAFETENSORS_DTYPES.get(info["dtype"], np.uint8))
        begin, end = (int(x) for x in info["data_offsets"])
        count = int(np.prod(info["shape"], dtype=np.int64))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{file}: tensor {key!r} has a malformed header entry: {error}") from None
    if end > data_size:
        raise ValueError(
            f"{file} is truncated: tensor {key!r} needs data bytes [{begin}, {end}) but the file "
            f"holds {data_size} bytes of data"
        )
    expected_end = begin + count * dtype.itemsize
    if info["dtype"] in _SAFETENSORS_DTYPES and (begin < 0 or end != expected_end):
        raise ValueError(
            f"{file}: tensor {key!r} of shape {info['shape']} ({info['dtype']}) does not match "
            f"its data offsets [{begin}, {end})"
        )


# ---------------------------------------------------------------------------------------------
# Declarative key mapping
# ---------------------------------------------------------------------------------------------

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda tensor: tensor,
    # torch nn.Linear weight [out, in] -> our kernel [in, out]
    "linear": lambda tensor: tensor.T,
    # a patch-embedding Conv (kernel == stride) as a linear map on flattened patches
    # [out, C, (T,) P, P] -> [C*(T*)P*P, out], in the order HF flattens pixel_values.
    "conv_to_linear": lambda tensor: tensor.reshape(tensor.shape[0], -1).T,
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


def _path_string(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(part, "key", part)) for part in path)


def _normalise_key(key: str, aliases: Sequence[tuple[str, str]]) -> str:
    for old, new in aliases:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _match_checkpoint_keys(
    reader: SafetensorsReader, family: BackboneFamily, config, problems: list[str]
) -> dict[str, list[tuple[int | None, str, str]]]:
    """Group checkpoint keys by target parameter path: {target: [(layer, key, transform)]}."""
    compiled = [(re.compile(rule.pattern), rule) for rule in family.rules(config)]
    by_target: dict[str, list[tuple[int | None, str, str]]] = {}
    for key in reader:
        name = _normalise_key(key, family.key_aliases)
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
        yield _path_string(path), variable


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
    return family_for(config).build(
        config, dtype=dtype, param_dtype=param_dtype or dtype, lora=lora, remat=remat, rngs=rngs
    )


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
) -> nnx.Module:
    """A Hugging Face checkpoint directory -> Flax NNX backbone with its weights.

    `dtype` is the compute dtype, `param_dtype` the storage dtype (default: `dtype`). With `mesh`,
    every variable (checkpoint weights, fresh LoRA adapters and RNG streams) is placed directly
    onto the sharding its logical axis names get from `rules` (default: `sharding.axis_rules()`),
    once: callers need not place it again.
    Raises FileNotFoundError for a missing dir/config/weights and CheckpointMismatchError listing
    every missing, unexpected or wrongly-shaped tensor.
    """
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
