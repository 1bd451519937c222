"""docs/use.md "Use our model from PyTorch", run as written: its `metaembed` commands (through
`commands.main`) and each of its python blocks, in a fresh namespace, in a directory holding the
paths they name (`runs/demo`: the tiny trained LoRA run). The blocks' results equal
`MetaEmbed.embed` of the run."""

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from metaembed_jax import load_trained
from metaembed_jax.cli.main import main
from tests.paths import REPO
from tests.trained_run import trained_lora_run

USE = REPO / "docs" / "use.md"
SECTION = "## Use our model from PyTorch"


def section_blocks(language: str) -> list[str]:
    """The fenced `language` blocks of the section, in order."""
    text = USE.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    body = text[start : end if end > 0 else None]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.DOTALL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with `runs/demo` and the section's `metaembed` commands run in it."""
    root = tmp_path_factory.mktemp("use_from_pytorch")
    shutil.copytree(trained_lora_run(tmp_path_factory), root / "runs" / "demo")
    commands = [
        line
        for block in section_blocks("bash")
        for line in block.splitlines()
        if line.startswith("metaembed ")
    ]
    assert commands, "the section exports with a metaembed command"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for command in commands:
            assert main(shlex.split(command, comments=True)[1:]) == 0, command
    return root


def run_block(index: int, workdir: Path, monkeypatch) -> dict:
    blocks = section_blocks("python")
    assert len(blocks) == 2, "the section's python blocks: the helper and the step-by-step one"
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(blocks[index], f"docs/use.md python block {index}", "exec"), namespace)
    return namespace


def test_helper_block_embeds_as_metaembed(workdir, monkeypatch):
    done = run_block(0, workdir, monkeypatch)
    model, processor = load_trained(workdir / "runs" / "demo")
    features = processor(["", "two green cones"], [[done["page"]], []], side="candidate")
    want = model.embed("candidate", **features)
    np.testing.assert_allclose(done["pages"].numpy(), np.asarray(want), atol=1e-4)
    assert tuple(done["scores"].shape) == (1, 2) and tuple(done["cheap"].shape) == (1, 2)


def test_step_by_step_block_embeds_as_metaembed(workdir, monkeypatch):
    done = run_block(1, workdir, monkeypatch)
    model, processor = load_trained(workdir / "runs" / "demo")
    features = processor(["a red cube"], [[done["page"]]], side="candidate")
    want = np.asarray(model.embed("candidate", **features))
    np.testing.assert_allclose(done["candidate"].numpy(), want, atol=1e-4)
