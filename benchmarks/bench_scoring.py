"""Budgeted MaxSim: metaembed_jax vs colpali-engine and PyLate scorers, one process, same data.

    python benchmarks/bench_scoring.py            # full: 32 queries x 20k candidates, D=512,
                                                  # plus a D=2048 row (5k candidates)
    python benchmarks/bench_scoring.py --quick    # small, fast
    python benchmarks/bench_scoring.py --smoke    # tiny, every table; peers optional (a test)
    python benchmarks/bench_scoring.py --embeddings FILE.npz   # two-stage / int8 recall on
                                                  # real embeddings (queries, candidates arrays)
    python benchmarks/bench_scoring.py --skip-scoring --skip-recall   # index search only:
                                                  # (1, 1) at N = 4k / 20k, D = 256 / 2048

The index rows time `MultiVectorIndex.search` (budget-major layout: the (1, 1) prefix is one
contiguous range) with k = 10 against the peers' scorers + `torch.topk` on contiguous prefix
tensors prepared outside the timed region.

Prints markdown tables. Peers are called from their installed packages (colpali-engine's
`BaseVisualRetrieverProcessor.score_multi_vector`, PyLate's `pylate.scores.colbert_scores`),
loading only the scorer submodules (their package __init__s import heavy optional deps).
Latency = best of ``--repeats`` runs (more for fast calls, see `best_time`) after a warm-up
(compile) run, divided by the query count. Without ``--smoke`` both peers must be installed
(requirements-bench.txt); with it a missing one's cells read "peer not installed".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import machine_load  # noqa: E402
from benchmarks.scoring_peers import (  # noqa: E402
    NOT_INSTALLED,
    load_peers,
    peer_cells,
    peer_progress,
)
from metaembed_jax.retrieval.index import MultiVectorIndex  # noqa: E402
from metaembed_jax.scoring import maxsim, top_k  # noqa: E402

BUDGETS = [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]
R_Q, R_C = 16, 64
# Least total time of one measurement's timed calls (`--min-seconds`; the smoke run: 0).
MIN_SECONDS = 1.0


# ------------------------------------------------------------------------------------- timing
def best_time(fn, repeats: int, min_seconds: float | None = None) -> float:
    """Best wall time of at least ``repeats`` calls, and of as many more as fit in
    ``min_seconds`` (default `MIN_SECONDS`), after one warm-up call (compilation, caches): a few
    ms-scale calls alone are at the mercy of a single scheduler hiccup."""
    min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
    jax.block_until_ready(fn())
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(dtype_name: str, rows: int, dim: int, repeats: int) -> dict[str, float]:
    """Best GFLOP/s of a plain [rows, dim] x [dim, cols] matmul (float32 accumulation) in JAX
    and in torch, over cache-sized to large column counts (256 ... 16384)."""
    rng = np.random.default_rng(0)
    best = {"jax": 0.0, "torch": 0.0}
    jdtype, tdtype = (
        (jnp.float32, torch.float32) if dtype_name == "float32" else (jnp.bfloat16, torch.bfloat16)
    )
    dot = jax.jit(
        lambda a, b: lax.dot_general(
            a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
    )
    for cols in (256, 1024, 4096, 16384):
        a = rng.standard_normal((rows, dim), np.float32)
        b = rng.standard_normal((cols, dim), np.float32)
        flops = 2.0 * rows * cols * dim
        ja, jb = jnp.asarray(a, jdtype), jnp.asarray(b, jdtype)
        seconds = best_time(lambda ja=ja, jb=jb: dot(ja, jb), repeats)
        best["jax"] = max(best["jax"], flops / seconds / 1e9)
        ta, tb = torch.from_numpy(a).to(tdtype), torch.from_numpy(b).to(tdtype)
        seconds = best_time(lambda ta=ta, tb=tb: ta @ tb.T, repeats)
        best["torch"] = max(best["torch"], flops / seconds / 1e9)
    return best


def unit_vectors(rng, shape) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------- scoring
def bench_scoring(peers, num_queries, num_candidates, dim, dtype_name, repeats, peak):
    """One row per budget: ours vs the peers on the same unit-norm data and dtype."""
    rng = np.random.default_rng(dim)
    queries = unit_vectors(rng, (num_queries, R_Q, dim))
    candidates = unit_vectors(rng, (num_candidates, R_C, dim))
    jdtype, tdtype = (
        (jnp.float32, torch.float32) if dtype_name == "float32" else (jnp.bfloat16, torch.bfloat16)
    )
    q_jax, c_jax = jnp.asarray(queries, jdtype), jnp.asarray(candidates, jdtype)
    q_torch = torch.from_numpy(queries).to(tdtype)
    c_torch = torch.from_numpy(candidates).to(tdtype)
    del candidates
    rows = []
    for budget in BUDGETS:
        r_q, r_c = budget
        flops = 2.0 * r_q * r_c * dim * num_candidates  # per query
        ours = best_time(lambda b=budget: maxsim(q_jax, c_jax, b), repeats)
        # The peers get contiguous prefixes prepared outside the timed region.
        q_prefix, c_prefix = q_torch[:, :r_q].contiguous(), c_torch[:, :r_c].contiguous()
        peer_times = {
            name: best_time(lambda f=fn, q=q_prefix, c=c_prefix: f(q, c), repeats)
            for name, fn in peers.items()
        }
        del q_prefix, c_prefix
        rows.append(
            {
                "dim": dim,
                "dtype": dtype_name,
                "budget": budget,
                "gflop_per_query": flops / 1e9,
                "mb": num_candidates * r_c * dim * c_jax.dtype.itemsize / 1e6,
                "ours_ms": ours / num_queries * 1e3,
                "gflops": flops * num_queries / ours / 1e9,
                "peak_fraction": flops * num_queries / ours / 1e9 / peak,
                "peer_cells": peer_cells(peer_times, ours, 1e3 / num_queries, 2),
            }
        )
        print(f"  D={dim} {dtype_name} {budget}: ours {ours:.3f}s, {peer_progress(peer_times, 3)}",
              flush=True)  # fmt: skip
    return rows


def check_agreement(peers, dim=64) -> str:
    """Max |ours - pylate| on a small float32 case at (4, 8): the scorers compute the same thing."""
    if "pylate" not in peers:
        return f"agreement check: pylate {NOT_INSTALLED}"
    rng = np.random.default_rng(1)
    q, c = unit_vectors(rng, (3, R_Q, dim)), unit_vectors(rng, (50, R_C, dim))
    ours = np.asarray(maxsim(q, c, (4, 8)))
    theirs = peers["pylate"](torch.from_numpy(q[:, :4].copy()), torch.from_numpy(c[:, :8].copy()))
    return (
        f"agreement check, max |ours - pylate| at (4, 8): {np.abs(ours - theirs.numpy()).max():.2e}"
    )


def print_scoring_table(rows, peaks):
    print(
        "\n| D | dtype | budget | GFLOP/query | MB read (prefix) | ours ms/query | ours GFLOP/s "
        "| % of matmul peak | colpali ms/query | PyLate ms/query | speed-up vs faster peer |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dim']} | {r['dtype']} | {r['budget']} | {r['gflop_per_query']:.3f} | "
            f"{r['mb']:.0f} | {r['ours_ms']:.2f} | {r['gflops']:.0f} | "
            f"{100 * r['peak_fraction']:.0f}% | " + " | ".join(r["peer_cells"]) + " |"
        )
    print(
        "\nMatmul peak (best GFLOP/s of a plain matmul, same dtype, same run; the % column uses "
        "the better of JAX and torch):"
    )
    for (dim, dtype_name), peak in peaks.items():
        print(f"- D={dim} {dtype_name}: JAX {peak['jax']:.0f}, torch {peak['torch']:.0f}")


# ------------------------------------------------------------------------------------- index
def _candidate_blocks(num_candidates, dim, block=1000):
    """The index rows' random unit vectors [n, R_C, D], ``block`` rows at a time (no full float32
    copy): the same vectors on every call with the same N and D."""
    rng = np.random.default_rng(num_candidates + dim)
    for start in range(0, num_candidates, block):
        yield unit_vectors(rng, (min(block, num_candidates - start), R_C, dim))


def _build(num_candidates, dim, dtype_name, *, with_index=True, prefix_rc=0):
    """From one pass over the vectors: (our index or None, the peers' copy of the first
    ``prefix_rc`` vectors [N, prefix_rc, D] as a torch tensor of the index dtype, or None if
    ``prefix_rc`` is 0)."""
    index = MultiVectorIndex(R_C, dim, dtype_name) if with_index else None
    prefix = None
    if prefix_rc:
        tdtype = torch.float32 if dtype_name == "float32" else torch.bfloat16
        prefix = torch.empty((num_candidates, prefix_rc, dim), dtype=tdtype)
    start = 0
    for rows in _candidate_blocks(num_candidates, dim):
        if index is not None:
            index.add(rows)
        if prefix is not None:
            prefix[start : start + len(rows)] = torch.from_numpy(rows[:, :prefix_rc].copy())
        start += len(rows)
    return index, prefix


def bench_index_search(peers, args, k=10):
    """Index search vs peers (scores + top-k) at the given budgets, per size, D and dtype."""
    budgets = [tuple(int(r) for r in b.split("x")) for b in args.index_budgets.split(",")]
    rows = []
    for num_candidates in (int(n) for n in args.index_sizes.split(",")):
        for dim in (int(d) for d in args.index_dims.split(",")):
            for dtype_name in args.index_dtypes.split(","):
                itemsize = 4 if dtype_name == "float32" else 2
                gigabytes = num_candidates * R_C * dim * itemsize / 1e9
                if gigabytes > args.max_index_gb:
                    print(
                        f"  skipped N={num_candidates} D={dim} {dtype_name}: index "
                        f"{gigabytes:.1f} GB > --max-index-gb {args.max_index_gb}"
                    )
                    continue
                rows += _index_rows(peers, args, num_candidates, dim, dtype_name, budgets, k)
    print(
        f"\n**Index search (budget-major layout), {args.num_queries} queries, k={k}, random unit "
        f"vectors (R_q={R_Q}, R_c={R_C}), peers: scores + torch.topk on contiguous prefixes**\n"
    )
    print(
        "| N | D | dtype | budget | index GB | ours ms/query | colpali ms/query | PyLate ms/query "
        "| speed-up vs faster peer |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def _index_rows(peers, args, num_candidates, dim, dtype_name, budgets, k):
    """Rows of the index table for one N, D and dtype. By default each budget times ours, then
    the peers; with ``--peers-after`` all of ours first, then the index is dropped before the
    peers' copy is built (for indexes whose index, placed prefix and peers' copy do not fit in
    memory together)."""
    queries = unit_vectors(
        np.random.default_rng(num_candidates + dim + 1), (args.num_queries, R_Q, dim)
    )
    prefix_rc = max(r_c for _, r_c in budgets) if peers else 0  # no peers: no copy for them
    index, prefix = _build(
        num_candidates, dim, dtype_name, prefix_rc=0 if args.peers_after else prefix_rc
    )
    index_gigabytes = index.nbytes / 1e9
    ours, peer_times = {}, {}
    for budget in budgets:
        ours[budget] = best_time(lambda b=budget: index.search(queries, b, k=k), args.repeats)
        if prefix is not None:
            peer_times[budget] = _peer_times(peers, queries, prefix, budget, k, args.repeats)
    if prefix is None and peers:
        del index  # and with it the placed prefix
        _, prefix = _build(num_candidates, dim, dtype_name, with_index=False, prefix_rc=prefix_rc)
        for budget in budgets:
            peer_times[budget] = _peer_times(peers, queries, prefix, budget, k, args.repeats)
    rows = []
    for budget in budgets:
        times = peer_times.get(budget, {})
        cells = peer_cells(times, ours[budget], 1e3 / args.num_queries, 3)
        rows.append(
            f"| {num_candidates} | {dim} | {dtype_name} | {budget} | {index_gigabytes:.2f} | "
            f"{ours[budget] / args.num_queries * 1e3:.3f} | " + " | ".join(cells) + " |"
        )
        print(
            f"  N={num_candidates} D={dim} {dtype_name} {budget}: ours {ours[budget]:.7f}s, "
            f"{peer_progress(times, 7)}",
            flush=True,
        )
    return rows


def _peer_times(peers, queries, prefix, budget, k, repeats) -> dict[str, float]:
    """Each peer's best time for scores + top-k at ``budget`` on contiguous prefix copies."""
    r_q, r_c = budget
    q_prefix = torch.from_numpy(queries).to(prefix.dtype)[:, :r_q].contiguous()
    c_prefix = prefix[:, :r_c].contiguous()
    return {
        name: best_time(lambda f=fn: torch.topk(f(q_prefix, c_prefix), k, dim=1), repeats)
        for name, fn in peers.items()
    }


