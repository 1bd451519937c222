"""QdrantIndex against MultiVectorIndex (the peer here is our own index, and a float64 numpy
MaxSim): on Qdrant's embedded engine in a temp directory, the same ids and scores at every
stored budget, two-stage equal to ours, int8 + rescore equal to the float32 top-10, ids of every
kind round-trip, a reopened collection answers the same, unstored prefixes and bad queries raise
as ours do, `add` equals one push, a push killed with SIGKILL never opens as complete and a new
push completes; qdrant-client's local mode (what a server receives); the CLI; the snippets of
docs/serving.md as written; the benchmark's --smoke run."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import zlib

import numpy as np
import pytest

from metaembed_jax.cli import index_commands
from metaembed_jax.cli import main as commands
from metaembed_jax.retrieval.index import MultiVectorIndex
from metaembed_jax.retrieval.qdrant import QdrantIndex
from metaembed_jax.retrieval.retriever import Retriever
from tests.helpers import tiny_run_config
from tests.paths import REPO

ROOT = REPO
BUDGETS = [(1, 1), (8, 1), (4, 4), (16, 16), (16, 64)]
IDS = [f"döc-{i}-✓" if i % 3 else i for i in range(203)]  # ints, strs, unicode


def unit(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def exact_scores(queries, candidates, budget, query_mask=None):
    """float64 MaxSim [Nq, Nc] at budget (masked query vectors add 0)."""
    r_q, r_c = budget
    sims = np.einsum(
        "qid,cjd->qcij", queries[:, :r_q].astype(np.float64), candidates[:, :r_c].astype(np.float64)
    ).max(-1)
    if query_mask is not None:
        sims = sims * query_mask[:, None, :r_q]
    return sims.sum(-1)


def assert_same_results(got, want, exact, ids, atol=1e-4):
    """Scores equal within atol; ids equal up to ties: each returned id's exact score is the
    score expected at its rank."""
    np.testing.assert_allclose(got[0], want[0], atol=atol)
    position = {candidate_id: p for p, candidate_id in enumerate(ids)}
    got_positions = np.array([[position[i] for i in row] for row in got[1]])
    np.testing.assert_allclose(np.take_along_axis(exact, got_positions, axis=1), want[0], atol=atol)
    differing = got[1] != want[1]
    if differing.any():  # only where neighbours tie
        assert np.allclose(np.diff(want[0], axis=1), 0, atol=atol).any()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    queries, candidates = unit(rng, (5, 16, 32)), unit(rng, (203, 64, 32))
    candidates[150:153] = candidates[10]  # exact duplicates: tied scores
    return queries, candidates


@pytest.fixture(scope="module")
def float32_pair(data, tmp_path_factory):
    ours = MultiVectorIndex.build(data[1], ids=IDS, dtype="float32")
    path = tmp_path_factory.mktemp("qdrant")
    theirs = QdrantIndex.from_index(ours, path, collection="f32", progress=False)
    return ours, theirs, path


@pytest.mark.parametrize("budget", BUDGETS)
def test_search_equals_multivectorindex_float32(data, float32_pair, budget):
    queries, candidates = data
    ours, theirs, _ = float32_pair
    exact = exact_scores(queries, candidates, budget)
    assert_same_results(
        theirs.search(queries, budget, k=12), ours.search(queries, budget, k=12), exact, IDS
    )


def test_masked_query_vectors_are_not_sent(data, float32_pair):
    queries, candidates = data
    ours, theirs, _ = float32_pair
    mask = np.ones(queries.shape[:2], bool)
    mask[0, 1:] = False
    mask[1, ::2] = False
    mask[2, :8] = False  # (8, 1): nothing left of query 2, every score 0
    for budget in [(16, 64), (8, 1)]:
        got = theirs.search(queries, budget, k=7, query_mask=mask)
        want = ours.search(queries, budget, k=7, query_mask=mask)
        exact = exact_scores(queries, candidates, budget, mask)
        if budget == (8, 1):  # all tied at 0: compare the other queries
            np.testing.assert_allclose(got[0][2], 0, atol=1e-6)
            got, want, exact = [tuple(a[[0, 1, 3, 4]] for a in r) for r in (got, want)] + [
                exact[[0, 1, 3, 4]]
            ]
        assert_same_results(got, want, exact, IDS)


def test_two_stage_is_a_prefetch_equal_to_ours(data, float32_pair):
    queries, candidates = data
    ours, theirs, _ = float32_pair
    exact = exact_scores(queries, candidates, (16, 64))
    for coarse, shortlist in [((1, 1), 30), ((4, 4), 60), ((2, 1), 203)]:
        options = {"coarse_budget": coarse, "shortlist": shortlist}
        got = theirs.search(queries, (16, 64), k=10, **options)
        assert_same_results(got, ours.search(queries, (16, 64), k=10, **options), exact, IDS)
    # A short list really restricts: the (1, 1) shortlist of 12 misses exhaustive results.
    short = theirs.search(queries, (16, 64), k=10, coarse_budget=(1, 1), shortlist=12)
    assert (short[1] != theirs.search(queries, (16, 64), k=10)[1]).any()


def test_int8_rescore_returns_the_float32_top_10(data, float32_pair, tmp_path):
    queries, candidates = data
    ours_float32, _, _ = float32_pair
    int8 = MultiVectorIndex.build(candidates, ids=IDS, dtype="int8", full_precision=True)
    theirs = QdrantIndex.from_index(int8, tmp_path, collection="int8", progress=False)
    for budget in [(16, 64), (8, 1), (4, 4)]:
        want = ours_float32.search(queries, budget, k=10)
        rescored = theirs.search(queries, budget, k=10, rescore=50)
        assert_same_results(rescored, want, exact_scores(queries, candidates, budget), IDS)
        # Without rescore the scores are Qdrant's int8 ones: close, not float32.
        quantized = theirs.search(queries, budget, k=10)
        assert 1e-4 < np.abs(quantized[0] - want[0]).max() < 0.1
    with pytest.raises(ValueError, match="rescore must be an int >= k=10"):
        theirs.search(queries, (16, 64), k=10, rescore=5)
    theirs.close()


def test_bfloat16_is_stored_as_float16_and_multiplied_in_float16(data, tmp_path):
    """The bfloat16 values are exact in float16; Qdrant rounds the sent query vectors to
    float16 (as a bfloat16 MultiVectorIndex rounds them to bfloat16)."""
    queries, candidates = data
    ours = MultiVectorIndex.build(candidates, dtype="bfloat16")
    theirs = QdrantIndex.from_index(ours, tmp_path, collection="bf16", progress=False)
    stored = ours.embeddings()
    half = queries.astype(np.float16).astype(np.float64)
    summed = queries[:, :4].astype(np.float64).sum(1).astype(np.float16).astype(np.float64)
    references = {
        (16, 64): exact_scores(half, stored, (16, 64)),
        (4, 1): summed @ stored[:, 0].astype(np.float64).T,  # one dot with the sent sum
    }
    for budget, exact in references.items():
        scores, ids = theirs.search(queries, budget, k=10)
        np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, axis=1), atol=1e-5)
        np.testing.assert_allclose(scores, -np.sort(-exact, axis=1)[:, :10], atol=1e-5)
    theirs.close()


def test_ids_round_trip_and_a_reopened_collection_answers_the_same(data, float32_pair):
    queries, _ = data
    _, theirs, path = float32_pair
    before = theirs.search(queries, (4, 16), k=20)
    returned = {i for row in before[1] for i in row}
    assert any(isinstance(i, str) and "✓" in i for i in returned)
    assert any(isinstance(i, int) for i in returned) and before[1].dtype == object
    theirs.close()
    reopened = QdrantIndex(path=path, collection="f32")
    assert (len(reopened), reopened.prefixes, reopened.dtype) == (203, (1, 4, 16, 64), "float32")
    after = reopened.search(queries, (4, 16), k=20)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    int_ids = MultiVectorIndex.build(data[1][:20], ids=list(range(100, 120)), dtype="float32")
    pushed = QdrantIndex.from_index(
        int_ids, path, collection="ints", prefixes=(64,), progress=False
    )
    assert pushed.search(queries, (2, 64), k=3)[1].dtype == np.int64
    pushed.close()


def test_errors_match_multivectorindex(data, float32_pair, tmp_path):
    queries, _ = data
    ours, theirs, path = float32_pair
    for call, message in [
        (lambda i: i.search(queries, (1, 1), k=204), r"k must be an int in \[1, 203\]"),
        (lambda i: i.search(queries[..., :8], (1, 1)), r"D=32.*\(5, 16, 8\)"),
        (lambda i: i.search(queries, (16, 65)), r"budget \(16, 65\) is out of range"),
        (
            lambda i: i.search(queries, (1, 1), k=10, coarse_budget=(1, 1), shortlist=5),
            "shortlist must be >= k",
        ),
        (
            lambda i: i.search(np.where(queries > 0.3, np.nan, queries), (1, 1)),
            "query 0 contains NaN",
        ),
        (lambda i: i.search(queries, (1, 1), query_mask=np.ones((5, 3))), "query_mask must"),
        (lambda i: i.search(queries, (1, 1), rescore=20), "rescore needs the float32 copy"),
        (lambda i: i.add(data[1][:2, :8]), r"expected embeddings \[n, 64, 32\]"),
        (lambda i: i.add(data[1][:2], ids=["döc-1-✓", "new"]), "duplicate id 'döc-1-✓'"),
    ]:
        for index in (ours, theirs):
            with pytest.raises(ValueError, match=message):
                call(index)
    with pytest.raises(ValueError, match=r"r_c=8 is not stored.*\(1, 4, 16, 64\)"):
        theirs.search(queries, (4, 8))
    with pytest.raises(ValueError, match=r"r_c=2 is not stored"):
        theirs.search(queries, (4, 16), coarse_budget=(1, 2))
    with pytest.raises(ValueError, match="exists: pass overwrite=True"):
        QdrantIndex.from_index(ours, path, collection="f32", progress=False)
    with pytest.raises(ValueError, match=r"prefixes must be in \[1, 64\]"):
        QdrantIndex.from_index(ours, tmp_path, collection="x", prefixes=(1, 128))
    with pytest.raises(FileNotFoundError, match="no Qdrant collection 'nothing'"):
        QdrantIndex(path=tmp_path, collection="nothing")
    with pytest.raises(ValueError, match="exactly one of path="):
        QdrantIndex(path=tmp_path, url="http://localhost:6333", collection="x")


def test_add_equals_one_push(data, tmp_path):
    queries, candidates = data
    whole = MultiVectorIndex.build(candidates, ids=IDS, dtype="float32")
    part = MultiVectorIndex.build(candidates[:120], ids=IDS[:120], dtype="float32")
    theirs = QdrantIndex.from_index(
        part, tmp_path, collection="c", prefixes=(1, 16, 64), progress=False
    )
    theirs.add(candidates[120:], ids=IDS[120:])
    assert len(theirs) == 203
    for budget in [(16, 64), (3, 1)]:
        assert_same_results(
            theirs.search(queries, budget, k=9),
            whole.search(queries, budget, k=9),
            exact_scores(queries, candidates, budget),
            IDS,
        )
    theirs.close()


_STOPPED_PUSH = """
import sys, time
import numpy as np
from metaembed_jax.retrieval import _qdrant_engines
from metaembed_jax.retrieval.index import MultiVectorIndex
from metaembed_jax.retrieval.qdrant import QdrantIndex
real, calls = _qdrant_engines.EdgeEngine.upsert, []
def upsert_then_stall(self, points):  # hold still after the 4th batch, to be killed there
    real(self, points)
    calls.append(len(points))
    if len(calls) == 4:
        print("mid-push", flush=True)
        time.sleep(600)
