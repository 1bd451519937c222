"""A user's mistakes on the command line end in one line and exit status 2 (the command line) or
1 (anything else), never a traceback, and before any model loads (issue 36, cases 6, 7, 10, 15);
`--help` shows the defaults; `metaembed configs NAME` prints the recipe.

Most commands run in this process (`main`: its return or SystemExit is the exit status the
console script exits with); the absl programs (train.py, `metaembed train`) and a few of the
others run as real processes."""

import argparse
import re
import shutil
import sys

import numpy as np
import pytest

from metaembed_jax.cli.main import HelpWithDefaults, build_parser
from metaembed_jax.retrieval.index import MultiVectorIndex
from metaembed_jax.retrieval.retriever import Retriever
from tests.helpers import exit_status, run_process, tiny_run_config
from tests.paths import REPO
from tests.trained_run import trained_lora_run


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """An untrained run (config.json, no checkpoint), an index of random vectors, a folder."""
    root = tmp_path_factory.mktemp("cli_errors")
    untrained = root / "untrained"
    untrained.mkdir()
    config = tiny_run_config(r_q=4, r_c=8)
    (untrained / "config.json").write_text(config.to_json_best_effort(indent=2))
    vectors = np.random.default_rng(0).normal(size=(3, 8, 16)).astype(np.float32)
    MultiVectorIndex.build(vectors, ids=["a", "b", "c"]).save(root / "index")
    (root / "folder").mkdir()
    (root / "queries.jsonl").write_text('{"id": 1, "text": "ok"}\nnot json\n')
    return {"root": root, "run": untrained, "index": root / "index", "folder": root / "folder"}


