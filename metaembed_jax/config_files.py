"""Where the recipe files (configs/*.py) are: the checkout's top-level configs/ folder, or the
copy an installed package carries as metaembed_jax/configs/ (pyproject maps one onto the other).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The folder of bundled recipes: installed copy first, else the source checkout's."""
    installed = _PACKAGE / "configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "configs"


def config_names() -> list[str]:
    """Names of the bundled recipes (file stems), sorted."""
    return sorted(p.stem for p in config_dir().glob("*.py") if not p.stem.startswith("_"))


def config_path(name: str) -> Path:
    """The file of bundled recipe `name` ("demo" or "demo.py"); FileNotFoundError listing the
    bundled names otherwise."""
    path = config_dir() / (name if name.endswith(".py") else f"{name}.py")
    if not path.is_file():
        bundled = ", ".join(config_names())
        raise FileNotFoundError(f"no recipe file or bundled recipe {name!r}; bundled: {bundled}")
    return path


def resolve_config_value(value: str) -> str:
    """`file.py[:variant]` stays as it is where the file exists; a bundled name becomes its path."""
    spec, colon, variant = value.partition(":")
    if os.path.exists(spec) or os.sep in spec:
        return value
    return f"{config_path(spec)}{colon}{variant}"


def resolve_config_argv(argv: Sequence[str]) -> list[str]:
    """argv with the value of `--config NAME` / `--config=NAME` resolved by resolve_config_value
    (dotted overrides such as `--config.train.steps=5` are left alone)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config_value(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_value(out[i + 1])
    return out