_qdrant_engines.EdgeEngine.upsert = upsert_then_stall
index = MultiVectorIndex.load(sys.argv[1])
QdrantIndex.from_index(index, sys.argv[2], collection="c", batch_size=40, progress=False)
"""


def test_a_push_killed_with_sigkill_never_opens_and_a_new_push_completes(data, tmp_path):
    queries, candidates = data
    ours = MultiVectorIndex.build(candidates, ids=IDS, dtype="float32")
    ours.save(tmp_path / "index")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_PUSH, str(tmp_path / "index"), str(tmp_path / "q")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout.readline().strip() == "mid-push"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    with pytest.raises(ValueError, match="push the index again"):
        QdrantIndex(path=tmp_path / "q", collection="c")
    again = QdrantIndex.from_index(ours, tmp_path / "q", collection="c", progress=False)
    assert len(again) == 203
    assert_same_results(
        again.search(queries, (16, 64), k=10),
        ours.search(queries, (16, 64), k=10),
        exact_scores(queries, candidates, (16, 64)),
        IDS,
    )
    again.close()


def test_qdrant_client_local_mode_equals_ours(data):
    from qdrant_client import QdrantClient

    queries, candidates = data
    ours = MultiVectorIndex.build(candidates[:60], ids=IDS[:60], dtype="float32")
    client = QdrantClient(location=":memory:")
    theirs = QdrantIndex.from_index(
        ours,
        client=client,
        collection="c",
        prefixes=(1, 4, 64),
        shard_number=2,
        replication_factor=1,
        progress=False,
    )
    reopened = QdrantIndex(client=client, collection="c")
    for budget, options in [
        ((16, 64), {}),
        ((4, 1), {}),
        ((16, 64), {"coarse_budget": (1, 1), "shortlist": 20}),
    ]:
        exact = exact_scores(queries, candidates[:60], budget)
        assert_same_results(
            reopened.search(queries, budget, k=8, **options),
            ours.search(queries, budget, k=8, **options),
            exact,
            IDS,
        )
    theirs.add(candidates[60:70], ids=IDS[60:70])
    assert len(QdrantIndex(client=client, collection="c")) == 70
    client.close()


def test_without_the_qdrant_packages_the_package_imports_and_says_how_to_install(
    monkeypatch, tmp_path
):
    import metaembed_jax

    monkeypatch.setitem(sys.modules, "qdrant_edge", None)  # import qdrant_edge now fails
    monkeypatch.setitem(sys.modules, "qdrant_client", None)
    assert metaembed_jax.QdrantIndex is QdrantIndex
    for where in ({"path": tmp_path}, {"url": "http://localhost:6333"}):
        with pytest.raises(ImportError, match=re.escape('pip install "metaembed-jax[qdrant]"')):
            QdrantIndex(**where, collection="c")


# ----------------------------------------------------------------------------- CLI and docs


class HashEncoder:
    """Stands in for a trained encoder: unit vectors seeded by each item's text."""

    num_vectors = {"query": 16, "candidate": 64}

    def __call__(self, items, side):
        rows = []
        for item in items:
            seed = zlib.crc32(f"{side}:{item['text']}".encode())
            rows.append(unit(np.random.default_rng(seed), (self.num_vectors[side], 32)))
        return np.stack(rows)


