"""On-disk format of `MultiVectorIndex`: raw shard files plus one JSON manifest.

Layout of an index directory::

    manifest.json                      format, dtype, count, ids, and per shard: file names,
                                       shapes, dtypes, byte sizes, sha256 checksums
    vectors-<token>-<i>.bin            [n_i, R_c, D] raw little-endian array (bfloat16 kept as
                                       its 16-bit words), C order
    scales-<token>-<i>.bin             [n_i, R_c] float32 (int8 indexes only)

Saving is atomic: the shard files of a save carry a fresh token, are written and fsynced first,
and only then does ``os.replace`` swap in the new manifest. A crash at any point before that
leaves the previous manifest, which only names the previous (untouched) files, so the previous
index stays readable; stale files are removed after the swap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid

import numpy as np

FORMAT = "metaembed-jax/multi-vector-index"
VERSION = 1
MANIFEST = "manifest.json"
_DATA_FILE = re.compile(r"^(vectors|scales)-[0-9a-f]+-\d+\.bin$|^manifest\.json\..*\.tmp$")
_WRITE_BLOCK = 64 << 20  # bytes per write / hash update: bounded memory for huge shards


def write_array(directory: str, name: str, array: np.ndarray) -> dict:
    """Write ``array`` raw to ``directory/name`` (fsynced); return its manifest entry."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    digest = hashlib.sha256()
    with open(os.path.join(directory, name), "wb") as handle:
        for start in range(0, flat.size, _WRITE_BLOCK):
            piece = flat[start : start + _WRITE_BLOCK]
            digest.update(piece)
            handle.write(piece.tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    return {
        "file": name,
        "shape": list(array.shape),
        "dtype": np.dtype(array.dtype).str,
        "bytes": int(flat.size),
        "sha256": digest.hexdigest(),
    }


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str, header: dict, shards: list[dict[str, np.ndarray | None]]) -> None:
    """Atomically write an index: ``shards`` is a list of {"vectors": arr, "scales": arr|None}."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"index path {directory!r} exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    entries = []
    for i, shard in enumerate(shards):
        entry = {"vectors": write_array(directory, f"vectors-{token}-{i}.bin", shard["vectors"])}
        if shard.get("scales") is not None:
            entry["scales"] = write_array(directory, f"scales-{token}-{i}.bin", shard["scales"])
        entries.append(entry)
    manifest = {"format": FORMAT, "version": VERSION, **header, "shards": entries}
    temporary = os.path.join(directory, f"{MANIFEST}.{token}.tmp")
    with open(temporary, "w") as handle:
        json.dump(manifest, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(directory, MANIFEST))  # the commit point
    _fsync_directory(directory)
    keep = {entry[kind]["file"] for entry in entries for kind in entry}
    for name in os.listdir(directory):
        if _DATA_FILE.match(name) and name not in keep:
            os.remove(os.path.join(directory, name))


def read_manifest(directory: str) -> dict:
    """Parse and sanity-check ``directory/manifest.json``."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no index at {directory!r}: {MANIFEST} not found")
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"index manifest {path!r} is corrupt: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path!r}: unsupported version {manifest.get('version')!r}")
    count = sum(entry["vectors"]["shape"][0] for entry in manifest["shards"])
    if count != manifest["count"] or len(manifest["ids"]) != count:
        raise ValueError(
            f"{path!r} is inconsistent: count {manifest['count']}, {count} vectors in shards, "
            f"{len(manifest['ids'])} ids"
        )
    return manifest


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(_WRITE_BLOCK):
            digest.update(piece)
    return digest.hexdigest()


def read_array(directory: str, entry: dict, *, mmap: bool, verify: bool) -> np.ndarray:
    """Read one shard file described by ``entry``; reject missing, truncated or altered files."""
    path = os.path.join(directory, entry["file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"index shard {path!r} listed in the manifest is missing")
    size = os.path.getsize(path)
    dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
    expected = int(np.prod(shape)) * dtype.itemsize
    if size != entry["bytes"] or size != expected:
        raise ValueError(
            f"index shard {path!r} is truncated or padded: {size} bytes on disk, manifest says "
            f"{entry['bytes']} (shape {shape}, dtype {dtype})"
        )
    if verify and _file_digest(path) != entry["sha256"]:
        raise ValueError(f"index shard {path!r} was altered: sha256 does not match the manifest")
    if mmap:
        if size == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)
    return np.fromfile(path, dtype=dtype).reshape(shape)
