"""Every script in benchmarks/ runs end to end at its smallest size (`--smoke`), as a real
subprocess, so that none rots unseen.

The assertions read each script's own output: its tables, numbers in them, the ratio against
its peer, and the load average at start and end. The peers of requirements-bench.txt
(colpali-engine, PyLate) are optional in the test environment: where one is absent the script
still runs our side and says "peer not installed", and the test checks exactly that, with our
side's figures. The four slowest (they train or compile the most) are marked slow.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.paths import REPO

BENCHMARKS = REPO / "benchmarks"
# Modules the scripts import, not scripts themselves.
HELPERS = {"machine_load", "demo_smoke", "scoring_peers"}
LOAD = re.compile(r"load average [\d.]+ / [\d.]+ / [\d.]+ \(1 / 5 / 15 min\) on \d+ cores")
NUM = r"\d+(?:\.\d+)?(?:e[+-]\d+)?"
NOT_INSTALLED = "peer not installed"
# bench_scoring.py's peers, by their import names.
SCORING_PEERS = {
    name: importlib.util.find_spec(name) is not None for name in ("colpali_engine", "pylate")
}


def run_smoke(script: str, *args: str, timeout: float = 900) -> str:
    """stdout of `benchmarks/<script>.py --smoke *args`; fails unless it exits 0 and prints the
    machine's load at start and at end."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert len(LOAD.findall(done.stdout)) >= 2, done.stdout
    return done.stdout


def numbers(pattern: str, text: str) -> list[tuple[str, ...]]:
    """Every match of `pattern` (its groups), failing the test when there is none."""
    found = re.findall(pattern, text, flags=re.MULTILINE)
    assert found, f"no line matches {pattern!r} in:\n{text}"
    return [group if isinstance(group, tuple) else (group,) for group in found]


