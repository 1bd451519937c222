"""Embeddings of a trained demo model for a large corpus, for `bench_scoring.py --embeddings`.

    python benchmarks/encode_demo_corpus.py --workdir runs/demo --out runs/demo/corpus20k.npz
    python benchmarks/bench_scoring.py --skip-scoring --embeddings runs/demo/corpus20k.npz

The demo's test split has only 768 corpus items, too few to time two-stage search. This renders
``--num-candidates`` distinct random scenes in the demo's data settings (text-to-image retrieval:
candidates are scene images, queries are captions of ``--num-queries`` of those scenes), encodes
them with the trained checkpoint, and saves ``queries [Nq, R_q, D]``, ``candidates [Nc, R_c, D]``
(float32) and ``targets [Nq]`` (the position of each query's own scene).

    python benchmarks/demo_stability.py --smoke --workdir W   # leaves a tiny run in W/one
    python benchmarks/encode_demo_corpus.py --smoke --workdir W/one   # 8 candidates, 2 queries

``--smoke``: the recipe at benchmarks/demo_smoke.py's sizes (the run must have been trained at
them), 8 candidates and 2 queries, written to a temporary file unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import demo_smoke, machine_load  # noqa: E402
from metaembed_jax.data import synthetic  # noqa: E402
from metaembed_jax.evaluation import runner  # noqa: E402
from metaembed_jax.training.recipes import load_recipe  # noqa: E402


def distinct_scenes(cfg: synthetic.SyntheticConfig, count: int, seed: int) -> list:
    """``count`` random scenes with pairwise different attributes (jitter is not one)."""
    rng, scenes, seen = random.Random(seed), [], set()
    for _ in range(100 * count):
        scene = synthetic.random_scene(rng, cfg)
        if scene.signature() not in seen:
            seen.add(scene.signature())
            scenes.append(scene)
            if len(scenes) == count:
                return scenes
    raise ValueError(f"only {len(scenes)} distinct scenes exist in these settings, not {count}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--workdir", default="runs/demo", help="the trained run")
    parser.add_argument("--out", default=None, help="default: runs/demo/corpus20k.npz")
    parser.add_argument("--num-candidates", type=int, default=20000)
    parser.add_argument("--num-queries", type=int, default=32)
    parser.add_argument("--seed", type=int, default=12345, help="scene sampling seed")
    parser.add_argument(
        "--smoke", action="store_true", help="demo_smoke.py's sizes, 8 candidates, 2 queries"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_candidates, args.num_queries = 8, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    print(f"at start: {machine_load.describe()}")
    if args.smoke and args.out is None:  # a smoke run leaves nothing behind
        with tempfile.TemporaryDirectory(prefix="encode_demo_corpus_smoke_") as scratch:
            encode_corpus(args, os.path.join(scratch, "corpus.npz"))
    else:
        encode_corpus(args, args.out or "runs/demo/corpus20k.npz")
    print(f"at end: {machine_load.describe()}")


def encode_corpus(args, out: str) -> None:
    """Renders, encodes and saves the corpus and queries to `out`."""
    config = load_recipe(args.config)
    if args.smoke:
        demo_smoke.apply(config)
    cfg = synthetic.SyntheticConfig.from_mapping(
        config.data.synthetic, ignore=("vocab_size",), progress=False
    )
    scenes = distinct_scenes(cfg, args.num_candidates, args.seed)
    renderer = synthetic._Renderer(cfg)
    targets = np.random.default_rng(args.seed).choice(len(scenes), args.num_queries, replace=False)
    candidates = [{"text": "", "image": renderer.image(scene)} for scene in scenes]
    queries = [{"text": renderer.text(scenes[t]), "image": None} for t in targets]

    run_dir, step = runner.checkpoint_location(args.workdir, None)
    encode = runner.LazyEncoder(config, run_dir, runner.find_step(run_dir, step))
    start = time.perf_counter()
    query_embeddings = encode(queries, "query")
    candidate_embeddings = encode(candidates, "candidate")
    seconds = time.perf_counter() - start
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        queries=np.asarray(query_embeddings, np.float32),
        candidates=np.asarray(candidate_embeddings, np.float32),
        targets=targets,
    )
    print(
        f"encoded {len(queries)} queries and {len(candidates)} candidates in {seconds:.0f} s "
        f"-> {out} (queries {query_embeddings.shape}, candidates {candidate_embeddings.shape})"
    )


if __name__ == "__main__":
    main()
