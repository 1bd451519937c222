"""Corpus files of the kinds a real folder holds, made in the test: good and damaged images,
odd shapes, PDFs with a huge page or a password (shared by the corpus, index-build and CLI
tests).

The encrypted PDF is written by hand: one page and a Standard security handler (RC4, revision
2) in its trailer whose user-password check fails for every password the reader tries, which is
what PDFium reports for a password-protected file (PIL and pypdfium2 cannot write encrypted
PDFs). The huge page is a 56 x 56 image saved by PIL at 0.28 dpi: a 14400 x 14400 pt page.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

HUGE_PAGE_PT = 14400


def png(colour=(220, 30, 30), size=(56, 56)) -> bytes:
    """A PNG of `size` (width, height) in `colour` with a white square, so images differ."""
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (0, 0, max(1, size[0] // 3), max(1, size[1] // 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png() -> bytes:
    """The first half of a noisy 200 x 200 PNG (its header and part of its data)."""
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def text_as_png() -> bytes:
    return b"this is a text file that was saved with a .png name\n"


def huge_page_pdf(path: Path) -> Path:
    """A one-page PDF whose page is `HUGE_PAGE_PT` points square (200 inches)."""
    image = Image.new("RGB", (56, 56), (250, 250, 0))
    image.save(path, "PDF", resolution=56 / (HUGE_PAGE_PT / 72))
    return path


def two_page_pdf(path: Path) -> Path:
    pages = [Image.new("RGB", (56, 56), c) for c in ((250, 250, 0), (0, 250, 250))]
    pages[0].save(path, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return path


def encrypted_pdf(path: Path) -> Path:
    """A one-page PDF protected by a password (see the module docstring)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> "
        b"/P -4 >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    file_id = b"<" + b"ab" * 16 + b">"
    out += b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 4 0 R " % (len(objects) + 1)
    out += b"/ID [" + file_id + b" " + file_id + b"] >>\n"
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    path.write_bytes(bytes(out))
    return path


def real_folder(folder: Path) -> dict[str, list[str]]:
    """A folder as a user has it: good images (one 300 x 9020 panorama, one 1 x 400 strip), a
    truncated PNG, a text file named .png, a 2-page PDF, a PDF with a 200-inch page and an
    encrypted PDF. Returns {"good": ids the index holds, "bad": the files it skips}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").write_bytes(png((220, 30, 30)))
    (folder / "panorama.png").write_bytes(png((30, 200, 40), size=(9020, 300)))
    (folder / "strip.png").write_bytes(png((20, 40, 230), size=(1, 400)))
    (folder / "broken.png").write_bytes(truncated_png())
    (folder / "notes.png").write_bytes(text_as_png())
    two_page_pdf(folder / "doc.pdf")
    huge_page_pdf(folder / "poster.pdf")
    encrypted_pdf(folder / "secret.pdf")
    good = ["a.png", "doc.pdf#1", "doc.pdf#2", "panorama.png", "poster.pdf#1", "strip.png"]
    return {"good": good, "bad": ["broken.png", "notes.png", "secret.pdf"]}