def table(text: str, header: str) -> list[list[str]]:
    """The rows (their cells) of the markdown table in `text` whose header row starts with
    `header`, failing the test when it has none."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert starts, f"no table headed {header!r} in:\n{text}"
    rows = []
    for line in lines[starts[0] + 2 :]:  # after the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert rows, f"table {header!r} has no rows in:\n{text}"
    return rows


def number(cell: str) -> float:
    """A figure cell as a float ("1.23", "4.5x", "12%", "1.0e-07"); fails on anything else."""
    assert re.fullmatch(rf"{NUM}[x%]?", cell), cell
    return float(cell.rstrip("x%"))


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {path.stem for path in BENCHMARKS.glob("*.py")} - HELPERS
    untested = sorted(name for name in scripts if f"test_{name}" not in globals())
    assert not untested, f"benchmarks without a smoke test here: {untested}"


def test_bench_attention():
    rows = table(run_smoke("bench_attention"), "| attention | s per call | torch / it |")
    assert [row[0] for row in rows][-1] == "torch SDPA (bool mask)"
    assert rows[-1][2] == "1.00x"
    for name, seconds, ratio, diff in rows:
        number(seconds), number(ratio)
        assert number(diff) < 1e-4, name  # the same attention as the one-block reference


@pytest.mark.slow  # one of this file's slowest: many compiles
def test_bench_encoder():
    out = run_smoke("bench_encoder")
    diffs = numbers(rf"max abs diff of last hidden states JAX vs torch: ({NUM})", out)
    assert len(diffs) == 3 and all(float(d) < 1e-4 for (d,) in diffs)  # Qwen, PaliGemma, Mllama
    parts = table(out, "| part | transformers (PyTorch), s | JAX jitted, s | JAX speed-up |")
    assert [row[0] for row in parts] == [
        "forward", "vision", "decoder", "paligemma forward", "mllama forward",
    ]  # fmt: skip
    assert all(number(row[3]) > 0 for row in parts)
    images = table(out, "| attention | 1 image, s | 2 images packed, s |")
    assert [row[0] for row in images] == ["per image", "packed, no bound"]
    assert all(number(row[3]) > 0 for row in images)
    compiles = table(out, "| layers (decoder = vision depth) | compile time")
    assert [row[0] for row in compiles] == ["2", "4"] and all(number(r[1]) > 0 for r in compiles)


@pytest.mark.slow  # one of this file's slowest: many compiles
def test_bench_grad_cache():
    out = run_smoke("bench_grad_cache")
    numbers(rf"^one-shot\s+1\s+{NUM}\s+1\.00\s+{NUM}\s+{NUM}$", out)
    ((ratio,),) = numbers(rf"^cached\s+2\s+{NUM}\s+({NUM})\s+{NUM}\s+{NUM}$", out)
    assert float(ratio) > 0  # temporary memory against the one-shot step


def test_bench_index_processes():
    rows = table(run_smoke("bench_index_processes"), "| N | D | dtype | budget | ours ms/query |")
    assert [row[:4] for row in rows] == [
        ["60", "16", "float32", "(1, 1)"], ["60", "16", "float32", "(2, 4)"],
    ]  # fmt: skip
    for row in rows:
        number(row[4])
        if all(SCORING_PEERS.values()):
            number(row[5]), number(row[6])
        else:
            assert row[5:] == [NOT_INSTALLED, "-", "-"]


def test_bench_mllama_decoder_compile():
    rows = table(run_smoke("bench_mllama_decoder_compile"), "| layers | cross-attention layers |")
    assert len(rows) == 1 and rows[0][:2] == ["3", "1"]
    assert all(number(cell) > 0 for cell in rows[0][2:])  # both compile times, their ratio


def test_bench_pipeline():
    out = run_smoke("bench_pipeline")
    numbers(rf"^plain loop \(peer\)\s+{NUM}\s+{NUM}\s+1\.00x$", out)
    rows = numbers(rf"^grain, (\d) workers, (host|mesh 8)\s+{NUM}\s+{NUM}\s+({NUM})x$", out)
    assert [row[:2] for row in rows] == [("0", "host"), ("0", "mesh 8")]
    assert all(float(ratio) > 0 for *_, ratio in rows)


def test_bench_qdrant():
    out = run_smoke("bench_qdrant")
    rows = table(out, "| search | budget | recall@10 ours | recall@10 Qdrant |")
    assert [row[0] for row in rows] == [
        "exhaustive float32", "r_c=1 float32", "two-stage float32",
        "int8 + rescore", "exhaustive int8", "two-stage int8",
    ]  # fmt: skip
    assert rows[0][2] == rows[0][3] == "1.000"  # both exact at the full budget
    assert all(number(cell) >= 0 for row in rows for cell in row[2:])
    builds = table(out, "| build | ours s | Qdrant s | ratio |")
    assert [row[0] for row in builds] == ["float32", "int8"]
    assert all(number(row[3]) > 0 for row in builds)


def peer_cells(row: list[str], first_peer: int) -> None:
    """Checks a scoring / index row's peer cells: each peer's time or "peer not installed",
    then the speed-up against the faster installed peer ("-" without one)."""
    colpali, pylate, speedup = row[first_peer : first_peer + 3]
    for cell, name in ((colpali, "colpali_engine"), (pylate, "pylate")):
        assert (cell == NOT_INSTALLED) != SCORING_PEERS[name], row
        if SCORING_PEERS[name]:
            number(cell)
    if any(SCORING_PEERS.values()):
        assert re.fullmatch(rf"{NUM}x \((colpali|pylate)\)", speedup), row
    else:
        assert speedup == "-", row


def test_scoring_peer_cells_name_the_faster_installed_peer():
    """The cells of bench_scoring's rows with both, one or no peer installed (the test venv
    may have none, so the smoke run alone would not show the first two)."""
    from benchmarks.scoring_peers import peer_cells, peer_progress

    both = {"colpali": 0.4, "pylate": 0.2}
    assert peer_cells(both, 0.1, 1e3, 1) == ["400.0", "200.0", "2.00x (pylate)"]
    assert peer_cells({"colpali": 0.3}, 0.1, 1.0, 2) == ["0.30", NOT_INSTALLED, "3.00x (colpali)"]
    assert peer_cells({}, 0.1, 1.0, 2) == [NOT_INSTALLED, NOT_INSTALLED, "-"]
    assert peer_progress({"pylate": 0.5}, 3) == f"colpali {NOT_INSTALLED}, pylate 0.500s"


def test_bench_scoring():
    out = run_smoke("bench_scoring")
    if SCORING_PEERS["pylate"]:
        ((diff,),) = numbers(rf"agreement check, max \|ours - pylate\| at \(4, 8\): ({NUM})", out)
        assert float(diff) < 1e-4
    else:
        assert "agreement check: pylate peer not installed" in out
    scoring = table(out, "| D | dtype | budget | GFLOP/query |")
    assert len(scoring) == 10 and {row[0] for row in scoring} == {"32"}  # 5 budgets x 2 dtypes
    for row in scoring:
        number(row[5]), peer_cells(row, 8)
    index = table(out, "| N | D | dtype | budget | index GB |")
    assert [row[3] for row in index] == ["(1, 1)", "(2, 4)"]
    for row in index:
        number(row[5]), peer_cells(row, 6)
    two_stage = table(out, "| data | index dtype | coarse budget | shortlist |")
    assert [row[1] for row in two_stage] == ["float32", "bfloat16"]
    assert all(0 <= number(row[7]) <= 1 for row in two_stage)  # strict recall
    quantised = table(out, "| data | index dtype | bytes | size vs float32 |")
    assert quantised[0][1] == "float32" and quantised[0][4] == "1.000"
    assert all(0 <= number(row[4]) <= 1 for row in quantised)


def test_bench_train_step():
    out = run_smoke("bench_train_step")
    ((jax_loss, torch_loss),) = numbers(rf"^first-step loss: jax ({NUM})  torch ({NUM})$", out)
    assert abs(float(jax_loss) - float(torch_loss)) < 1e-3  # the same model and loss
    numbers(rf"^speed-up jax / torch: {NUM}x", out)
    parts = table(out, "| part | PyTorch (s) | JAX (s) | JAX speed-up |")
    assert [row[0] for row in parts] == [
        "forward (3 sides)", "forward + MMR loss", "forward + loss + backward",
    ]  # fmt: skip
    assert all(number(row[3]) > 0 for row in parts)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """demo_stability.py's smoke run, keeping its trained runs: (stdout, their directory)."""
    workdir = tmp_path_factory.mktemp("demo_stability")
    return run_smoke("demo_stability", "--workdir", str(workdir)), workdir


