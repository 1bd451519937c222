"""The index's compiled search kernel at small budgets over a range of candidate chunk sizes.

`scoring.default_chunk_size` caps a chunk's candidate slice at `MAX_SLICE_BYTES` (2 MiB), a
bound tuned on the old strided `[N, R_c, D]` layout; in the budget-major layout a small budget's
prefix is one contiguous range, so the cap may not pay at small budgets (the index's float32
`(1, 1)` search now takes one chunk, measured here). This times the kernel alone (no `search`
bookkeeping) on random vectors, 32 queries, k = 10, one device, best of at least `--repeats`
calls (`bench_scoring.best_time`); `*` marks the chunk `search` picks
(`index._search_chunk_size`); chunks whose float32 similarity block exceeds 1 GiB are skipped.

    python benchmarks/index_chunk_sweep.py [--sizes 4000,20000] [--dims 256,2048] \
        [--budgets 1x1,2x4] [--chunks 256,1024,4096] [--dtypes float32,bfloat16] [--rounds 3]
    python benchmarks/index_chunk_sweep.py --smoke   # N = 64, D = 16, seconds (a test runs it)
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import machine_load
from benchmarks.bench_scoring import best_time
from metaembed_jax.retrieval import _search as kernels
from metaembed_jax.retrieval._placement import replicate
from metaembed_jax.retrieval.index import MultiVectorIndex, _default_mesh, _search_chunk_size

NUM_QUERIES, R_Q, K = 32, 16, 10
MAX_SCORE_BYTES = 1 << 30  # chunks whose float32 similarity block would be larger are skipped


def sweep_row(
    index, queries, mesh, budget, repeats, chunks=(256, 1024, 4096), rounds=1, min_seconds=None
) -> str:
    """One table row: each chunk's best kernel time over ``rounds`` rounds, each round timing
    every chunk once in turn, so that a drift of the machine's speed over minutes (this 2-core
    machine's shared caches and memory) reaches all chunks alike rather than the last ones.
    ``min_seconds``: `best_time`'s (None: its default)."""
    r_q, r_c = budget
    _, vectors, _, limit = next(index._device_blocks(mesh, r_c))
    placed = replicate(np.ascontiguousarray(queries[:, :r_q]), mesh)
    count = len(index)
    default = _search_chunk_size(NUM_QUERIES, budget, count, index.dim, vectors.dtype)
    candidates = sorted({min(c, count) for c in (default, *chunks, count)})
    fitting = [c for c in candidates if NUM_QUERIES * r_q * c * r_c * 4 <= MAX_SCORE_BYTES]
    times = {chunk: [] for chunk in fitting}
    for _ in range(rounds):
        for chunk in fitting:
            search = kernels.exhaustive_fn(mesh, r_q, r_c, K, chunk, False, False)
            args = (placed, None, vectors, None, np.int32(0), np.int32(limit))
            seconds = best_time(lambda s=search, a=args: s(*a), repeats, min_seconds)
            times[chunk].append(seconds * 1e3)
    cells = []
    for chunk, ms in times.items():
        spread = f" (rounds up to {max(ms):.2f})" if rounds > 1 else ""
        cells.append(f"{chunk}{'*' if chunk == default else ''}: {min(ms):.2f} ms{spread}")
    return f"| {count} | {index.dim} | {index.dtype} | {budget} | " + ", ".join(cells) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4000,20000")
    parser.add_argument("--dims", default="256,2048")
    parser.add_argument("--budgets", default="1x1,2x4", help="r_q x r_c, comma-separated")
    parser.add_argument("--stored_vectors", type=int, default=0, help="R_c (0: largest r_c)")
    parser.add_argument("--max_elements", type=int, default=20000 * 512, help="skip N x D above")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument(
        "--chunks", default="256,1024,4096", help="chunk sizes tried besides the default and N"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds over all chunks; each cell: best round"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="N 64, D 16, chunk 16, 2 rounds, no minimum time"
    )
    args = parser.parse_args(argv)
    min_seconds = None
    if args.smoke:
        args.sizes, args.dims, args.chunks, args.repeats, args.rounds = "64", "16", "16", 1, 2
        min_seconds = 0.0
    budgets = [tuple(int(r) for r in b.split("x")) for b in args.budgets.split(",")]
    chunks = tuple(int(c) for c in args.chunks.split(","))
    stored = args.stored_vectors or max(r_c for _, r_c in budgets)
    print(machine_load.describe())
    mesh = _default_mesh()
    print("| N | D | dtype | budget | chunk: kernel time |\n|---|---|---|---|---|")
    for count in map(int, args.sizes.split(",")):
        for dim in map(int, args.dims.split(",")):
            if count * dim > args.max_elements:
                continue
            rng = np.random.default_rng(0)
            vectors = rng.standard_normal((count, stored, dim), dtype=np.float32)
            queries = rng.standard_normal((NUM_QUERIES, R_Q, dim), dtype=np.float32)
            for dtype in args.dtypes.split(","):
                index = MultiVectorIndex.build(vectors, dtype=dtype)
                for budget in budgets:
                    row = sweep_row(
                        index, queries, mesh, budget, args.repeats, chunks, args.rounds, min_seconds
                    )
                    print(row, flush=True)
    print(machine_load.describe())


if __name__ == "__main__":
    main()
