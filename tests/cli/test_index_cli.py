"""`metaembed index build | search` on the tiny trained run and real files (issue 36): a folder
with bad files indexes the rest and names each skipped file (stderr and manifest), or stops at
the first one naming it; `--json` results carry the query's id / text / image path in UTF-8;
`--k` beyond the index says so; an index knows the model that built it and refuses another run,
or the same run at another step, unless `--allow-other-model`; an unfinished run says so.

The commands run in this process (`main`, whose return or SystemExit is the exit status) with
`Retriever.load` cached per run and step, so each model loads once for the module; the last
test runs the command as a real process."""

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

from metaembed_jax.formats.trained import find_step
from metaembed_jax.retrieval.index import MultiVectorIndex
from metaembed_jax.retrieval.retriever import Retriever
from tests.corpus_files import png, real_folder, truncated_png
from tests.helpers import exit_status, run_process
from tests.trained_run import trained_lora_run

_LOADED: dict = {}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_lora_run(tmp_path_factory)


@pytest.fixture
def cli(monkeypatch):
    """`exit_status`, with each run / step's model loaded once for the module."""
    original = Retriever.load.__func__

    def load(cls, run_dir, step=None, **kwargs):
        key = (Path(run_dir).resolve(), find_step(Path(run_dir), step))
        if key not in _LOADED:
            _LOADED[key] = original(cls, run_dir, key[1], batch_size=8)
        return _LOADED[key]

    monkeypatch.setattr(Retriever, "load", classmethod(load))
    return exit_status


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small") / "pages"
    folder.mkdir()
    for name, colour in (("a.png", (220, 30, 30)), ("b.png", (30, 200, 40))):
        (folder / name).write_bytes(png(colour))
    (folder / "c.png").write_bytes(png((20, 40, 230), size=(120, 40)))
    return folder


def _build(cli, run, corpus, out, *extra):
    argv = ["index", "build", "--run", str(run), "--corpus", str(corpus), "--out", str(out)]
    return cli([*argv, "--no-progress", *extra])


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def test_a_folder_with_bad_files_indexes_the_rest_naming_each(cli, run, tmp_path, capsys):
    expected = real_folder(tmp_path / "folder")
    out = tmp_path / "index"
    assert _build(cli, run, tmp_path / "folder", out) == 0
    captured = capsys.readouterr()
    index = MultiVectorIndex.load(out)
    assert index.ids == expected["good"]
    skipped = index.metadata["skipped"]
    assert [row["id"] for row in skipped] == expected["bad"]
    for row in skipped:
        assert row["error"].startswith(f"{row['id']}: cannot ")
    lines = captured.err.splitlines()
    assert f"skipped 3 files that could not be read (listed in {out}/manifest.json):" in lines
    assert [line.strip() for line in lines[-3:]] == [row["error"] for row in skipped]
    assert f"{out}: 6 items" in captured.out
    assert "Traceback" not in captured.err


def test_no_skip_bad_stops_at_the_first_bad_file_naming_it(cli, run, tmp_path, capsys):
    real_folder(tmp_path / "folder")
    out = tmp_path / "index"
    assert _build(cli, run, tmp_path / "folder", out, "--no-skip-bad") == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith("metaembed index build: error: broken.png: cannot decode the image")
    assert "truncated" in line and not out.exists()


