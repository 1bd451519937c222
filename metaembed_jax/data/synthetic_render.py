"""Drawing for the synthetic dataset: scenes of shapes and document pages, as PNG bytes.

Pure functions of the structured descriptions in `synthetic.py` (no randomness here), so the
same description always gives the same bytes. Fonts are Pillow's bundled default FreeType font
(`ImageFont.load_default(size)`), the same on every machine with the same Pillow.
"""

from __future__ import annotations

import functools
import io
import math

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (236, 236, 236)
COLORS = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 84, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 185),
    "orange": (245, 125, 20),
    "cyan": (30, 195, 210),
    "black": (25, 25, 25),
}
# Object radius as a fraction of the grid cell: "large" fills most of it, "small" under half.
SIZE_FRACTION = {"small": 0.2, "large": 0.42}
JITTER_FRACTION = 0.12  # how far (in cells) an object may sit off its cell centre
# Document page: header colour per kind of entity (a visual cue besides the text).
HEADER_COLORS = {
    "company": (40, 90, 160),
    "city": (30, 130, 80),
    "club": (160, 60, 60),
    "museum": (120, 80, 150),
}


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(4, int(size)))


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding (deterministic for a given Pillow version)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices for the non-circle shapes (screen coordinates, y down)."""
    if shape == "square":
        s = r * 0.88  # a square of the same "radius" looks bigger than a circle: shrink it
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a)))
            for a in (90, 210, 330)
        ]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = math.radians(90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = r, r * 0.35
        corners = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]
        corners += [(-x, -y) for x, y in corners]
        return [(cx + x, cy + y) for x, y in corners]
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene, image_size: int, grid_size: int, supersample: int = 2) -> Image.Image:
    """Draws a scene (objects on a grid) as an RGB image of `image_size` x `image_size`.

    Drawn at `supersample` times the size and downsampled, for anti-aliased edges.
    """
    scale = max(1, int(supersample))
    canvas = image_size * scale
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = canvas / grid_size
    for obj in scene.objects:
        cx = (obj.col + 0.5 + JITTER_FRACTION * obj.jitter[0]) * cell
        cy = (obj.row + 0.5 + JITTER_FRACTION * obj.jitter[1]) * cell
        r = SIZE_FRACTION[obj.size] * cell
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=color)
        if obj.word:
            ink = (255, 255, 255) if sum(color) < 450 else (0, 0, 0)
            font = _font(r * 0.75)  # scaled to the object so the word stays on it
            draw.text((cx, cy), obj.word, fill=ink, font=font, anchor="mm")
    if scale > 1:
        image = image.reduce(scale)  # box filter: much faster than LANCZOS, as smooth here
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return image


def render_document(doc, width: int, height: int) -> Image.Image:
    """Draws a document page: coloured header with the entity name, two fact lines, a table.

    No supersampling: FreeType already anti-aliases the text, which is most of the page.
    """
    w, h = width, height
    image = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    unit = h / 14  # vertical layout unit: the page holds ~14 lines of body text
    margin = w * 0.05
    draw.rectangle([0, 0, w, unit * 2.4], fill=HEADER_COLORS[doc.kind])
    title_font = _font(unit * 1.35)
    draw.text((margin, unit * 1.2), doc.entity, fill=(255, 255, 255), font=title_font, anchor="lm")
    body = _font(unit * 0.95)
    y = unit * 3.4
    for line in (f"A {doc.kind}, founded {doc.founded}.", f"Staff: {doc.staff}."):
        draw.text((margin, y), line, fill=(20, 20, 20), font=body, anchor="lm")
        y += unit * 1.3
    _draw_table(draw, doc, top=y + unit * 0.4, left=margin, width=w - 2 * margin, unit=unit)
    return image


def _draw_table(draw, doc, top: float, left: float, width: float, unit: float) -> None:
    font = _font(unit * 0.8)
    columns = ("Year", *(m.capitalize() for m in doc.metrics))
    rows = [columns] + [
        (str(year), *(str(v) for v in values))
        for year, values in zip(doc.years, doc.values, strict=True)
    ]
    col_width = width / len(columns)
    row_height = unit * 1.45
    for i, row in enumerate(rows):
        y = top + i * row_height
        if i == 0:
            draw.rectangle([left, y, left + width, y + row_height], fill=(225, 225, 225))
        draw.line([left, y + row_height, left + width, y + row_height], fill=(150, 150, 150))
        for j, cell in enumerate(row):
            x = left + (j + 0.5) * col_width
            draw.text((x, y + row_height / 2), cell, fill=(20, 20, 20), font=font, anchor="mm")
