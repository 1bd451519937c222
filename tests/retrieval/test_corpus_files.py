"""A corpus folder as a user has it (issue 36, cases 1-3 and 13), read with the tiny run's
processor and no model: every file that cannot be read is named when its entry loads (a
truncated PNG, a text file named .png, an encrypted PDF); a panorama, a 1 x 400 strip and a
200-inch PDF page become images within the model's pixel budget that the processor takes; an
entry's signature follows its file's content (what a resumed build compares)."""

import os

import numpy as np
import pypdfium2
import pytest

from metaembed_jax.data.pipeline import make_processor, model_family
from metaembed_jax.retrieval.corpus import CorpusFileError, read_corpus
from tests.corpus_files import HUGE_PAGE_PT, huge_page_pdf, png, real_folder
from tests.trained_run import tiny_lora_config

FACTOR = 28  # the tiny Qwen2-VL's merged patch: 14 px patches, merged 2 x 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus_files")
    config = tiny_lora_config(root / "data")
    processor = make_processor(config, model_family(config))
    folder = root / "folder"
    expected = real_folder(folder)
    return config, processor, folder, expected


def _entries(folder, processor, **kwargs):
    return {entry.id: entry for entry in read_corpus(folder, processor=processor, **kwargs)}


def test_every_bad_file_is_named_when_it_loads(setup):
    _, processor, folder, expected = setup
    entries = _entries(folder, processor)
    assert sorted(entries) == sorted(expected["good"] + expected["bad"])
    problems = {
        "broken.png": r"^broken\.png: cannot decode the image \(\d+ bytes\): image file is "
        r"truncated",
        "notes.png": r"^notes\.png: cannot decode the image \(52 bytes\): not an image in a "
        r"format PIL reads",
        "secret.pdf": r"^secret\.pdf: cannot open the PDF: .*password.* \(an encrypted PDF: "
        r"remove its password first\)$",
    }
    for name, pattern in problems.items():
        with pytest.raises(CorpusFileError, match=pattern):
            entries[name].load()
    for name in expected["good"]:
        item = entries[name].load()
        assert item["text"] == "" and item["image"].mode == "RGB"


def _patches(processor, image) -> int:
    features = processor([""], [[image]], side="candidate")
    return int(np.prod(features["image_grid_thw"], axis=-1).sum())


def test_odd_shapes_are_fitted_into_the_pixel_budget(setup):
    """A 9020 x 300 panorama (40 patches at smart_resize's size, more than the run's largest
    patch bucket) and a 1 x 400 strip (an aspect ratio transformers refuses) load as images
    within the budget, and the run's padded batch shapes take them."""
    config, processor, folder, _ = setup
    entries = _entries(folder, processor)
    budget = processor.pixel_budget
    assert budget == config.data.max_pixels
    static_shapes = model_family(config).static_shapes(config.data, 2)
    for name, long_side in (("panorama.png", "width"), ("strip.png", "height")):
        image = entries[name].load()["image"]
        width, height = image.size
        assert width * height <= budget and width % FACTOR == 0 and height % FACTOR == 0
        assert getattr(image, long_side) > min(width, height)  # still the long side
        assert _patches(processor, image) <= budget // 14**2
        features = processor(["", ""], [[image], [image]], side="candidate")
        static_shapes(dict(features))  # raised "more than the largest patch bucket" before


class RenderSpy:
    """PdfPage.render, recording each page's size in pixels; refuses a render far beyond the
    budget before it allocates (a 200-inch page at 96 dpi is 368M pixels)."""

    def __init__(self, limit):
        self.limit, self.sizes, self.original = limit, [], pypdfium2.PdfPage.render

    def __call__(self, page, scale=1, **kwargs):
        width, height = page.get_size()
        pixels = (width * scale) * (height * scale)
        assert pixels <= self.limit, f"rendering a {width} x {height} pt page to {pixels:.3g} px"
        bitmap = self.original(page, scale=scale, **kwargs)
        self.sizes.append((bitmap.width, bitmap.height))
        return bitmap


def test_a_huge_pdf_page_is_rendered_straight_to_the_budget(setup, tmp_path, monkeypatch):
    _, processor, _, _ = setup
    budget = processor.pixel_budget
    folder = tmp_path / "pdfs"
    folder.mkdir()
    huge_page_pdf(folder / "poster.pdf")
    (folder / "small.png").write_bytes(png())
    spy = RenderSpy(limit=4 * budget)
    monkeypatch.setattr(pypdfium2.PdfPage, "render", lambda page, **kw: spy(page, **kw))
    entries = _entries(folder, processor, dpi=96)
    image = entries["poster.pdf#1"].load()["image"]
    ((width, height),) = spy.sizes
    assert width * height <= budget and width == height  # the page rendered at < 1 px per pt
    assert image.width * image.height <= budget
    assert _patches(processor, image) <= budget // 14**2
    assert 100 * width < HUGE_PAGE_PT * 96 / 72  # 96 dpi would have rendered 100x wider


def test_dpi_bounds_the_rendering_of_small_pages(setup, tmp_path, monkeypatch):
    """A 56 pt page at --dpi 36 renders at 36 dpi (28 px), not up to the pixel budget."""
    _, processor, folder, _ = setup
    spy = RenderSpy(limit=4 * processor.pixel_budget)
    monkeypatch.setattr(pypdfium2.PdfPage, "render", lambda page, **kw: spy(page, **kw))
    _entries(folder, processor, dpi=36)["doc.pdf#1"].load()
    assert spy.sizes == [(28, 28)]


def test_an_entry_signature_follows_its_files_content(setup, tmp_path):
    _, processor, _, _ = setup
    folder = tmp_path / "changing"
    folder.mkdir()
    (folder / "a.png").write_bytes(png((10, 10, 10)))
    (folder / "b.png").write_bytes(png((20, 20, 20)))
    before = {e.id: e.signature for e in read_corpus(folder, processor=processor)}
    assert before == {e.id: e.signature for e in read_corpus(folder, processor=processor)}
    (folder / "a.png").write_bytes(png((200, 10, 10)))
    os.utime(folder / "a.png", ns=(1, 1))  # even an mtime set back: the sha256 differs
    after = {e.id: e.signature for e in read_corpus(folder, processor=processor)}
    assert after["b.png"] == before["b.png"] and after["a.png"] != before["a.png"]