# ------------------------------------------------------------------------------------- recall
def synthetic_stand_in(rng, num_queries, num_candidates, dim, cluster_size=20):
    """SYNTHETIC stand-in for embeddings of a trained MMR model (used without --embeddings).

    Candidates come in clusters of ``cluster_size`` near-duplicates of a topic (so a query's
    top-10 are semantically related, as with a real model, not random near-ties); each
    candidate's vectors are its topic plus noise that grows along the vector index (early vectors
    carry the topic, as Matryoshka training encourages); each query is a noisy view of one
    candidate's topic. Only meant to exercise two-stage search on prefix-informative data: its
    recall figures say nothing about a real model.
    """

    def noisy(centres, scale):
        noise = rng.standard_normal(centres.shape, dtype=np.float32) / np.sqrt(dim)
        x = centres + scale * noise
        # float32: numpy 2 promotes the float32 noise divided by np.sqrt's float64 scalar.
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    clusters = unit_vectors(rng, (-(-num_candidates // cluster_size), 1, dim))
    topics = noisy(np.repeat(clusters, cluster_size, axis=0)[:num_candidates], 0.7)
    noise_scale = np.linspace(0.3, 1.5, R_C, dtype=np.float32)[None, :, None]
    candidates = np.empty((num_candidates, R_C, dim), np.float32)
    for start in range(0, num_candidates, 2048):
        rows = slice(start, start + 2048)
        candidates[rows] = noisy(np.broadcast_to(topics[rows], candidates[rows].shape), noise_scale)
    targets = rng.choice(num_candidates, num_queries, replace=False)
    queries = noisy(np.broadcast_to(topics[targets], (num_queries, R_Q, dim)), 1.0)
    return queries, candidates


def recall(found: np.ndarray, reference: np.ndarray) -> float:
    """Strict recall@k: mean over queries of |found ∩ reference| / k (ids must match)."""
    return float(
        np.mean([len(set(f) & set(r)) / len(r) for f, r in zip(found, reference, strict=True)])
    )


class Truth:
    """Exact float32 scores at the fine budget, to judge approximate results three ways."""

    def __init__(self, queries, candidates, fine, targets=None, k=10):
        self.scores = np.asarray(maxsim(queries, candidates, fine))  # [Nq, Nc] float32
        best, order = (np.asarray(x) for x in top_k(self.scores, k + 1))
        self.top_ids = order[:, :k]  # = a float32 index's exhaustive search (same ties rule)
        self.kth, self.next = best[:, k - 1], best[:, k]  # scores at ranks k and k + 1
        self.epsilon = 1e-3 * fine[0]  # ann-benchmarks' 1e-3 per similarity, x r_q terms
        self.targets = targets

    def tolerant_recall(self, found: np.ndarray) -> float:
        """ann-benchmarks' recall: a returned id counts if its exact score is within epsilon of
        the exact k-th best (near-ties are interchangeable)."""
        exact = np.take_along_axis(self.scores, found, axis=1)
        return float(np.mean(exact >= self.kth[:, None] - self.epsilon))

    def target_hits(self, found: np.ndarray) -> float | None:
        """Fraction of queries whose own (relevant) item is among the returned ids."""
        if self.targets is None:
            return None
        return float(np.mean([t in f for f, t in zip(found, self.targets, strict=True)]))


def _quality(truth: Truth, found, exact_ids) -> str:
    hits = truth.target_hits(found)
    hits = "-" if hits is None else f"{hits:.3f}"
    return f"{recall(found, exact_ids):.3f} | {truth.tolerant_recall(found):.3f} | {hits}"


QUALITY_HEADER = "recall@k strict | recall@k within epsilon | own item in results"


def bench_two_stage(queries, candidates, coarse_budgets, shortlists, repeats, label, truth, k):
    """Two-stage (coarse budget + exact rerank) vs exhaustive at the fine budget, per dtype."""
    fine = (min(16, queries.shape[1]), min(64, candidates.shape[1]))
    rows = []
    for dtype_name in ("float32", "bfloat16"):
        index = MultiVectorIndex.build(candidates, dtype=dtype_name)
        exhaustive_time = best_time(lambda i=index: i.search(queries, fine, k=k), repeats)
        exact_ids = np.asarray(index.search(queries, fine, k=k)[1])
        for coarse in coarse_budgets:
            for shortlist in shortlists:

                def two_stage(i=index, c=coarse, s=shortlist):
                    return i.search(queries, fine, k=k, coarse_budget=c, shortlist=s)

                seconds = best_time(two_stage, repeats)
                found = np.asarray(two_stage()[1])
                rows.append(
                    f"| {label} | {dtype_name} | {coarse} | {shortlist} | "
                    f"{exhaustive_time / len(queries) * 1e3:.2f} | "
                    f"{seconds / len(queries) * 1e3:.2f} | {exhaustive_time / seconds:.1f}x | "
                    f"{_quality(truth, found, exact_ids)} |"
                )
        del index
    print(
        f"\n**Two-stage vs exhaustive {fine}, k={k}, data: {label}** (recall against the "
        "exhaustive search of the same index dtype)\n"
    )
    print(
        "| data | index dtype | coarse budget | shortlist | exhaustive ms/query | two-stage "
        f"ms/query | speed-up | {QUALITY_HEADER} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def bench_quantised(queries, candidates, label, truth, k, rescores=(50, 100)):
    """bfloat16 / int8 (and int8 + exact float32 rescoring of its best ``rescores``) vs a float32
    index: exhaustive search quality at the fine budget, bytes in RAM."""
    fine = (min(16, queries.shape[1]), min(64, candidates.shape[1]))
    exact_ids = truth.top_ids
    size = (
        int(np.prod(np.shape(candidates))) * 4
    )  # bytes of a float32 index: the vectors as they are
    print(f"\n**Quantised index vs float32, exhaustive {fine}, k={k}, data: {label}**\n")
    print(f"| data | index dtype | bytes | size vs float32 | {QUALITY_HEADER} |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {label} | float32 | {size:,} | 1.00x | {_quality(truth, exact_ids, exact_ids)} |")
    for dtype_name in ("bfloat16", "int8"):
        index = MultiVectorIndex.build(candidates, dtype=dtype_name)
        found = np.asarray(index.search(queries, fine, k=k)[1])
        print(
            f"| {label} | {dtype_name} | {index.nbytes:,} | 1/{size / index.nbytes:.2f} | "
            f"{_quality(truth, found, exact_ids)} |"
        )
        del index
    with tempfile.TemporaryDirectory() as directory:
        # Saved and loaded: the float32 copy is then memory-mapped, RAM holds the int8 copy.
        MultiVectorIndex.build(candidates, dtype="int8", full_precision=True).save(directory)
        index = MultiVectorIndex.load(directory)
        for rescore in rescores:
            found = np.asarray(index.search(queries, fine, k=k, rescore=rescore)[1])
            print(
                f"| {label} | int8 + rescore {rescore} (float32 on disk) | {index.nbytes:,} "
                f"(RAM) | {index.nbytes / size:.3f}x | {_quality(truth, found, exact_ids)} |"
            )
        del index


def describe_ties(truth: Truth, k: int) -> str:
    """How well-defined the exact top-k is: near-ties make strict recall measure rounding."""
    gap = np.median(truth.kth - truth.next)
    crowd = np.median((truth.scores >= truth.kth[:, None] - truth.epsilon).sum(axis=1))
    return (
        f"exact top-{k}: median score {np.median(truth.kth):.4f} at rank {k}, median gap "
        f"to rank {k + 1} {gap:.2e}; median {crowd:.0f} candidates within epsilon "
        f"({truth.epsilon:.3f}) of rank {k}"
    )


def bench_recall(args, k=10):
    """Two-stage and quantised-index quality on real (or stand-in) and on random embeddings."""
    shortlists = [int(s) for s in args.shortlists.split(",")]
    coarse = [tuple(int(r) for r in b.split("x")) for b in args.coarse_budgets.split(",")]
    targets = None
    if args.embeddings:
        data = np.load(args.embeddings)
        queries, candidates = data["queries"], data["candidates"]
        targets = data.get("targets")
        label = os.path.basename(args.embeddings)
    else:
        rng = np.random.default_rng(7)
        queries, candidates = synthetic_stand_in(
            rng, args.num_queries, args.num_candidates, args.recall_dim
        )
        label = "SYNTHETIC stand-in (pass --embeddings for a trained model's)"
    fine = (min(16, queries.shape[1]), min(64, candidates.shape[1]))
    truth = Truth(queries, candidates, fine, targets, k)
    print(f"\n{label}: {describe_ties(truth, k)}")
    if not args.skip_two_stage:
        bench_two_stage(queries, candidates, coarse, shortlists, args.repeats, label, truth, k)
    bench_quantised(queries, candidates, label, truth, k)
    rng = np.random.default_rng(8)
    queries = unit_vectors(rng, (args.num_queries, R_Q, args.recall_dim))
    candidates = unit_vectors(rng, (args.num_candidates, R_C, args.recall_dim))
    truth = Truth(queries, candidates, (R_Q, R_C), None, k)
    print(f"\nrandom unit vectors: {describe_ties(truth, k)}")
    bench_quantised(queries, candidates, "random unit vectors", truth, k)


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repeat")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, no minimum time; peers optional"
    )
    parser.add_argument(
        "--min-seconds", type=float, default=MIN_SECONDS, help="least timed total per figure"
    )
    parser.add_argument("--num-queries", type=int, default=32)
    parser.add_argument("--num-candidates", type=int, default=20000, help="for D=512")
    parser.add_argument(
        "--num-candidates-2048",
        type=int,
        default=5000,
        help="for the D=2048 row (20k x 64 x 2048 float32 would be 10.5 GB)",
    )
    parser.add_argument("--dims", default="512,2048")
    parser.add_argument("--recall-dim", type=int, default=512, help="D of the recall tables")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shortlists", default="100,300,1000")
    parser.add_argument(
        "--coarse-budgets", default="1x1", help="two-stage first passes, e.g. 1x1,2x4"
    )
    parser.add_argument("--embeddings", help=".npz with queries [Nq,R_q,D], candidates [Nc,R_c,D]")
    parser.add_argument("--index-sizes", default="4000,20000", help="N of the index rows")
    parser.add_argument("--index-dims", default="256,2048", help="D of the index rows")
    parser.add_argument("--index-budgets", default="1x1", help="e.g. 1x1,2x4,4x8,8x16,16x64")
    parser.add_argument("--index-dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--max-index-gb",
        type=float,
        default=12.0,
        help="skip index rows whose stored vectors exceed this (20k x 64 x 2048 float32: 10.5)",
    )
    parser.add_argument(
        "--peers-after",
        action="store_true",
        help="index rows: time all budgets of ours, drop the index, then the peers (memory)",
    )
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--skip-recall", action="store_true")
    parser.add_argument(
        "--skip-two-stage", action="store_true", help="recall: quantised-index tables only"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_candidates, args.num_candidates_2048 = 2000, 500
        args.repeats, args.shortlists = 1, "50,200"
        args.index_sizes, args.index_dims = "1000", "64"
    if args.smoke:
        args.num_queries, args.num_candidates, args.num_candidates_2048 = 2, 120, 120
        args.dims, args.repeats, args.min_seconds, args.shortlists = "32", 1, 0.0, "20"
        args.recall_dim = 32
        args.index_sizes, args.index_dims, args.index_dtypes = "60", "16", "float32"
        args.index_budgets = "1x1,2x4"
    return args


def main(argv=None):
    global MIN_SECONDS
    args = parse_args(argv)
    MIN_SECONDS = args.min_seconds
    print(
        f"# bench_scoring: jax {jax.__version__} ({jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores), torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(f"at start: {machine_load.describe()}\n")
    peers = load_peers(required=not args.smoke)
    print(check_agreement(peers))
    if not args.skip_scoring:
        rows, peaks = [], {}
        counts = {
            dim: args.num_candidates if dim == 512 else args.num_candidates_2048
            for dim in (int(d) for d in args.dims.split(","))
        }
        for dim, count in counts.items():
            for dtype_name in ("float32", "bfloat16"):
                peak = matmul_peak(dtype_name, args.num_queries * R_Q, dim, args.repeats)
                peaks[(dim, dtype_name)] = peak
                rows += bench_scoring(
                    peers,
                    args.num_queries,
                    count,
                    dim,
                    dtype_name,
                    args.repeats,
                    max(peak.values()),
                )
        print(
            f"\n**Exhaustive scoring, {args.num_queries} queries, random unit vectors "
            f"(R_q={R_Q}, R_c={R_C}); candidates: "
            + ", ".join(f"{count} at D={dim}" for dim, count in counts.items())
            + "**"
        )
        print_scoring_table(rows, peaks)
    if not args.skip_index:
        bench_index_search(peers, args)
    if not args.skip_recall:
        bench_recall(args)
    print(f"\nat end: {machine_load.describe()}")


if __name__ == "__main__":
    main()
