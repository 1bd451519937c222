"""Gradient caching: compiled peak temporary memory and step time, one-shot vs cached steps.

The same global batch (queries, positives, one hard negative each, text-only, left-padded) is
trained as one contrastive batch in every row: by the one-shot step (grad_accum_steps = 1), and
by the gradient-cached step split into k = 1, 2, 4, 8 micro-batches. Memory = XLA's
`compile().memory_analysis()` of the jitted step: `temp` (activations and other scratch; the
figure caching divides by about k) and `args` (state + batch). It does not depend on the
machine's load; the step times do (`--steps 0` skips them). One process, one device.

    python benchmarks/bench_grad_cache.py [--hidden 128 --layers 2 --batch 32 --length 256]
    python benchmarks/bench_grad_cache.py --model 7b --batch 48 --length 512
    python benchmarks/bench_grad_cache.py --smoke [--model 7b]   # tiny, seconds (a test runs it)

`--model 7b`: the reference recipe's model and settings (Qwen2.5-VL-7B shapes from its published
config.json, LoRA r=32 with dropout, bfloat16 compute, full remat), compiled from abstract shapes
(nothing allocated, no checkpoint needed, memory only); `--batch` is then one device's share of
the global batch (the recipe's 384 over 8 devices: 48).

`--smoke`: hidden 32, 1 layer, batch 4 x length 8, k = 2, one timed step; with `--model 7b` the
recipe's settings on those tiny shapes instead of the 7B ones (still abstract, memory only).
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
from metaembed_jax.models.qwen2_vl import tiny_config
from metaembed_jax.training.model import build_model
from metaembed_jax.training.state import create_train_state, make_optimizer
from metaembed_jax.training.step import TrainStep
from tests import helpers

MIB = 2.0**20

# Qwen2.5-VL-7B-Instruct's published config.json (the fields the model reads).
QWEN2_5_VL_7B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=128000,
    rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)
QWEN2_5_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)


def recipe_7b_config(shapes_7b: bool = True):
    """The reference recipe's model settings on the 7B shapes (random init, abstract only);
    `shapes_7b` False keeps `tiny_config`'s shapes (the smoke run)."""
    hf = tiny_config()
    if shapes_7b:
        hf["text_config"].update(QWEN2_5_VL_7B_TEXT)
        hf["vision_config"].update(QWEN2_5_VL_7B_VISION)
    config = helpers.tiny_run_config()
    config.model.hf_config = ConfigDict(hf)
    config.model.dtype, config.model.remat = "bfloat16", "full"
    config.lora.enabled, config.lora.rank, config.lora.alpha = True, 32, 32.0
    config.lora.dropout = 0.1
    return config


def abstract_state(config, tx):
    """The TrainState's shapes and dtypes, without allocating it."""
    return jax.eval_shape(
        lambda: create_train_state(build_model(config), tx, lora=bool(config.lora.enabled))
    )


def split(batch: dict, count: int) -> tuple:
    """A text-only batch -> `count` micro-batches of consecutive examples."""
    size = batch["query"]["input_ids"].shape[0] // count

    def part(x, i):
        if isinstance(x, jax.ShapeDtypeStruct):  # abstract (--model 7b)
            return jax.ShapeDtypeStruct((size, *x.shape[1:]), x.dtype)
        return x[i * size : (i + 1) * size]

    return tuple(jax.tree.map(lambda x, i=i: part(x, i), batch) for i in range(count))


def compiled_step(step: TrainStep, state, batch):
    return step._jitted(state, batch).lower(state, batch).compile()


def measure(step: TrainStep, state, batch, steps: int):
    """(temp bytes, argument bytes, median step seconds or nan, the state after the steps)."""
    memory = compiled_step(step, state, batch).memory_analysis()
    if not steps:
        return memory.temp_size_in_bytes, memory.argument_size_in_bytes, float("nan"), state
    seconds = []
    for i in range(steps + 1):  # the first call compiles
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i:
            seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds)) if seconds else float("nan")
    return memory.temp_size_in_bytes, memory.argument_size_in_bytes, median, state


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (0: none)")
    parser.add_argument("--counts", default="1,2,4,8")
    parser.add_argument("--model", default="tiny", choices=("tiny", "7b"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, k = 2, one step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.batch, args.length = 32, 1, 4, 8
        args.counts, args.steps = "2", 1
    return args


def main(argv=None):
    args = parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]

    if args.model == "7b":
        config = recipe_7b_config(shapes_7b=not args.smoke)
        args.steps = 0
    else:
        config = helpers.tiny_run_config()
        config.model.hf_config = ConfigDict(
            tiny_config(vocab_size=1024, hidden=args.hidden, layers=args.layers)
        )
        config.model.remat = args.remat
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    if args.model == "7b":
        state = abstract_state(config, tx)
        batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
            helpers.random_batch(0, batch=args.batch, length=args.length, vocab=1024),
        )
        shapes = "tiny shapes (smoke)" if args.smoke else "Qwen2.5-VL-7B shapes"
        described = f"{shapes}, LoRA r=32 dropout 0.1, bfloat16, remat full"
    else:
        state = create_train_state(build_model(config), tx, lora=False)
        batch = jax.tree.map(
            jnp.asarray,
            helpers.random_batch(0, batch=args.batch, length=args.length, vocab=1024),
        )
        described = f"hidden {args.hidden}, layers {args.layers}, remat {args.remat}"
    print(
        f"config: {described}, batch {args.batch} x 3 sides, length {args.length} + 80 meta "
        f"tokens, CPU, one device; {machine_load.describe()}"
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
