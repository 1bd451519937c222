"""Index search vs the peers, each row measured in several separate processes: median ratio.

    python benchmarks/bench_index_processes.py --processes 5 -- --index-sizes 4000 \\
        --index-dims 256,2048 --index-budgets 1x1,2x4,4x8,8x16,16x64
    python benchmarks/bench_index_processes.py --smoke   # one process of `bench_scoring.py
        # --smoke` (peers optional: "peer not installed"), seconds (tests/test_benchmarks.py)

One process of `bench_scoring.py` gives one ratio per row, and both sides' best times move by up
to 1.8x from one process to the next on a 2-core machine (memory placement, thread pools): the
narrowest rows cannot be decided by one run. This script runs `bench_scoring.py --skip-scoring
--skip-recall --skip-two-stage` (index rows only) ``--processes`` times, one after another, with
the arguments after ``--``, parses each row's times, and prints per row the median of the
per-process ratios (ratios are taken inside a process, where both sides share its conditions)
and their range, with the median times. Prints the load average at start and end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import machine_load  # noqa: E402
from benchmarks.scoring_peers import NOT_INSTALLED  # noqa: E402

_PEER_TIME = rf"([\d.]+)s|{NOT_INSTALLED}"
ROW = re.compile(
    rf"^\s+N=(\d+) D=(\d+) (\w+) \((\d+), (\d+)\): ours ([\d.]+)s, colpali (?:{_PEER_TIME}), "
    rf"pylate (?:{_PEER_TIME})"
)


def run_once(extra_args: list[str]) -> dict[tuple, tuple[float, float | None, float | None]]:
    """One `bench_scoring.py` process: {(N, D, dtype, r_q, r_c): (ours, colpali, pylate) s};
    a peer's time is None where it is not installed."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_scoring.py")
    command = [sys.executable, script, "--skip-scoring", "--skip-recall", "--skip-two-stage"]
    result = subprocess.run(command + extra_args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench_scoring.py failed:\n{result.stdout}\n{result.stderr}")
    rows = {}
    for line in result.stdout.splitlines():
        match = ROW.match(line)
        if match:
            n, d, dtype, r_q, r_c, *times = match.groups()
            rows[(int(n), int(d), dtype, int(r_q), int(r_c))] = tuple(
                None if t is None else float(t) for t in times
            )
    if not rows:
        raise SystemExit(f"no index rows in bench_scoring.py's output:\n{result.stdout}")
    return rows


def summarise(runs: list[dict], num_queries: int) -> None:
    print(
        f"\n**Index search, median over {len(runs)} processes ({num_queries} queries, k = 10): "
        "ms per query, and the speed-up against the faster peer (median of the per-process "
        "ratios, min - max)**\n"
    )
    print("| N | D | dtype | budget | ours ms/query | faster peer ms/query | speed-up | range |")
    print("|---|---|---|---|---|---|---|---|")
    for key in runs[0]:
        ours = [run[key][0] for run in runs]
        n, d, dtype, r_q, r_c = key
        per_query = 1e3 / num_queries
        row = f"| {n} | {d} | {dtype} | ({r_q}, {r_c}) | {statistics.median(ours) * per_query:.3f} "
        installed = [[t for t in run[key][1:] if t is not None] for run in runs]
        if not all(installed):
            print(f"{row}| {NOT_INSTALLED} | - | - |")
            continue
        peers = [min(times) for times in installed]
        ratios = sorted(p / o for p, o in zip(peers, ours, strict=True))
        print(
            f"{row}| {statistics.median(peers) * per_query:.3f} | {statistics.median(ratios):.2f}x "
            f"| {ratios[0]:.2f}x - {ratios[-1]:.2f}x |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--num-queries", type=int, default=32)
    parser.add_argument(
        "--smoke", action="store_true", help="one process of bench_scoring.py --smoke, 2 queries"
    )
    parser.add_argument("bench_args", nargs="*", help="after --: bench_scoring.py's arguments")
    args = parser.parse_args(argv)
    if args.smoke:
        args.processes, args.num_queries = 1, 2
        args.bench_args = ["--smoke", *args.bench_args]
    extra = ["--num-queries", str(args.num_queries), *args.bench_args]
    print(f"at start: {machine_load.describe()}")
    runs = []
    for attempt in range(args.processes):
        runs.append(run_once(extra))
        print(f"process {attempt + 1} of {args.processes} done: {machine_load.describe()}")
    summarise(runs, args.num_queries)
    print(f"\nat end: {machine_load.describe()}")


if __name__ == "__main__":
    main()
