"""Gradient caching: compiled peak temporary memory and step time, one-shot vs cached steps.

The same global batch (queries, positives, one hard negative each, text-only, left-padded) is
trained as one contrastive batch in every row: by the one-shot step (grad_accum_steps = 1), and
by the gradient-cached step split into k = 1, 2, 4, 8 micro-batches. Memory = XLA's
`compile().memory_analysis()` of the jitted step: `temp` (activations and other scratch; the
figure caching divides by about k) and `args` (state + batch). It does not depend on the
machine's load; the step times do (`--steps 0` skips them). One process, one device.

    python benchmarks/bench_grad_cache.py [--hidden 128 --layers 4 --batch 32 --length 512]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from benchmarks import machine_load
from metaembed_jax.losses import MMR_GROUPS
from metaembed_jax.training import testing
from metaembed_jax.training.model import build_model
from metaembed_jax.training.state import create_train_state, make_optimizer
from metaembed_jax.training.step import TrainStep

MIB = 2.0**20


def split(batch: dict, count: int) -> tuple:
    """A text-only batch -> `count` micro-batches of consecutive examples."""
    size = batch["query"]["input_ids"].shape[0] // count
    return tuple(
        jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], batch) for i in range(count)
    )


def compiled_step(step: TrainStep, state, batch):
    return step._jitted(state, batch).lower(state, batch).compile()


def measure(step: TrainStep, state, batch, steps: int):
    """(temp bytes, argument bytes, median step seconds or nan, the state after the steps)."""
    memory = compiled_step(step, state, batch).memory_analysis()
    seconds = []
    for i in range(steps + 1):  # the first call compiles
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i:
            seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds)) if seconds else float("nan")
    return memory.temp_size_in_bytes, memory.argument_size_in_bytes, median, state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (0: none)")
    parser.add_argument("--counts", default="1,2,4,8")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    config = testing.tiny_config()
    config.model.hf_config = ConfigDict(
        testing.tiny_hf_config(vocab_size=1024, hidden=args.hidden, layers=args.layers)
    )
    config.model.remat = args.remat
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    state = create_train_state(build_model(config), tx, lora=False)
    batch = jax.tree.map(
        jnp.asarray,
        testing.random_batch(0, batch=args.batch, length=args.length, vocab=1024),
    )
    print(
        f"config: hidden {args.hidden}, layers {args.layers}, global batch {args.batch} x 3 "
        f"sides, length {args.length} + 80 meta tokens, remat {args.remat}, CPU, one device; "
        f"{machine_load.describe()}"
    )
    rows = [("one-shot", 1, False)] + [("cached", count, True) for count in counts]
    print(
        f"{'step':<10}{'k':>3}{'temp (MiB)':>12}{'vs one-shot':>13}{'args (MiB)':>12}"
        f"{'step (s)':>10}"
    )
    one_shot_temp = None
    for name, count, cached in rows:
        step = TrainStep(
            state, groups=MMR_GROUPS, temperature=0.03, schedule=schedule, grad_cache=cached
        )
        micro = split(batch, count) if cached else batch
        temp, arguments, seconds, state = measure(step, state, micro, args.steps)
        one_shot_temp = one_shot_temp or temp
        print(
            f"{name:<10}{count:>3}{temp / MIB:>12.1f}{temp / one_shot_temp:>13.2f}"
            f"{arguments / MIB:>12.1f}{seconds:>10.3f}"
        )
    print(machine_load.describe())


if __name__ == "__main__":
    main()
