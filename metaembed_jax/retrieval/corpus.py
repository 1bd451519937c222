"""A corpus to index, as entries: a folder of images and PDFs, or a JSONL file.

- A folder: every `.png` / `.jpg` / `.jpeg` / `.webp` file (id = its path relative to the folder)
  and every page of every `.pdf` file (id `file.pdf#<page>`, pages from 1), in sorted path
  order, sub-folders included.
- A `.jsonl` file: one `{"id": ..., "text": ..., "image": ...}` object per line; `image` is a
  path relative to the file's folder (or absolute), or absent / null for a text-only item.

`entry.load()` returns the item `{"text": str, "image": PIL image or None}` the encoder takes,
the image decoded and fitted to the processor's pixel budget (`processor.fit_image`): a 4000 x
3000 photo, a 300 x 9020 panorama or a 1 x 400 strip all become an image the model takes. A PDF
page is rendered straight to the budget (its pixel count at most `processor.pixel_budget`, and
at most `dpi`): a 200 x 200 inch page costs what a letter page costs. Entries are listed without
decoding anything, so a resumed build decodes only what it encodes.

A file that cannot be read (a truncated or mislabelled image, an encrypted or broken PDF, a
page that does not render) raises `CorpusFileError` from `load()` naming the file and page; an
unreadable PDF is one entry with the file's name as id, so that a build skipping bad files
lists it too. `entry.signature` identifies the content an entry is read from (sha256, size and
mtime of its file; for JSONL the text as well): a resumed build re-encodes an entry whose file
changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from PIL import UnidentifiedImageError

from metaembed_jax.models.processing import BadRowError, decode_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_HASH_BLOCK = 1 << 20


class CorpusFileError(ValueError):
    """A corpus file that cannot be read as an item; the message names the file (and page)."""


class Entry(NamedTuple):
    """One corpus item: its id, how to load it, and the signature of what it is read from."""

    id: str
    load: Callable[[], dict[str, Any]]
    signature: str


def _identity(image):
    return image


def read_corpus(path: str | os.PathLike, *, processor=None, dpi: int = 96) -> list[Entry]:
    """The entries of a corpus folder or JSONL file (see the module docstring).

    `processor` (the model's, with `fit_image` / `pixel_budget`) fits images and PDF pages to
    its budget; None keeps images at their size and renders pages at `dpi`. `dpi` is the
    upper bound of a page's resolution (PDF units are 1/72 inch).

    Raises FileNotFoundError for a missing path, ValueError for an empty corpus, a bad JSONL
    line (naming file and line) or a duplicate id.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist")
    fit = getattr(processor, "fit_image", _identity)
    budget = getattr(processor, "pixel_budget", None)
    if path.is_file():
        entries = _jsonl_entries(path, fit)
    else:
        entries = _folder_entries(path, fit, PageRendering(dpi, budget))
    if not entries:
        raise ValueError(
            f"corpus {path} has no items (expected {', '.join(IMAGE_SUFFIXES)} / .pdf files, "
            "or a .jsonl of {id, text, image})"
        )
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise ValueError(f"corpus {path}: id {entry.id!r} appears more than once")
        seen.add(entry.id)
    return entries


def is_folder_corpus(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


def file_signature(file: Path) -> str:
    """ "sha256:<hex> size:<bytes> mtime:<ns>" of a file's current content."""
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    stat = file.stat()
    return f"sha256:{digest.hexdigest()} size:{stat.st_size} mtime:{stat.st_mtime_ns}"


def _folder_entries(folder: Path, fit, rendering: PageRendering) -> list[Entry]:
    entries: list[Entry] = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        suffix = file.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            load = lambda file=file, name=name: _image_item(file, name, fit)  # noqa: E731
            entries.append(Entry(name, load, file_signature(file)))
        elif suffix == ".pdf":
            entries.extend(_pdf_entries(file, name, fit, rendering))
    return entries


def _image_item(file: Path, name: str, fit, text: str = "") -> dict[str, Any]:
    try:
        data = file.read_bytes()
        image = decode_image(data, name)
    except OSError as error:
        raise CorpusFileError(f"{name}: cannot read the file: {error}") from None
    except BadRowError as error:
        cause = error.__cause__
        if isinstance(cause, UnidentifiedImageError):
            reason = "not an image in a format PIL reads (png, jpeg, webp, ...)"
        else:
            reason = str(cause or error)
        raise CorpusFileError(
            f"{name}: cannot decode the image ({len(data)} bytes): {reason}"
        ) from None
    return {"text": text, "image": fit(image)}


# ----------------------------------------------------------------------------- PDF pages


class PageRendering(NamedTuple):
    """How PDF pages become images: at most `dpi`, and at most `pixel_budget` pixels."""

    dpi: int
    pixel_budget: int | None

    def scale(self, width_pt: float, height_pt: float) -> float:
        """Pixels per PDF unit (1/72 inch) for a page of that size."""
        scale = self.dpi / 72
        if self.pixel_budget:
            scale = min(scale, math.sqrt(self.pixel_budget / max(width_pt * height_pt, 1e-6)))
        return scale


def _pdfium():
    try:
        import pypdfium2
    except ImportError:
        raise ImportError(
            "indexing PDF files needs pypdfium2: pip install pypdfium2 (or convert the pages to "
            "images first)"
        ) from None
    return pypdfium2


def _open_pdf(file: Path, name: str):
    pdfium = _pdfium()
    try:
        return pdfium.PdfDocument(str(file))
    except pdfium.PdfiumError as error:
        hint = " (an encrypted PDF: remove its password first)" if "password" in str(error) else ""
        raise CorpusFileError(f"{name}: cannot open the PDF: {error}{hint}") from None


def _pdf_entries(file: Path, name: str, fit, rendering: PageRendering) -> list[Entry]:
    signature = file_signature(file)
    try:
        document = _open_pdf(file, name)
    except CorpusFileError as error:
        problem = str(error)

        def refuse():
            raise CorpusFileError(problem)

        return [Entry(name, refuse, signature)]
    try:
        count = len(document)
    finally:
        document.close()
    return [
        Entry(
            f"{name}#{page + 1}",
            lambda p=page: _pdf_page_item(file, name, p, fit, rendering),
            signature,
        )
        for page in range(count)
    ]


def _pdf_page_item(file: Path, name: str, page: int, fit, rendering: PageRendering) -> dict:
    """Page `page` (from 0) of `file` rendered to the budget, fitted."""
    document = _open_pdf(file, name)
    try:
        pdf_page = document[page]
        width, height = pdf_page.get_size()
        image = pdf_page.render(scale=rendering.scale(width, height)).to_pil().convert("RGB")
    except _pdfium().PdfiumError as error:
        raise CorpusFileError(f"{name} page {page + 1}: cannot render it: {error}") from None
    finally:
        document.close()
    return {"text": "", "image": fit(image)}


# ----------------------------------------------------------------------------- JSONL


def _jsonl_entries(file: Path, fit) -> list[Entry]:
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
            text, image = row.get("text") or "", row.get("image")
            image_path = None if not image else (file.parent / image)
            if image_path is not None and not image_path.is_file():
                raise FileNotFoundError(f"{file} line {number}: image {image_path} not found")
            signature = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if image_path is not None:
                signature += " " + file_signature(image_path)
            what = f"{file.name} line {number} ({image})"
            entries.append(
                Entry(str(row["id"]), _jsonl_loader(text, image_path, what, fit), signature)
            )
    return entries


def _jsonl_loader(text: str, image_path: Path | None, what: str, fit):
    if image_path is None:
        return lambda: {"text": text, "image": None}
    return lambda: _image_item(image_path, what, fit, text)