@pytest.mark.slow
def test_demo_stability(demo_runs):
    out, workdir = demo_runs
    assert (workdir / "one" / "metrics.jsonl").is_file()
    assert (workdir / "eight" / "metrics.jsonl").is_file()
    ((difference,),) = numbers(rf"^  steps    1-   3: max ({NUM})$", out)
    assert float(difference) < 1e-3  # the two meshes sum in different orders, nothing more
    numbers(rf"^\[yes\] first 3 steps within 0\.001: max {NUM}$", out)
    numbers(rf"^loss at step 3: {NUM} / {NUM}$", out)


@pytest.mark.slow
def test_encode_demo_corpus(demo_runs):
    _, workdir = demo_runs
    out = run_smoke("encode_demo_corpus", "--workdir", str(workdir / "one"))
    numbers(
        r"^encoded 2 queries and 8 candidates in \d+ s -> \S+corpus\.npz "
        r"\(queries \(2, 2, \d+\), candidates \(8, 4, \d+\)\)$",
        out,
    )


def test_index_chunk_sweep():
    rows = table(run_smoke("index_chunk_sweep"), "| N | D | dtype | budget | chunk: kernel time |")
    budgets = [["float32", "(1, 1)"], ["float32", "(2, 4)"]]
    assert [row[2:4] for row in rows] == budgets + [["bfloat16", b] for _, b in budgets]
    for row in rows:  # each chunk's time, the one `search` picks starred
        assert re.fullmatch(rf"16: {NUM} ms \(rounds up to {NUM}\), 64\*: {NUM} ms .*", row[4])


def test_mmr_loss_cost():
    out = run_smoke("mmr_loss_cost")
    rows = table(out, "| scoring | GFLOPs (loss + grad) | GB accessed |")
    assert [row[0] for row in rows] == ["per group (the loss)", "one (16, 64) similarity"]
    ((a, b),) = numbers(rf"^loss values: ({NUM}) vs ({NUM})$", out)
    assert abs(float(a) - float(b)) <= 1e-5 * abs(float(a))  # the same loss two ways
    numbers(rf"^per group / one similarity: FLOPs {NUM}x, bytes {NUM}x, wall {NUM}x$", out)


def test_profile_train_step():
    kinds = table(run_smoke("profile_train_step"), "| kind | ms per call | share |")
    assert sum(number(share) for _, _, share in kinds) > 50  # the top kinds hold most of it
