"""Safetensors checkpoints read directly (header + memory map), so bfloat16 needs neither torch
nor a copy: `SafetensorsReader(directory)` over `model.safetensors` or a sharded layout."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

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
