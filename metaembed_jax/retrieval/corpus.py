"""A corpus to index, as `(id, load)` entries: a folder of images and PDFs, or a JSONL file.

- A folder: every `.png` / `.jpg` / `.jpeg` / `.webp` file (id = its path relative to the folder)
  and every page of every `.pdf` file (id `file.pdf#<page>`, pages from 1, rendered with
  pypdfium2 at `dpi`), in sorted path order, sub-folders included.
- A `.jsonl` file: one `{"id": ..., "text": ..., "image": ...}` object per line; `image` is a
  path relative to the file's folder (or absolute), or absent / null for a text-only item.
`load()` returns the item `{"text": str, "image": PNG/JPEG bytes or None}` the encoder takes;
entries are listed without decoding anything, so a resumed build renders only what it encodes.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
Entry = tuple[str, Callable[[], dict[str, Any]]]


def read_corpus(path: str | os.PathLike, *, dpi: int = 96) -> list[Entry]:
    """The entries of a corpus folder or JSONL file (see the module docstring).

    Raises FileNotFoundError for a missing path, ValueError for an empty corpus, a bad JSONL
    line (naming file and line) or a duplicate id.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist")
    entries = _jsonl_entries(path) if path.is_file() else _folder_entries(path, dpi)
    if not entries:
        raise ValueError(
            f"corpus {path} has no items (expected {', '.join(IMAGE_SUFFIXES)} / .pdf files, "
            "or a .jsonl of {id, text, image})"
        )
    seen: set[str] = set()
    for entry_id, _ in entries:
        if entry_id in seen:
            raise ValueError(f"corpus {path}: id {entry_id!r} appears more than once")
        seen.add(entry_id)
    return entries


def _folder_entries(folder: Path, dpi: int) -> list[Entry]:
    entries: list[Entry] = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        suffix = file.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            entries.append((name, lambda file=file: {"text": "", "image": file.read_bytes()}))
        elif suffix == ".pdf":
            for page in range(_pdf_page_count(file)):
                entries.append(
                    (f"{name}#{page + 1}", lambda f=file, p=page: _pdf_page_item(f, p, dpi))
                )
    return entries


def _pdfium():
    try:
        import pypdfium2
    except ImportError:
        raise ImportError(
            "indexing PDF files needs pypdfium2: pip install pypdfium2 (or convert the pages to "
            "images first)"
        ) from None
    return pypdfium2


def _pdf_page_count(file: Path) -> int:
    document = _pdfium().PdfDocument(str(file))
    try:
        return len(document)
    finally:
        document.close()


def _pdf_page_item(file: Path, page: int, dpi: int) -> dict[str, Any]:
    """Page `page` (from 0) of `file` rendered at `dpi` as PNG bytes (PDF units are 1/72 in)."""
    document = _pdfium().PdfDocument(str(file))
    try:
        image = document[page].render(scale=dpi / 72).to_pil().convert("RGB")
    finally:
        document.close()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"text": "", "image": buffer.getvalue()}


def _jsonl_entries(file: Path) -> list[Entry]:
    entries: list[Entry] = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file} line {number} is not JSON ({error})") from None
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError(f"{file} line {number}: expected an object with an 'id'")
            if not row.get("text") and not row.get("image"):
                raise ValueError(f"{file} line {number}: the item has neither text nor image")
            image = row.get("image")
            image_path = None if not image else (file.parent / image)
            if image_path is not None and not image_path.is_file():
                raise FileNotFoundError(f"{file} line {number}: image {image_path} not found")
            entries.append((str(row["id"]), _jsonl_loader(row.get("text") or "", image_path)))
    return entries


def _jsonl_loader(text: str, image_path: Path | None):
    return lambda: {
        "text": text,
        "image": None if image_path is None else image_path.read_bytes(),
    }
