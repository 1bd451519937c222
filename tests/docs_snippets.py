"""Read the fenced code blocks and links of the documentation pages, and run a page's `metaembed`
commands (test helpers)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^( *)```([\w-]*)\n(.*?)^\1```", flags=re.M | re.S)
_HEADING = re.compile(r"^(#{1,6}) +(.*?) *$", flags=re.M)


@dataclass(frozen=True)
class Block:
    """One fenced block: its language (the word after the fence, "" for none), its text with the
    fence's indentation removed, the heading of the section it is in, and its line."""

    language: str
    text: str
    section: str
    line: int


def page_path(page: str | Path) -> Path:
    """`README.md` (or any path under the repository: `metaembed_jax/models/x/README.md`) as
    is; a bare page name (`use.md`, `experiments/x.md`) under docs/."""
    page = Path(page)
    if page.is_absolute():
        return page
    if page.name == "README.md" or page.parts[0] in ("docs", "metaembed_jax"):
        return REPO / page
    return REPO / "docs" / page


def fenced_blocks(page: str | Path) -> list[Block]:
    """Every fenced block of a page, in order."""
    text = page_path(page).read_text(encoding="utf-8")
    headings = [(m.start(), m[2]) for m in _HEADING.finditer(_without_fences(text))]
    blocks = []
    for match in _FENCE.finditer(text):
        indent, language, body = match[1], match[2], match[3]
        section = next((title for start, title in reversed(headings) if start < match.start()), "")
        lines = "\n".join(line[len(indent) :] for line in body.splitlines())
        blocks.append(Block(language, lines, section, text.count("\n", 0, match.start()) + 1))
    return blocks


def code_blocks(page: str | Path, language: str) -> list[str]:
    """The fenced blocks of `language` in a page (see `page_path`), in order."""
    return [block.text for block in fenced_blocks(page) if block.language == language]


def _without_fences(text: str) -> str:
    """The text with every fenced block blanked out (same length), so `#` lines inside code are
    not read as headings."""
    return _FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text)


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to `-`."""
    text = _without_fences(page.read_text(encoding="utf-8"))
    anchors = set()
    for match in _HEADING.finditer(text):
        title = re.sub(r"[^\w\- ]", "", match[2].replace("`", "").lower())
        anchors.add(title.replace(" ", "-"))
    return anchors


def relative_links(page: Path) -> list[tuple[str, str]]:
    """(target, anchor) of every markdown link of a page that is not a URL (`[x](other.md#y)`;
    an in-page link `[x](#y)` has target "")."""
    text = _without_fences(page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    links = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        links.append((path, anchor))
    return links


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
