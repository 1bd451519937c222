"""Input pipeline throughput (batches/s) on the built-in dataset with the demo's data settings.

    python benchmarks/bench_pipeline.py [--config configs/demo.py] [--batch_size 32]
        [--batches 30] [--workers 0,2]
    python benchmarks/bench_pipeline.py --smoke   # 16 examples, 2 batches of 8 (a test runs it)

Peer: a plain Python loop doing the same work per batch (read records in the shuffled order,
decode PNGs, run the processor, pad to static shapes) in the main thread. Rows: that loop, the
grain pipeline with host batches, the grain pipeline producing global jax.Arrays on an 8-device
CPU mesh, and with grain worker processes. Ratios are vs the plain loop. The dataset is built
once under --data_dir (reused afterwards). Worker start-up is excluded (first batch not timed).
"""

import argparse
import tempfile
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from benchmarks import machine_load  # noqa: E402
from metaembed_jax.data import build, builders, pipeline  # noqa: E402
from metaembed_jax.models.qwen2_vl import FAMILY  # noqa: E402
from metaembed_jax.training.recipes import load_recipe  # noqa: E402


def demo_like_config(config_file: str, data_dir: str, num_train: int, num_eval: int = 16):
    """config.data of `config_file` (configs/demo.py), built under `data_dir`, smaller splits."""
    data = load_recipe(config_file).data
    data.dir = data_dir
    data.synthetic.update(num_train=num_train, num_val=num_eval, num_test=num_eval)
    return data


def plain_loop(config, processor, batch_size: int, batches: int) -> float:
    """Batches/s of the same work without grain (the peer)."""
    source = builders.open_pairs(pipeline.dataset_dir(config))
    order = np.random.default_rng(0).permutation(len(source))
    decode = pipeline.DecodeRecord("bench", config.hard_negatives)
    shapes = FAMILY.static_shapes(config, batch_size)
    collate = pipeline.Collate(processor, shapes, FAMILY.feature_keys, config.hard_negatives)
    start = None
    for step in range(batches + 1):
        if step == 1:
            start = time.perf_counter()
        indices = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
        collate([decode((int(i), source[int(i)])) for i in indices])
    return batches / (time.perf_counter() - start)


def grain_rate(config, processor, batch_size: int, batches: int, mesh) -> float:
    iterator = pipeline.make_train_iterator(
        config, processor, family=FAMILY, mesh=mesh, global_batch_size=batch_size, seed=0
    )
    jax.block_until_ready(next(iterator))  # start-up (workers, first reads) not timed
    start = time.perf_counter()
    for _ in range(batches):
        jax.block_until_ready(next(iterator))
    rate = batches / (time.perf_counter() - start)
    iterator.close()
    return rate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument(
        "--data_dir", default=None, help="where to build the data (default: a fresh temp dir)"
    )
    parser.add_argument("--num_train", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument(
        "--smoke", action="store_true", help="16 examples, 2 batches of 8, no worker processes"
    )
    args = parser.parse_args(argv)
    args.num_eval = 16  # val / test examples built (not read here)
    # Batch 8: the smallest the 8-device mesh takes. No worker processes: this script's code is
    # the same for every worker count, and starting them would be most of the smoke run's time.
    if args.smoke:
        args.num_train, args.num_eval, args.batch_size = 16, 4, 8
        args.batches, args.workers = 2, "0"
    print(f"at start: {machine_load.describe()}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        run(args, args.data_dir or scratch)


def run(args, data_dir: str) -> None:
    config = demo_like_config(args.config, data_dir, args.num_train, args.num_eval)
    build.build_synthetic(config, FAMILY.special_tokens, progress=False)
    processor = FAMILY.make_processor(config)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))

    rows = [("plain loop (peer)", plain_loop(config, processor, args.batch_size, args.batches))]
    for workers in [int(w) for w in args.workers.split(",")]:
        config.num_workers = workers
        rows.append(
            (
                f"grain, {workers} workers, host",
                grain_rate(config, processor, args.batch_size, args.batches, None),
            )
        )
        rows.append(
            (
                f"grain, {workers} workers, mesh 8",
                grain_rate(config, processor, args.batch_size, args.batches, mesh),
            )
        )
    peer = rows[0][1]
    print(f"\nbatch {args.batch_size}, {args.batches} batches, images <= {config.max_pixels} px")
    print(f"{'pipeline':32s} {'batches/s':>10s} {'examples/s':>11s} {'vs peer':>8s}")
    for name, rate in rows:
        print(f"{name:32s} {rate:10.2f} {rate * args.batch_size:11.1f} {rate / peer:7.2f}x")
    print(machine_load.describe())


if __name__ == "__main__":
    main()
