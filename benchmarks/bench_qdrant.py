"""MultiVectorIndex vs Qdrant's embedded engine (`QdrantIndex`, path=): one process, same vectors.

    python benchmarks/bench_qdrant.py                       # 5000 x 16 x 128, 32 queries x 8
    python benchmarks/bench_qdrant.py --smoke               # tiny, seconds (a test runs it)
    python benchmarks/bench_qdrant.py --vectors runs/demo/corpus20k.npz   # a trained model's
        # embeddings (queries, candidates arrays: benchmarks/encode_demo_corpus.py writes them)

Rows: exhaustive float32 at the full budget (R_q, R_c) (Qdrant: MAX_SIM multivector, no
graph), (R_q, 1) (Qdrant: the dense r_c = 1 vector and its graph), two-stage (coarse budget,
shortlist: Qdrant's prefetch), int8 + rescore (ours: int8 with a float32 copy; Qdrant: scalar
int8 with the originals on disk, rescoring with oversampling). recall@10 is against exact
float64 MaxSim at the row's budget. Search time is the best of ``--repeats`` calls with all
queries in one call (after a warm-up call), build time one build each: ours
`MultiVectorIndex.build`, Qdrant `QdrantIndex.from_index` of that index (upserts, graph and
quantisation built by the engine's optimiser). Ratios are Qdrant / ours.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from importlib.metadata import version

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import machine_load  # noqa: E402
from metaembed_jax.cli.main import parse_budget  # noqa: E402
from metaembed_jax.retrieval.index import MultiVectorIndex  # noqa: E402
from metaembed_jax.retrieval.qdrant import QdrantIndex  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-candidates", type=int, default=5000)
    parser.add_argument("--candidate-vectors", type=int, default=16, help="R_c")
    parser.add_argument("--dim", type=int, default=128, help="D")
    parser.add_argument("--num-queries", type=int, default=32)
    parser.add_argument("--query-vectors", type=int, default=8, help="R_q")
    parser.add_argument("--vectors", default=None, help=".npz with queries / candidates arrays")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--coarse", type=parse_budget, default=(1, 1), help="two-stage budget")
    parser.add_argument("--shortlist", type=int, default=200, help="two-stage shortlist")
    parser.add_argument("--rescore", type=int, default=50, help="int8 candidates rescored")
    parser.add_argument("--repeats", type=int, default=5, help="timed search calls (best)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", default=None, help="where the collections go (default: a temporary dir)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_candidates, args.candidate_vectors, args.dim = 300, 8, 32
        args.num_queries, args.query_vectors, args.repeats = 4, 4, 1
        args.shortlist, args.rescore = 60, 30
    return args


def load_vectors(args):
    """(queries [Nq, R_q, D], candidates [N, R_c, D]) float32: the file's, or random unit."""
    if args.vectors:
        with np.load(args.vectors) as arrays:
            return (
                np.asarray(arrays["queries"], np.float32),
                np.asarray(arrays["candidates"], np.float32),
            )
    rng = np.random.default_rng(args.seed)

    def unit(shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    queries = unit((args.num_queries, args.query_vectors, args.dim))
    candidates = unit((args.num_candidates, args.candidate_vectors, args.dim))
    return queries, candidates


def exact_top_k(queries, candidates, budget, k, block=1000) -> np.ndarray:
    """Positions [Nq, k] of the float64 MaxSim top-k at ``budget``."""
    r_q, r_c = budget
    flat = queries[:, :r_q].astype(np.float64).reshape(-1, queries.shape[-1])
    scores = []
    for start in range(0, len(candidates), block):
        part = candidates[start : start + block, :r_c].astype(np.float64)
        sims = flat @ part.reshape(-1, part.shape[-1]).T  # [Nq * r_q, n * r_c]
        sims = sims.reshape(len(queries), r_q, len(part), r_c).max(-1).sum(1)
        scores.append(sims)
    return np.argsort(-np.concatenate(scores, axis=1), axis=1, kind="stable")[:, :k]


def recall(found_ids, truth) -> float:
    pairs = zip(found_ids, truth, strict=True)
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in pairs]))


