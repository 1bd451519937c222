"""`pip install .` into a fresh virtual environment gives a working `metaembed` command.

Offline: the new venv sees this environment's installed dependencies through a .pth file,
and the package is installed with --no-deps --no-build-isolation --no-index (nothing is
downloaded). The command runs outside the source tree, so the installed copy is the one used.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from metaembed_jax.training.recipes import config_names, resolve_config_argv

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_and_maps_configs():
    """The package list is explicit (configs/ installs as metaembed_jax.configs): a new
    subpackage missing from it would install without its files."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "metaembed_jax").rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == found | {"metaembed_jax.configs"}
    assert setuptools["package-dir"] == {"metaembed_jax.configs": "configs"}


def test_config_names_resolve_to_the_bundled_files():
    assert {"demo", "qwen2_5_vl_7b", "paligemma_3b", "llama3_2_vision_11b"} <= set(config_names())
    argv = ["train.py", "--config", "demo:nommr", "--config.train.steps=5", "--workdir=w"]
    resolved = resolve_config_argv(argv)
    assert resolved[2] == f"{REPO / 'configs' / 'demo.py'}:nommr"
    assert resolved[3:] == argv[3:]
    local = REPO / "configs" / "demo.py"
    assert resolve_config_argv([f"--config={local}"]) == [f"--config={local}"]
    with pytest.raises(FileNotFoundError, match="bundled: .*demo"):
        resolve_config_argv(["--config=no_such_recipe"])


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_gives_the_metaembed_command(tmp_path):
    # Outside the source tree: no PYTHONPATH pointing at it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    source = tmp_path / "source"
    skipped = shutil.ignore_patterns("__pycache__", "*.egg-info", ".ruff_cache")
    top_level = {".git", ".venv", "runs", "build"} | {p.name for p in REPO.glob("data_cache*")}

    def ignore(directory, names):  # build outputs at the top only: metaembed_jax/data is code
        top = {n for n in names if n in top_level} if Path(directory) == REPO else set()
        return top | skipped(directory, names)

    shutil.copytree(REPO, source, ignore=ignore)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
        + ["--no-build-isolation", "--no-index", str(source)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]

    def installed(program: str, *args, check: bool = False) -> subprocess.CompletedProcess:
        """A program of the new venv, run outside the source tree without PYTHONPATH."""
        command = [python] if program == "python" else [venv / "bin" / program]
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, cwd=tmp_path, env=env, check=check
        )

    shown = installed("metaembed", "--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "index" in shown.stdout and "usage: metaembed" in shown.stdout
    build_help = installed("metaembed", "index", "build", "--help")
    assert "--corpus" in build_help.stdout and "--dtype" in build_help.stdout
    where = installed(
        "python", "-c", "import metaembed_jax; print(metaembed_jax.__file__)", check=True
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the installed copy
    modules = "metaembed_jax.data.pipeline, metaembed_jax.training.loop, metaembed_jax.evaluation"
    modules += ".runner, metaembed_jax.models.mllama, metaembed_jax.models.paligemma"
    installed("python", "-c", f"import {modules}", check=True)
    recipe = installed("metaembed", "configs", "demo", "--path", check=True).stdout.strip()
    assert Path(recipe).is_relative_to(venv) and Path(recipe).name == "demo.py", recipe
    text = installed("metaembed", "configs", "demo", check=True).stdout
    assert text == Path(recipe).read_text(), text[:500]  # without --path: the recipe itself
    # The installed recipe loads (it imports the installed package) and the train program
    # starts from it by name, failing only on the flag it is missing.
    train = installed("metaembed", "train", "--config", "demo:single")
    assert train.returncode != 0 and "workdir" in train.stderr, train.stderr[-2000:]
    licence = list(Path(site).glob("metaembed_jax-*.dist-info/licenses/LICENSE"))
    assert licence and "Apache License" in licence[0].read_text()