@pytest.fixture
def no_model(monkeypatch):
    """Every check here comes before the model: loading it fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(Retriever, "load", classmethod(refuse))


def _search(paths, *extra, index=None):
    index = paths["index"] if index is None else index
    return ["index", "search", "--index", str(index), "--run", str(paths["run"]), *extra]


def _build(paths, *extra, corpus=None, out=None):
    corpus = paths["folder"] if corpus is None else corpus
    out = paths["root"] / "new.index" if out is None else out
    argv = ["index", "build", "--run", str(paths["run"]), "--corpus", str(corpus)]
    return [*argv, "--out", str(out), *extra]


MISTAKES = {  # name: (argv given `paths`, exit status, the one line's message after "error: ")
    "existing_out": (
        lambda p: _build(p, out=p["index"]),
        1,
        r"index exists: pass --add to append to it, or choose another --out$",
    ),
    "missing_run": (
        lambda p: _build(p)[:2] + ["--run", str(p["root"] / "nope")] + _build(p)[4:],
        1,
        r"nope/config\.json does not exist: .*nope is not a training run directory",
    ),
    "no_checkpoint": (lambda p: _build(p), 1, r"^no checkpoints in .*untrained: train first"),
    "missing_corpus": (
        lambda p: _build(p, corpus=p["root"] / "nowhere"),
        1,
        r"corpus .*nowhere does not exist$",
    ),
    "budget_beyond_the_run": (
        lambda p: _search(p, "--query", "a", "--budget", "32x128"),
        1,
        r"budget \(32, 128\) is out of range: .* r_q must be in \[1, 4\] and r_c in \[1, 8\]",
    ),
    "budget_not_a_budget": (
        lambda p: _search(p, "--query", "a", "--budget", "32"),
        2,
        r"argument --budget: budget '32': expected R_QxR_C, e\.g\. 16x64$",
    ),
    "missing_queries_file": (
        lambda p: _search(p, "--queries-file", str(p["root"] / "q.txt")),
        1,
        r"--queries-file .*q\.txt does not exist$",
    ),
    "bad_queries_line": (
        lambda p: _search(p, "--queries-file", str(p["root"] / "queries.jsonl")),
        1,
        r"queries\.jsonl line 2 is not JSON \(",
    ),
    "empty_query": (
        lambda p: _search(p, "--query", ""),
        2,
        r"--query is empty: give the text to search for",
    ),
    "no_query": (lambda p: _search(p), 2, r"no query: give --query, --query-image or"),
    "k_zero": (lambda p: _search(p, "--query", "a", "--k", "0"), 2, r"--k must be at least 1"),
    "shortlist_without_coarse": (
        lambda p: _search(p, "--query", "a", "--shortlist", "5"),
        2,
        r"--shortlist is the size of the --coarse stage's shortlist: add --coarse$",
    ),
    "shortlist_below_k": (
        lambda p: _search(p, "--query", "a", "--coarse", "1x1", "--shortlist", "3", "--k", "5"),
        2,
        r"--shortlist 3 must be at least --k 5$",
    ),
    "collection_without_qdrant": (
        lambda p: _search(p, "--query", "a", "--collection", "c"),
        2,
        r"--collection goes with --qdrant, not --index$",
    ),
    "missing_index": (
        lambda p: _search(p, "--query", "a", index=p["root"] / "gone"),
        1,
        r"no index at '.*gone': manifest\.json not found$",
    ),
    "search_run_without_checkpoint": (
        lambda p: _search(p, "--query", "a"),
        1,
        r"^no checkpoints in .*untrained",
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_mistake_ends_in_one_line_before_the_model_loads(name, paths, no_model, capsys):
    argv, status, pattern = MISTAKES[name]
    assert exit_status(argv(paths)) == status
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 or status == 2, stderr  # argparse's usage lines come first
    assert "Traceback" not in stderr
    command = "metaembed index " + argv(paths)[1]
    prefix = f"{command}: error: "
    assert lines[-1].startswith(prefix), stderr
    assert re.search(pattern, lines[-1][len(prefix) :]), lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_lora_run(tmp_path_factory)


def test_export_refuses_to_write_over_a_run_or_an_index(trained, paths, tmp_path, capsys):
    """`export --out RUN` wrote the transformers config.json over the run's own (case 10): an
    output that is or lies inside a run or an index, or is a non-empty directory, is refused."""
    run = shutil.copytree(trained, tmp_path / "run")
    saved = (run / "config.json").read_bytes()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    cases = {
        run: f"--out {run} is a training run directory",
        run / "exported": f"--out {run / 'exported'} is inside {run}, a training run directory",
        paths["index"]: f"--out {paths['index']} is an index directory",
        tmp_path / "full": f"--out {tmp_path / 'full'} exists and is not empty: pass --force",
    }
    for out, message in cases.items():
        assert exit_status(["export", "--run", str(run), "--out", str(out)]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"metaembed export: error: {message}"), line
    assert (run / "config.json").read_bytes() == saved
    assert not (run / "exported").exists()
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


# Options whose None default stands for a value the command picks: their help says which.
PICKED_DEFAULTS = ("--step", "--batch-size", "--budget", "--k", "--shortlist", "--skip-bad")


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_help_shows_the_defaults():
    """Each option with a default says it in its --help line (case 7: the full budget, k 10 and
    bfloat16 were missing)."""
    formatter = HelpWithDefaults("metaembed")
    checked = 0
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue
            named = action.option_strings[0] in PICKED_DEFAULTS
            shown = named or action.default not in (None, False, [])
            if shown:
                text = formatter._get_help_string(action) % {"default": action.default}
                assert "default" in text, (parser.prog, action.option_strings, text)
                checked += 1
    assert checked >= 14
    helps = {p.prog: " ".join(p.format_help().split()) for p in _parsers(build_parser())}
    assert "(default: bfloat16)" in helps["metaembed index build"]
    search = helps["metaembed index search"]
    assert "(default: 10;" in search and "(default: the full trained budget)" in search


def test_configs_prints_the_recipe_and_with_path_its_path(capsys):
    assert exit_status(["configs", "demo"]) == 0
    assert capsys.readouterr().out == (REPO / "configs" / "demo.py").read_text()
    assert exit_status(["configs", "demo", "--path"]) == 0
    assert capsys.readouterr().out == f"{REPO / 'configs' / 'demo.py'}\n"
    assert exit_status(["configs", "no_such_recipe"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("metaembed configs: error: ")


# ----------------------------------------------------------------------------- real processes


def _stderr_lines(done) -> list[str]:
    return done.stderr.strip().splitlines()


def test_index_search_of_a_missing_index_as_a_process_exits_1_with_one_line(paths):
    """`metaembed index search --index <missing>` ended in a traceback (case 15); the exit
    status 2 of a command-line mistake is checked in this process above."""
    missing = paths["root"] / "gone"
    argv = ["index", "search", "--run", str(paths["run"]), "--index", str(missing), "--query", "a"]
    done = run_process([sys.executable, "-m", "metaembed_jax", *argv], cwd=paths["root"])
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = _stderr_lines(done)
    prefix = "metaembed index search: error: "
    assert line == f"{prefix}no index at '{missing}': manifest.json not found"


def test_a_misspelt_config_override_is_one_line_and_exit_2(tmp_path):
    """`train.py --config.train.stepz=5` printed three tracebacks before "Did you mean"."""
    command = [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs/demo.py'}"]
    command += [f"--workdir={tmp_path / 'run'}", "--config.train.stepz=5"]
    done = run_process(command, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = _stderr_lines(done)
    assert line.startswith(f"{REPO / 'train.py'}: error: --config.train.stepz=5: no such config")
    assert 'Did you mean "steps"' in line
    assert not (tmp_path / "run").exists()


def test_train_help_lists_the_programs_flags(tmp_path):
    """`metaembed train --help` printed only "Try --helpfull"."""
    done = run_process([sys.executable, "-m", "metaembed_jax", "train", "--help"], cwd=tmp_path)
    text = done.stdout + done.stderr  # (absl's --help exits 1)
    assert "--config: Training recipe" in text and "--workdir: Directory of metrics" in text
