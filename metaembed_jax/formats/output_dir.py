"""Where an export may write: never into a run or index directory, never over files unasked.

`metaembed export --out R` with R a run directory wrote the transformers `config.json` over the
run's own and left the run unreadable. An output that is, or lies inside, a training run
directory (`config.json` and `checkpoints/`) or an index directory (a metaembed-jax
`manifest.json`) is refused; so is an existing non-empty output, unless forced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _protected(directory: Path) -> str | None:
    """ "a training run" / "an index" when `directory` is one, else None."""
    if (directory / "config.json").is_file() and (directory / "checkpoints").is_dir():
        return "a training run"
    manifest = directory / "manifest.json"
    if manifest.is_file():
        try:
            if str(json.loads(manifest.read_text()).get("format", "")).startswith("metaembed-jax"):
                return "an index"
        except (OSError, ValueError, AttributeError):
            pass
    return None


def check_output_directory(out: str | os.PathLike, *, force: bool = False) -> Path:
    """`out`, checked to be writable by an export; returns it resolved.

    Raises ValueError when `out` is (or is inside) a run or index directory, or is a file;
    FileExistsError when it is a non-empty directory and `force` is False.
    """
    out = Path(out).resolve()
    for directory in (out, *out.parents):
        kind = _protected(directory)
        if kind is not None:
            where = "is" if directory == out else f"is inside {directory},"
            raise ValueError(
                f"--out {out} {where} {kind} directory: an export there would overwrite its "
                "files (config.json, ...); choose a directory outside it"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"--out {out} exists and is not empty: pass --force to write into it (files of the "
            "same names are replaced), or choose another directory"
        )
    return out
