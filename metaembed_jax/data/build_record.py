"""What a dataset directory was built from, so that a build never reuses rows of other inputs.

Every builder calls `check_build_inputs(dataset_dir, settings, files, built=...)` before it looks
at what is already built. A fresh directory gets `<dataset_dir>/build_config.json`: the settings
(config fields that change the rows) and, per input file, its resolved path, size, modification
time and sha256. Building into a directory that holds finished parts (which the builders would
reuse) recorded with other settings, other files, or files whose content changed is refused with
a ValueError naming every difference; the user picks another `config.data.dir` or deletes the
directory (nothing is deleted for them). Where nothing is finished yet (a build that stopped at a
bad row, say, then the data was fixed) the record is replaced and the build runs. A file whose
size and modification time are unchanged is trusted without hashing it again; a touched file
whose content is the same is accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RECORD_NAME = "build_config.json"
_HASH_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """{"path" (resolved), "size", "mtime_ns", "sha256"} of an input file."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {
        "path": str(resolved),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": file_sha256(resolved),
    }


def _normalised(settings: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))  # tuples -> lists


def _file_difference(recorded: dict[str, Any]) -> str | None:
    """Why the recorded input file no longer is what was built from, or None."""
    path = Path(recorded["path"])
    if not path.is_file():
        return f"{path} no longer exists"
    stat = path.stat()
    if stat.st_size == recorded["size"] and stat.st_mtime_ns == recorded["mtime_ns"]:
        return None
    if stat.st_size == recorded["size"] and file_sha256(path) == recorded["sha256"]:
        return None  # touched or copied, same content
    return f"{path} changed since the build (size {recorded['size']} -> {stat.st_size} bytes)"


def _differences(built: dict[str, Any], settings: dict[str, Any], files: list[str]) -> list[str]:
    differences = [
        f"{key}: built with {built['settings'].get(key)!r}, asked for {settings.get(key)!r}"
        for key in sorted(set(built["settings"]) | set(settings))
        if built["settings"].get(key) != settings.get(key)
    ]
    recorded_paths = [entry["path"] for entry in built["files"]]
    if recorded_paths != files:
        differences.append(f"input files: built from {recorded_paths}, asked for {files}")
    else:
        differences += [d for entry in built["files"] if (d := _file_difference(entry))]
    return differences


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}): the directory's build inputs are unknown; "
            "delete the directory to build it again"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a JSON object: delete the directory to build it again")
    if set(record) != {"settings", "files"}:  # the synthetic builder's first format: settings only
        record = {"settings": record, "files": []}
    return record


def check_build_inputs(
    dataset_dir: str | os.PathLike,
    settings: dict[str, Any],
    files: Sequence[str | os.PathLike] = (),
    *,
    built: bool,
) -> None:
    """Records the inputs of a build of `dataset_dir`; refuses other inputs where rows exist.

    Takes the settings (JSON-able config values that change the rows), the input files, and
    `built`: whether finished parts that the build would reuse are already there (such parts
    without a record were made by an earlier version and cannot be checked).
    Raises ValueError naming each difference; FileNotFoundError for a missing input file.
    """
    directory = Path(dataset_dir)
    record_path = directory / RECORD_NAME
    settings = _normalised(settings)
    resolved = [str(Path(f).resolve()) for f in files]
    if record_path.is_file():
        differences = _differences(_read_record(record_path), settings, resolved)
        if not differences:
            return
        if built:
            raise ValueError(
                f"{directory} was built with other inputs ({'; '.join(differences)}): "
                "its rows would be stale; use another config.data.dir or delete the directory"
            )
        logging.info("%s: nothing finished yet, building from the new inputs", directory)
    elif built:
        raise ValueError(
            f"{directory} holds a dataset without a record of its build inputs ({RECORD_NAME}): "
            "it cannot be checked against this config; delete the directory to build it again"
        )
    for file in files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"input file not found: {file}")
    record = {"settings": settings, "files": [describe_file(f) for f in files]}
    directory.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True))
