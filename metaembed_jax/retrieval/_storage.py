"""On-disk format of `MultiVectorIndex`: raw shard files plus one JSON manifest.

Layout of an index directory (format version 2)::

    manifest.json                      format, version, dtype, count, ids, and per shard: file
                                       names, shapes, dtypes, byte sizes, sha256 checksums
    vectors-<token>-<i>.bin            [R_c, n_i, D] raw little-endian array, C order: budget-
                                       major, so the first r_c vectors of every candidate of the
                                       shard are one contiguous byte range (bfloat16 is kept as
                                       its 16-bit words)
    scales-<token>-<i>.bin             [R_c, n_i] float32 (int8 indexes only)
    full-<token>-<i>.bin               [R_c, n_i, D] float32 (quantised indexes kept with their
                                       full-precision vectors, for exact rescoring)
    .lock                              taken (fcntl.flock) by every save, and shared by loads

Version 1 (still read) stored candidate-major [n_i, R_c, D] / [n_i, R_c] shards.

Saving is atomic and safe against concurrent writers: a save holds the directory's lock from its
first file to its last clean-up, so saves to one path run one after the other. Its shard files
carry a fresh token, are listed in a ``save-<token>.pending`` journal before they are written,
written and fsynced, and only then does ``os.replace`` swap in the new manifest. A crash at any
point before that leaves the previous manifest, which only names the previous (untouched) files.
After the swap a save removes exactly the files that the replaced manifest named and those that
the journals of crashed saves listed: never a file it cannot name (other files a user put in the
directory stay).

Every file name a manifest or journal holds is checked to be a plain file of this directory
(``vectors-<hex>-<i>.bin`` ...) before it is opened, stat-ed or removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import uuid

import numpy as np

FORMAT = "metaembed-jax/multi-vector-index"
# Int ids are returned as one int64 array: an int outside its range is refused where it enters
# (`MultiVectorIndex` checks new ids, `read_manifest` a manifest's).
INT_ID_RANGE = (-(2**63), 2**63 - 1)
VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LOCK = ".lock"
KINDS = ("vectors", "scales", "full")  # the files of one shard, by role
_DATA_FILE = re.compile(
    r"^(vectors|scales|full)-[0-9a-f]+-\d+\.bin$|^manifest\.json\.[0-9a-f]+\.tmp$"
)
_JOURNAL = re.compile(r"^save-[0-9a-f]+\.pending$")
_WRITE_BLOCK = 64 << 20  # bytes per write / hash update: bounded memory for huge shards
# Manifest fields: name -> (accepted types, what is expected, for the error).
_FIELDS = {
    "dtype": (str, "the storage dtype"),
    "count": (int, "the number of candidates"),
    "num_vectors": (int, "R_c, vectors per candidate"),
    "dim": (int, "D, the vector size"),
    "ids": (list, "the list of candidate ids"),
    "shards": (list, "the list of shard entries"),
}
_FILE_FIELDS = {"file": str, "shape": list, "dtype": str, "bytes": int, "sha256": str}


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


@contextlib.contextmanager
def locked(directory: str, *, shared: bool = False):
    """Hold the index directory's lock: exclusive (saves; creates the lock file) or shared
    (loads; skipped where there is no lock file, e.g. an index written before locks existed or
    a read-only copy, since then no save of this code can be running there)."""
    path = os.path.join(directory, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY) if shared else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileNotFoundError, PermissionError):
        if not shared:
            raise
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _write_json(path: str, value) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())


def save(directory: str, header: dict, shards: list[dict[str, np.ndarray | None]]) -> list[dict]:
    """Atomically write an index: ``shards`` is a list of {kind: array | None} (kinds in
    `KINDS`). Returns the manifest's shard entries."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"index path {directory!r} exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    with locked(directory):
        token = uuid.uuid4().hex[:12]
        temporary = f"{MANIFEST}.{token}.tmp"
        names = [
            [(kind, f"{kind}-{token}-{i}.bin") for kind in KINDS if shard.get(kind) is not None]
            for i, shard in enumerate(shards)
        ]
        journal = f"save-{token}.pending"
        planned = [name for shard in names for _, name in shard] + [temporary]
        _write_json(os.path.join(directory, journal), {"files": planned})
        entries = [
            {kind: write_array(directory, name, shard[kind]) for kind, name in shard_names}
            for shard, shard_names in zip(shards, names, strict=True)
        ]
        manifest = {"format": FORMAT, "version": VERSION, **header, "shards": entries}
        _write_json(os.path.join(directory, temporary), manifest)
        replaced = _files_named_by_manifest(directory)
        os.replace(os.path.join(directory, temporary), os.path.join(directory, MANIFEST))
        _fsync_directory(directory)  # the commit point is durable
        _remove_unreferenced(directory, replaced, keep=set(planned) - {temporary}, own=journal)
    return entries


