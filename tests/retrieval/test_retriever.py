"""Retriever / `metaembed index build|search` on a tiny trained run: the index of a folder of
PNGs and a 2-page PDF (made here) and of a JSONL holds MetaEmbed.embed's embeddings of the same
items; a build stopped mid-way and restarted encodes only what was missing and equals the
uninterrupted build (also after a real SIGKILL of `metaembed index build`); search returns the
ids of a numpy MaxSim ranking, also as --json."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metaembed_jax.cli import main as commands
from metaembed_jax.retrieval.build import build_index
from metaembed_jax.retrieval.index import MultiVectorIndex
from metaembed_jax.retrieval.retriever import Retriever
from tests.trained_run import trained_lora_run

COLOURS = {"a.png": (220, 30, 30), "b.png": (30, 200, 40), "sub/c.png": (20, 40, 230)}


def _png(colour, size=56):
    image = Image.new("RGB", (size, size), colour)
    image.paste((255, 255, 255), (8, 8, 24, 24))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "folder"
    for name, colour in COLOURS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_png(colour))
    pages = [Image.new("RGB", (56, 56), c) for c in ((250, 250, 0), (0, 250, 250))]
    pages[0].save(folder / "doc.pdf", "PDF", save_all=True, append_images=pages[1:], resolution=72)
    (folder / "notes.txt").write_text("not an image: skipped")
    jsonl = root / "items.jsonl"
    rows = [
        {"id": "t1", "text": "a red cube"},
        {"id": "t2", "text": "two green spheres", "image": None},
        {"id": "i1", "text": "", "image": "folder/a.png"},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, jsonl


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    return Retriever.load(trained_lora_run(tmp_path_factory), batch_size=8)


def _reference_candidates(retriever, texts, images):
    """MetaEmbed.embed on the items, in one batch (the model the retriever holds)."""
    from flax import nnx

    encoder = retriever.encoder
    model = nnx.merge(encoder.graphdef, encoder.state)
    has_images = any(image is not None for image in images)
    features = encoder.processor(texts, images if has_images else None, side="candidate")
    return np.asarray(model.embed(side="candidate", **features))


def _pdf_page_png(path, page, dpi):
    import pypdfium2

    document = pypdfium2.PdfDocument(str(path))
    image = document[page].render(scale=dpi / 72).to_pil().convert("RGB")
    document.close()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_folder_and_jsonl_indexes_hold_the_models_embeddings(retriever, corpus, tmp_path):
    folder, jsonl = corpus
    index = build_index(
        retriever, folder, tmp_path / "folder.index", dtype="float32", dpi=72, progress=False
    )
    assert index.ids == ["a.png", "b.png", "doc.pdf#1", "doc.pdf#2", "sub/c.png"]
    images = [(folder / name).read_bytes() for name in ("a.png", "b.png")]
    images += [_pdf_page_png(folder / "doc.pdf", page, 72) for page in (0, 1)]
    images += [(folder / "sub/c.png").read_bytes()]
    want = _reference_candidates(retriever, [""] * 5, images)
    got = MultiVectorIndex.load(tmp_path / "folder.index").embeddings()
    np.testing.assert_allclose(got, want, atol=2e-5)

    index = build_index(retriever, jsonl, tmp_path / "jsonl.index", dtype="float32", progress=False)
    assert index.ids == ["t1", "t2", "i1"]
    want = _reference_candidates(
        retriever,
        ["a red cube", "two green spheres", ""],
        [None, None, (folder / "a.png").read_bytes()],
    )
    np.testing.assert_allclose(index.embeddings(), want, atol=2e-5)

    added = build_index(retriever, jsonl, tmp_path / "folder.index", add=True, progress=False)
    assert added.ids[:5] == ["a.png", "b.png", "doc.pdf#1", "doc.pdf#2", "sub/c.png"]
    assert added.ids[5:] == ["t1", "t2", "i1"]
    np.testing.assert_allclose(added.embeddings()[5:], index.embeddings(), atol=2e-5)


class StopAfter:
    """The retriever's encoder, stopping the build (as a kill would) after `calls` chunks and
    counting the items it encodes."""

    def __init__(self, encoder, calls=None):
        self.encoder, self.calls, self.items = encoder, calls, 0

    def __getattr__(self, name):  # the processor the build fits images with, ...
        return getattr(self.encoder, name)

    def __call__(self, items, side):
        if self.calls is not None and self.calls == 0:
            raise KeyboardInterrupt("build stopped")
        if self.calls is not None:
            self.calls -= 1
        self.items += len(items)
        return self.encoder(items, side)


def test_a_stopped_build_resumes_without_encoding_twice(retriever, corpus, tmp_path):
    folder, _ = corpus
    full = build_index(retriever, folder, tmp_path / "full", chunk_size=2, progress=False)
    original = retriever.encoder
    try:
        retriever.encoder = StopAfter(original, calls=2)
        with pytest.raises(KeyboardInterrupt):
            build_index(retriever, folder, tmp_path / "resumed", chunk_size=2, progress=False)
        assert not (tmp_path / "resumed").exists()
        retriever.encoder = StopAfter(original)
        resumed = build_index(retriever, folder, tmp_path / "resumed", chunk_size=2, progress=False)
        assert retriever.encoder.items == 1  # chunks (2, 2) were kept; only the last item left
    finally:
        retriever.encoder = original
    assert resumed.ids == full.ids
    np.testing.assert_array_equal(resumed.embeddings(), full.embeddings())
    assert not (tmp_path / "resumed.partial").exists()


def test_search_returns_the_maxsim_ranking_and_json(retriever, corpus, tmp_path, capsys):
    folder, _ = corpus
    out = tmp_path / "index"
    index = build_index(retriever, folder, out, dtype="float32", progress=False)
    queries = ["a red square", "a yellow page"]
    q = retriever.encode_queries(queries)[:, :2]
    c = index.embeddings()[:, :4]
    scores = np.einsum("qid,cjd->qcij", q, c).max(-1).sum(-1)
    want = [[index.ids[j] for j in np.argsort(-row, kind="stable")[:3]] for row in scores]

    hits = retriever.search(queries, index, budget=(2, 4), k=3)
    assert [[doc_id for doc_id, _ in row] for row in hits] == want
    np.testing.assert_allclose([s for _, s in hits[0]], np.sort(scores[0])[::-1][:3], rtol=1e-5)

    argv = ["index", "search", "--index", str(out), "--run", str(retriever.run_dir)]
    argv += ["--query", queries[0], "--query", queries[1], "--budget", "2x4", "--k", "3"]
    assert commands.main([*argv, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert [p["query"] for p in parsed] == queries
    assert [[r["id"] for r in p["results"]] for p in parsed] == want


@pytest.mark.slow
def test_a_build_killed_with_sigkill_resumes_to_the_uninterrupted_index(retriever, tmp_path):
    """`metaembed index build` in a subprocess, SIGKILLed once two chunks are on disk (a chunk
    may be half-written then); the build resumed here encodes only the chunks not on disk and
    gives the uninterrupted build's index."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.paths import REPO

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.png").write_bytes(_png((6 * i, 250 - 6 * i, 100)))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "metaembed_jax.cli.main", "index", "build"]
    command += ["--run", str(retriever.run_dir), "--corpus", str(folder), "--out", str(out)]
    command += ["--chunk-size", "1", "--batch-size", "1", "--dtype", "float32", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    build = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    second_chunk = out.with_name(out.name + ".partial") / "chunk-000001.npz"
    deadline = time.monotonic() + 300
    while not second_chunk.exists() and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    build.send_signal(signal.SIGKILL)
    _, stderr = build.communicate()
    assert build.returncode == -signal.SIGKILL, stderr[-2000:]  # killed, not finished
    done = len(list(second_chunk.parent.glob("chunk-??????.npz")))
    assert 2 <= done < 40 and not out.exists()

    original = retriever.encoder
    try:
        retriever.encoder = StopAfter(original)
        resumed = build_index(retriever, folder, out, chunk_size=1, dtype="float32", progress=False)
        assert retriever.encoder.items == 40 - done  # nothing encoded twice
    finally:
        retriever.encoder = original
    full = build_index(retriever, folder, tmp_path / "full", dtype="float32", progress=False)
    assert resumed.ids == full.ids
    np.testing.assert_allclose(resumed.embeddings(), full.embeddings(), atol=2e-5)


def test_items_a_user_may_pass_are_embedded_or_refused_clearly(
    retriever, corpus, monkeypatch, caplog
):
    """A str naming an existing image was embedded as its text (case 8): refused, saying how to
    pass the file; a one-word image name that names no file is embedded as text with a
    warning; a numpy HWC uint8 array is the image (it raised "The truth value of an array ...
    is ambiguous"), any other array is refused naming its shape."""
    import logging

    from metaembed_jax.models.processing import BadRowError

    folder, _ = corpus
    monkeypatch.chdir(folder)  # the names below are relative, as a user types them
    with pytest.raises(ValueError, match=r"'a\.png' is the name of an existing file, and a str"):
        retriever.encode_documents(["a.png"])
    with pytest.raises(ValueError, match=r"'doc\.pdf' is the name .* index a PDF's pages"):
        retriever.encode_documents(["doc.pdf"])
    with caplog.at_level(logging.WARNING):
        as_text = retriever.encode_documents(["page.png"])
    assert "'page.png' looks like a file name, but no such file exists" in caplog.text
    np.testing.assert_array_equal(as_text, retriever.encode_documents([{"text": "page.png"}]))

    pixels = np.asarray(Image.open(folder / "a.png").convert("RGB"))
    from_array = retriever.encode_documents([pixels, pixels[..., :1]])
    np.testing.assert_allclose(
        from_array[0], retriever.encode_documents([Path("a.png")])[0], atol=1e-6
    )
    for bad in (np.zeros(5), pixels.astype(np.float32), pixels[..., :2]):
        with pytest.raises(BadRowError, match=r"a numpy image must be a uint8 array of shape"):
            retriever.encode_documents([bad])