def test_a_jsonl_corpus_stops_at_a_bad_image_by_default(cli, run, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(truncated_png())
    corpus = tmp_path / "items.jsonl"
    rows = [{"id": "t1", "text": "a red cube"}, {"id": "i1", "text": "", "image": "bad.png"}]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert _build(cli, run, corpus, tmp_path / "index") == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "items.jsonl line 2 (bad.png): cannot decode the image" in line
    assert _build(cli, run, corpus, tmp_path / "index", "--skip-bad") == 0
    assert MultiVectorIndex.load(tmp_path / "index").ids == ["t1"]


def _search(cli, run, index, *extra):
    return cli(["index", "search", "--index", str(index), "--run", str(run), *extra])


def test_json_results_carry_the_query_id_text_and_image(cli, run, small_folder, tmp_path, capsys):
    out = tmp_path / "index"
    assert _build(cli, run, small_folder, out, "--dtype", "float32") == 0
    shutil.copy(small_folder / "a.png", tmp_path / "query.png")
    queries = tmp_path / "queries.jsonl"
    rows = [{"id": "requête-1", "text": "une image rouge"}, {"id": 7, "image": "query.png"}]
    queries.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    capsys.readouterr()
    assert _search(cli, run, out, "--queries-file", str(queries), "--json", "--k", "2") == 0
    text = capsys.readouterr().out
    assert '"query_id": "requête-1"' in text  # UTF-8, not \u escapes
    first, second = (json.loads(line) for line in text.splitlines())
    assert (first["query_id"], first["text"], first["image"]) == (
        "requête-1",
        rows[0]["text"],
        None,
    )
    assert (second["query_id"], second["text"], second["image"]) == (7, "", "query.png")
    assert len(first["results"]) == 2 and {"id", "score"} == set(first["results"][0])

    # The image query matches the hits of the same item given through the Python API.
    retriever = Retriever.load(run, batch_size=8)
    want = retriever.search([{"image": small_folder / "a.png"}], MultiVectorIndex.load(out), k=2)
    assert [hit["id"] for hit in second["results"]] == [doc_id for doc_id, _ in want[0]]

    image = str(tmp_path / "query.png")
    assert _search(cli, run, out, "--query-image", image, "--json", "--k", "1") == 0
    (row,) = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (row["query_id"], row["text"], row["image"]) == (None, "", image)


def test_k_beyond_the_index_returns_every_item_with_a_note(
    cli, run, small_folder, tmp_path, capsys
):
    out = tmp_path / "index"
    assert _build(cli, run, small_folder, out) == 0
    capsys.readouterr()
    assert _search(cli, run, out, "--query", "a red page", "--k", "50") == 0
    captured = capsys.readouterr()
    assert "note: --k 50 is more than the index's 3 items: all are returned" in captured.err
    assert len([line for line in captured.out.splitlines() if line.startswith("    ")]) == 3
    assert _search(cli, run, out, "--query", "a red page") == 0  # the default 10: no note
    assert "note:" not in capsys.readouterr().err


def test_an_index_refuses_a_model_that_did_not_build_it(
    cli, run, small_folder, tmp_path, capsys, caplog
):
    """Built by the run's step 2: searched with its step 1 (case 14) or with another run (a
    copy stopped at step 1, case 4) it is refused naming both; `--allow-other-model` answers
    with a warning; a moved copy of the run at step 2 is the same model; `--add` refuses too."""
    out = tmp_path / "index"
    assert _build(cli, run, small_folder, out) == 0
    record = MultiVectorIndex.load(out).metadata["model"]
    assert (record["run"], record["step"]) == (str(run.resolve()), 2)
    assert record["trained_sizes"] == [4, 8] and record["pixel_budget"] == 56 * 56
    assert len(record["params_sha256"]) == len(record["processor_sha256"]) == 64
    capsys.readouterr()

    assert _search(cli, run, out, "--query", "a red page", "--step", "1") == 1
    (line,) = _error_lines(capsys.readouterr().err)
    built, asked = f"run {run.resolve()} step 2", f"run {run.resolve()} step 1"
    assert f"index {out} was built by {built}, not by {asked} (they differ in: parameters)" in line
    assert line.endswith("--allow-other-model (allow_other_model=True) to search it anyway")

    other = shutil.copytree(run, tmp_path / "other")
    shutil.rmtree(other / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING):
        assert _search(cli, other, out, "--query", "a red page") == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"not by run {other.resolve()} step 1" in line
    assert "has not finished training: its newest checkpoint is step 1 of train.steps=2" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _search(cli, other, out, "--query", "a red page", "--allow-other-model") == 0
    assert "going on as asked (--allow-other-model)" in caplog.text
    assert "  1. " in capsys.readouterr().out
    assert _build(cli, other, small_folder, out, "--add") == 1
    assert "to add to it anyway" in _error_lines(capsys.readouterr().err)[0]

    moved = shutil.copytree(run, tmp_path / "moved")
    assert _search(cli, moved, out, "--query", "a red page") == 0


@pytest.mark.slow
def test_index_build_as_a_process_announces_the_model_and_warns_once(run, small_folder, tmp_path):
    """A real `metaembed index build` where PyTorch is not installed (hidden from the process):
    transformers' "PyTorch was not found" advice comes once, a line says the model is loading
    (before the 25-55 s of loading and compiling a real model), the index is written."""
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if PyTorch were not installed\n"
        "from metaembed_jax.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "index"
    argv = ["index", "build", "--run", str(run), "--corpus", str(small_folder), "--out", str(out)]
    done = run_process([sys.executable, "-c", script, *argv, "--batch-size", "8"])
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert sum("PyTorch was not found" in line for line in lines) == 1, done.stderr
    loading = [line for line in lines if line.startswith("loading the model of")]
    assert loading == [f"loading the model of {run} (step 2); the first batch compiles it ..."]
    assert "Traceback" not in done.stderr
    assert MultiVectorIndex.load(out).ids == ["a.png", "b.png", "c.png"]