def _files_named_by_manifest(directory: str) -> set[str]:
    """Data files the current manifest names (empty if there is none or it is unreadable: then
    nothing can be removed safely)."""
    try:
        with open(os.path.join(directory, MANIFEST)) as handle:
            shards = json.load(handle)["shards"]
        return {
            entry[kind]["file"]
            for entry in shards
            for kind in KINDS
            if kind in entry and _DATA_FILE.match(str(entry[kind]["file"]))
        }
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _remove_unreferenced(directory: str, replaced: set[str], keep: set[str], own: str) -> None:
    """After the commit (lock held): remove the replaced manifest's files and the journals of
    crashed saves with the files they list, never a file of ``keep``."""
    remove = set(replaced)
    for name in os.listdir(directory):
        if _JOURNAL.match(name) and name != own:
            try:
                with open(os.path.join(directory, name)) as handle:
                    listed = json.load(handle)["files"]
                remove.update(str(f) for f in listed if _DATA_FILE.match(str(f)))
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable journal: its files cannot be named, so they stay
            remove.add(name)
    for name in sorted(remove - keep) + [own]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, name))


def _check_fields(path: str, where: str, value: dict, fields: dict) -> None:
    for name, spec in fields.items():
        types, expected = spec if isinstance(spec, tuple) else (spec, spec.__name__)
        if name not in value:
            raise ValueError(f"index manifest {path!r}: {where} has no {name!r} field ({expected})")
        if not isinstance(value[name], types) or isinstance(value[name], bool):
            raise ValueError(
                f"index manifest {path!r}: {where}{name!r} must be {types.__name__} "
                f"({expected}), got {type(value[name]).__name__}"
            )


def _check_file_entry(path: str, where: str, entry) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"index manifest {path!r}: {where} must be an object")
    _check_fields(path, f"{where} ", entry, _FILE_FIELDS)
    if not _DATA_FILE.match(entry["file"]) or entry["file"].endswith(".tmp"):
        # Checked before anything touches the name: a manifest cannot make us read (or reveal
        # the size of) a file outside the index directory.
        raise ValueError(
            f"index manifest {path!r}: {where} names {entry['file']!r}, which is not a file of "
            "this index directory (expected a plain name like vectors-<hex>-<i>.bin)"
        )
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry["shape"]):
        raise ValueError(f"index manifest {path!r}: {where} shape {entry['shape']!r} is invalid")


def candidate_axis(version: int) -> int:
    """The candidate axis of a shard array in this format version."""
    return 0 if version == 1 else 1


def read_manifest(directory: str) -> dict:
    """Parse and check ``directory/manifest.json``: fields, types, file names, counts, ids.

    Raises:
      FileNotFoundError: no manifest. ValueError: anything wrong in it, named.
    """
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
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path!r}: index format version {manifest.get('version')!r} is not supported; this "
            f"release reads versions {READABLE_VERSIONS} (a newer release may have written it)"
        )
    _check_fields(path, "the manifest ", manifest, _FIELDS)
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or "vectors" not in shard:
            raise ValueError(f"index manifest {path!r}: shards[{i}] has no 'vectors' entry")
        for kind in KINDS:
            if kind in shard:
                _check_file_entry(path, f"shards[{i}].{kind}", shard[kind])
    axis = candidate_axis(manifest["version"])
    count = sum(
        entry["vectors"]["shape"][axis] if len(entry["vectors"]["shape"]) > axis else -1
        for entry in manifest["shards"]
    )
    ids = manifest["ids"]
    if count != manifest["count"] or len(ids) != count:
        raise ValueError(
            f"{path!r} is inconsistent: count {manifest['count']}, {count} vectors in shards, "
            f"{len(ids)} ids"
        )
    if not all(isinstance(i, int | str) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"index manifest {path!r}: ids must be ints or strs")
    low, high = INT_ID_RANGE
    too_large = next((i for i in ids if isinstance(i, int) and not low <= i <= high), None)
    if too_large is not None:
        raise ValueError(f"index manifest {path!r}: id {too_large} does not fit in int64")
    if not isinstance(manifest.get("metadata", {}), dict):
        raise ValueError(f"index manifest {path!r}: 'metadata' must be an object")
    if len(set(ids)) != len(ids):
        raise ValueError(f"index manifest {path!r}: ids are not unique")
    return manifest


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(_WRITE_BLOCK):
            digest.update(piece)
    return digest.hexdigest()


def read_array(directory: str, entry: dict, *, mmap: bool, verify: bool) -> np.ndarray:
    """Read one shard file described by ``entry`` (checked by `read_manifest`); reject missing,
    truncated or altered files."""
    _check_file_entry(os.path.join(directory, MANIFEST), "a shard entry", entry)
    path = os.path.join(directory, entry["file"])
    if os.path.islink(path):  # a link could lead outside the directory the name is confined to
        raise ValueError(f"index shard {path!r} is a symbolic link; shards must be plain files")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"index shard {path!r} listed in the manifest is missing")
    size = os.path.getsize(path)
    dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
    expected = int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        raise ValueError(
            f"index shard {path!r} is truncated or padded: the file has {size} bytes, but its "
            f"manifest shape {shape} of {dtype} ({dtype.itemsize} bytes each) needs {expected}"
        )
    if size != entry["bytes"]:
        raise ValueError(
            f"index shard {path!r}: the manifest's byte count {entry['bytes']} disagrees with "
            f"the {size} bytes of the file and of its shape {shape} of {dtype}"
        )
    if verify and _file_digest(path) != entry["sha256"]:
        raise ValueError(f"index shard {path!r} was altered: sha256 does not match the manifest")
    if mmap:
        if size == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)
    return np.fromfile(path, dtype=dtype).reshape(shape)
