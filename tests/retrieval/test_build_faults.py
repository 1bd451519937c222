"""`metaembed index build` killed with SIGKILL at chosen moments, then rerun (issue 36, case 11):
an `--add` killed while the index is being replaced (just before or just after its new manifest
goes in) finishes to the uninterrupted `--add`'s index; a build killed after two chunks and
resumed after a corpus file of a finished chunk changed encodes that file again.

The build runs as a real process whose `os.replace` (what every chunk and index save ends with)
sends the process SIGKILL at the moment chosen; the rerun happens here, on the same run."""

import os
import signal
import sys
import textwrap

import numpy as np
import pytest

from metaembed_jax.retrieval.build import build_index
from metaembed_jax.retrieval.index import MultiVectorIndex
from metaembed_jax.retrieval.retriever import Retriever
from tests.corpus_files import png
from tests.helpers import run_process
from tests.trained_run import trained_lora_run

pytestmark = pytest.mark.slow

KILLED_BUILD = """
import os, signal, sys
from pathlib import Path

mode, watched = sys.argv[1], Path(sys.argv[2]).resolve()
real_replace, seen = os.replace, []


def inside(path):
    path = Path(path).resolve()
    return path == watched or watched in path.parents


def replace(src, dst, *args, **kwargs):
    # chunks:N -> killed once the N-th chunk is on disk; index:before / index:after -> killed
    # around the first replace inside the index directory (its new manifest going in).
    kind, when = mode.split(":")
    if kind == "index" and when == "before" and (inside(src) or inside(dst)):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kwargs)
    if kind == "index" and when == "after" and (inside(src) or inside(dst)):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "chunks" and Path(dst).name.startswith("chunk-"):
        seen.append(dst)
        if len(seen) == int(when):
            os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace
from metaembed_jax.cli.main import main

sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    return Retriever.load(trained_lora_run(tmp_path_factory), batch_size=8)


def _folder(path, colours):
    path.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        (path / f"{i:02d}.png").write_bytes(png(colour))
    return path


COLOURS = [(40 * i, 250 - 40 * i, 90) for i in range(6)]


def _killed_build(tmp_path, retriever, mode, watched, corpus, out, *extra):
    script = tmp_path / "killed_build.py"
    script.write_text(textwrap.dedent(KILLED_BUILD))
    argv = ["index", "build", "--run", str(retriever.run_dir), "--corpus", str(corpus)]
    argv += ["--out", str(out), "--chunk-size", "1", "--dtype", "float32", "--no-progress"]
    done = run_process([sys.executable, str(script), mode, str(watched), *argv, *extra])
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]  # killed, not finished


class Counting:
    """The retriever's encoder, counting the items it encodes."""

    def __init__(self, encoder):
        self.encoder, self.items = encoder, 0

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def __call__(self, items, side):
        self.items += len(items)
        return self.encoder(items, side)


def _build(retriever, corpus, out, **kwargs):
    """build_index as the command runs it (chunks of 1, float32); returns (index, encoded)."""
    original, retriever.encoder = retriever.encoder, Counting(retriever.encoder)
    try:
        index = build_index(
            retriever, corpus, out, chunk_size=1, dtype="float32", progress=False, **kwargs
        )
        return index, retriever.encoder.items
    finally:
        retriever.encoder = original


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_add_killed_while_the_index_is_replaced_finishes_as_uninterrupted(
    retriever, tmp_path, when
):
    first = _folder(tmp_path / "first", COLOURS[:3])
    both = _folder(tmp_path / "both", COLOURS)
    reference, _ = _build(retriever, first, tmp_path / "reference")
    reference, _ = _build(retriever, both, tmp_path / "reference", add=True)
    out = tmp_path / "index"
    _build(retriever, first, out)
    _killed_build(tmp_path, retriever, f"index:{when}", out, both, out, "--add")

    assert MultiVectorIndex.load(out).ids in (reference.ids[:3], reference.ids)  # old or new
    index, encoded = _build(retriever, both, out, add=True)
    assert encoded == 0  # the chunks were on disk (before), or the new index in place (after)
    assert index.ids == reference.ids and len(set(index.ids)) == 6
    np.testing.assert_allclose(index.embeddings(), reference.embeddings(), atol=2e-5)
    loaded = MultiVectorIndex.load(out)
    assert loaded.ids == reference.ids
    np.testing.assert_allclose(loaded.embeddings(), reference.embeddings(), atol=2e-5)
    assert not out.with_name(out.name + ".partial").exists()


def test_a_resumed_build_encodes_a_file_that_changed_since_it_was_killed(retriever, tmp_path):
    folder = _folder(tmp_path / "folder", COLOURS[:4])
    original, _ = _build(retriever, folder, tmp_path / "original")
    out = tmp_path / "index"
    _killed_build(tmp_path, retriever, "chunks:2", out, folder, out)
    chunks = out.with_name(out.name + ".partial").glob("chunk-??????.np*")
    assert len(list(chunks)) == 2
    (folder / "00.png").write_bytes(png((255, 255, 255)))  # a finished chunk's file changed
    os.utime(folder / "00.png", ns=(1, 1))  # an mtime that says nothing: the content does

    resumed, encoded = _build(retriever, folder, out)
    assert encoded == 3  # the changed file and the two chunks never written
    fresh, _ = _build(retriever, folder, tmp_path / "uninterrupted")
    assert resumed.ids == fresh.ids
    np.testing.assert_allclose(resumed.embeddings(), fresh.embeddings(), atol=2e-5)
    assert np.abs(resumed.embeddings()[0] - original.embeddings()[0]).max() > 1e-3