def timed(fn, repeats: int):
    """(result of a warm-up call, best seconds of ``repeats`` calls)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def build_pair(candidates, dtype, prefixes, workdir, name):
    """(ours, Qdrant's, ours build s, Qdrant build s)."""
    start = time.perf_counter()
    ours = MultiVectorIndex.build(candidates, dtype=dtype, full_precision=dtype == "int8")
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs = QdrantIndex.from_index(
        ours, workdir, collection=name, prefixes=prefixes, overwrite=True, progress=False
    )
    return ours, theirs, ours_seconds, time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    print(f"at start: {machine_load.describe()}")
    if args.workdir:
        compare(args, args.workdir)
    else:  # the collections go with the temporary directory
        with tempfile.TemporaryDirectory(prefix="bench_qdrant_") as scratch:
            compare(args, scratch)
    print(f"\nat end: {machine_load.describe()}")


def compare(args, workdir: str) -> None:
    """Builds both indexes of each dtype (Qdrant's collections under `workdir`), searches them
    and prints the tables."""
    print(
        f"qdrant-edge-py {version('qdrant-edge-py')}, jax {version('jax')}, "
        f"numpy {version('numpy')}"
    )
    queries, candidates = load_vectors(args)
    (nq, r_q, dim), (n, r_c, _) = queries.shape, candidates.shape
    full, single, k = (r_q, r_c), (r_q, 1), args.k
    prefixes = sorted({1, args.coarse[1], min(4, r_c), r_c})
    print(
        f"{n} candidates x {r_c} x {dim}, {nq} queries x {r_q}, k={k}, stored prefixes "
        f"{prefixes}; two-stage {args.coarse} -> {full} shortlist {args.shortlist}; int8 "
        f"rescore {args.rescore}; {args.repeats} timed calls\n"
    )
    truth = {b: exact_top_k(queries, candidates, b, k) for b in (full, single)}
    rows, builds = [], []
    for dtype in ("float32", "int8"):
        ours, theirs, ours_s, theirs_s = build_pair(candidates, dtype, prefixes, workdir, dtype)
        builds.append((dtype, ours_s, theirs_s))
        cases = {
            f"exhaustive {dtype}": (full, {}),
            f"r_c=1 {dtype}": (single, {}),
            f"two-stage {dtype}": (
                full,
                {"coarse_budget": args.coarse, "shortlist": args.shortlist},
            ),
        }
        if dtype == "int8":
            cases = {"int8 + rescore": (full, {"rescore": args.rescore}), **cases}
            cases.pop(f"r_c=1 {dtype}")
        for label, (budget, options) in cases.items():
            found = {}
            for engine, index in (("ours", ours), ("qdrant", theirs)):

                def search(index=index, budget=budget, options=options):
                    return index.search(queries, budget, k=k, **options)

                (_, ids), seconds = timed(search, args.repeats)
                found[engine] = (recall(ids, truth[budget]), seconds)
            rows.append((label, budget, found))
        theirs.close()
    print("| search | budget | recall@10 ours | recall@10 Qdrant | ours ms | Qdrant ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for label, budget, found in rows:
        (r_ours, t_ours), (r_theirs, t_theirs) = found["ours"], found["qdrant"]
        print(
            f"| {label} | {budget[0]}x{budget[1]} | {r_ours:.3f} | {r_theirs:.3f} | "
            f"{1e3 * t_ours:.1f} | {1e3 * t_theirs:.1f} | {t_theirs / t_ours:.1f}x |"
        )
    print("\n| build | ours s | Qdrant s | ratio |")
    print("|---|---|---|---|")
    for dtype, ours_s, theirs_s in builds:
        print(f"| {dtype} | {ours_s:.2f} | {theirs_s:.2f} | {theirs_s / ours_s:.0f}x |")


if __name__ == "__main__":
    main()