@pytest.fixture
def stub_run(monkeypatch):
    """`Retriever.load(anything)` returns a retriever of `HashEncoder`; `index search` reads a
    run config of its sizes (R_q = 16, R_c = 64) and finds its step 0."""
    monkeypatch.setattr(
        Retriever, "load", classmethod(lambda cls, *a, **k: cls(HashEncoder(), None))
    )
    config = tiny_run_config(r_q=HashEncoder.num_vectors["query"], r_c=64)
    monkeypatch.setattr(index_commands, "read_saved_config", lambda run: config)
    monkeypatch.setattr(index_commands, "find_step", lambda run, step: 0)


@pytest.fixture
def local_server(monkeypatch):
    """``QdrantClient(url=...)`` is qdrant-client's local mode, one in-memory store per URL:
    the snippets written for a server run as written, against what a server would receive."""
    import qdrant_client

    real, servers = qdrant_client.QdrantClient, {}

    def client(url=None, **kwargs):
        if url not in servers:
            servers[url] = real(location=":memory:")
            servers[url].close = lambda **_: None  # shared by every client of that URL
        return servers[url]

    monkeypatch.setattr(qdrant_client, "QdrantClient", client)
    return servers


def _cli_json(capsys, argv):
    assert commands.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_cli_push_then_search_equals_index_search(data, tmp_path, capsys, stub_run):
    _, candidates = data
    MultiVectorIndex.build(candidates, ids=IDS, dtype="float32").save(tmp_path / "index")
    assert (
        commands.main(
            [
                "index",
                "push",
                "--index",
                str(tmp_path / "index"),
                "--qdrant",
                str(tmp_path / "q"),
                "--collection",
                "docs",
                "--prefixes",
                "1,16,64",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "203 items, prefixes 1,16,64" in capsys.readouterr().out
    query = ["--run", "any", "--query", "a red cube", "--query", "two spheres", "--json"]
    for budget in (
        ["--budget", "16x64"],
        ["--budget", "4x1"],
        ["--budget", "16x64", "--coarse", "1x1", "--shortlist", "40"],
    ):
        want = _cli_json(
            capsys, ["index", "search", "--index", str(tmp_path / "index"), *query, *budget]
        )
        got = _cli_json(
            capsys,
            [
                "index",
                "search",
                "--qdrant",
                str(tmp_path / "q"),
                "--collection",
                "docs",
                *query,
                *budget,
            ],
        )
        for g, w in zip(got, want, strict=True):
            assert [r["id"] for r in g["results"]] == [r["id"] for r in w["results"]]
            np.testing.assert_allclose(
                [r["score"] for r in g["results"]], [r["score"] for r in w["results"]], atol=1e-4
            )
    with pytest.raises(SystemExit):  # --index and --qdrant exclude each other
        commands.main(["index", "search", "--index", "i", "--qdrant", "q", *query])
    capsys.readouterr()
    with pytest.raises(SystemExit, match="^2$"):  # a command-line mistake: one line, exit 2
        commands.main(["index", "search", "--qdrant", str(tmp_path / "q"), *query])
    assert "error: --qdrant needs --collection NAME" in capsys.readouterr().err


def test_a_pushed_collection_keeps_the_model_that_built_its_index(data, tmp_path):
    """The collection carries the index's model record, so that `index search --qdrant`
    refuses another model as `--index` does (issue 36, case 4)."""
    from metaembed_jax.retrieval.provenance import OtherModelError, check_same_model

    _, candidates = data
    index = MultiVectorIndex.build(candidates[:20], ids=IDS[:20], dtype="float32")
    record = {"run": "/runs/a", "step": 2, "params_sha256": "1" * 64, "processor_sha256": "2"}
    index.metadata["model"] = {**record, "trained_sizes": [16, 64]}
    QdrantIndex.from_index(index, tmp_path, collection="c", progress=False).close()
    pushed = QdrantIndex(tmp_path, collection="c")
    assert pushed.metadata["model"] == index.metadata["model"]
    other = {**index.metadata["model"], "step": 1, "params_sha256": "3" * 64}
    with pytest.raises(OtherModelError, match=r"built by run /runs/a step 2, not by run"):
        check_same_model(pushed.metadata.get("model"), other, what=pushed.path)
    pushed.close()


def _fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_docs_serving_snippets_run_as_written(
    data, tmp_path, monkeypatch, capsys, stub_run, local_server
):
    """docs/serving.md: every ```python block is executed in order in one namespace, every
    ```bash block's commands run through `metaembed`'s main, in a directory holding the index
    `my.index` that the page assumes (and with `Retriever.load` stubbed, `url=` on local mode).
    ```console blocks (starting a server with docker or its binary) are not run here."""
    _, candidates = data
    MultiVectorIndex.build(candidates, ids=IDS, dtype="float32").save(tmp_path / "my.index")
    monkeypatch.chdir(tmp_path)
    page = (ROOT / "docs" / "serving.md").read_text()
    python, shell = _fenced_blocks(page, "python"), _fenced_blocks(page, "bash")
    assert python and shell
    for block in shell:
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip() and not command.startswith("#"):
                argv = shlex.split(command)
                assert argv[0] == "metaembed", command
                assert commands.main(argv[1:]) == 0, command
    namespace: dict = {}
    for block in python:
        exec(compile(block, "docs/serving.md", "exec"), namespace)  # noqa: S102
    capsys.readouterr()
    assert len(namespace["hits"]) == 1 and len(namespace["hits"][0]) == 10
    ours = MultiVectorIndex.load(tmp_path / "my.index")
    want = ours.search(namespace["queries"], (16, 64), k=10)
    np.testing.assert_array_equal(namespace["ids"], want[1])  # the server snippet's search
    np.testing.assert_allclose(namespace["scores"], want[0], atol=1e-4)


def test_benchmark_smoke_run(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_qdrant.py"),
            "--smoke",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "load average" in result.stdout and "recall@10" in result.stdout
    # Exhaustive float32 on both engines is exact MaxSim: recall 1.
    assert re.search(r"exhaustive float32 .* 1\.000 .* 1\.000", result.stdout), result.stdout
