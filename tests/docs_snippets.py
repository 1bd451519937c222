"""Run the fenced code blocks of a docs page as written (test helper)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_blocks(page: str, language: str) -> list[str]:
    """The fenced blocks of `language` in docs/`page`, in order (indentation removed)."""
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    blocks = re.findall(rf"^( *)```{language}\n(.*?)^\1```", text, flags=re.M | re.S)
    out = []
    for indent, body in blocks:
        out.append("\n".join(line[len(indent) :] for line in body.splitlines()))
    return out


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line))
    return commands


def run_metaembed_commands(block: str) -> None:
    """Run every `metaembed ...` command of a shell block in-process; any other command fails
    (a docs block a test runs must hold only commands it can run)."""
    from metaembed_jax.cli.main import main

    for command in shell_commands(block):
        assert command[0] == "metaembed", f"not a metaembed command: {command}"
        assert main(command[1:]) == 0, command
