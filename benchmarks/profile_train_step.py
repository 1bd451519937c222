"""Where the JAX train step's time goes: a `jax.profiler` trace of the gradient computation,
summed per XLA operation (op times of every XLA thread added together).

    python benchmarks/profile_train_step.py --size representative [--top 25]
    python benchmarks/profile_train_step.py --smoke   # --size smoke, one call (a test runs it)

Builds the model and batch of `bench_train_step.py` (same sizes and flags), compiles the
forward + MMR loss + backward (`_grads_one`) once, runs it once to warm up, traces `--steps`
calls of the same executable, then reads
the trace with `jax.profiler.ProfileData` and prints the largest operations, their share of the
summed op time, and the share by kind (fusions are named after what XLA fused: `dot`, `copy`,
`reduce`, `dynamic-update-slice`, ...). Run it on a quiet machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import machine_load  # noqa: E402
from benchmarks.bench_train_step import (  # noqa: E402
    SIZES,
    apply_size,
    build_models,
    gradients,
    text_batch,
)
from metaembed_jax.training.state import create_train_state, make_optimizer  # noqa: E402


def build(args):
    """(train state, one batch) as `bench_train_step.py` builds them (weights via transformers)."""
    config, _, model = build_models(args)
    tx, _ = make_optimizer(config.optimizer, config.train.steps)
    state = create_train_state(model, tx, lora=False)
    batch = jax.tree.map(jnp.asarray, text_batch(0, args.batch, args.length, 1024))
    return state, batch


def op_kind(name: str) -> str:
    """An op's kind: its name without the numeric suffix XLA adds (`fusion.12` -> `fusion`)."""
    return re.sub(r"[.\d]+$", "", name)


def summed_op_times(trace_dir: str) -> collections.Counter:
    """{op name: summed duration in ms} over every XLA op event of the trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
    totals = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if "XLA Ops" not in line.name and "xla" not in line.name.lower():
                continue
            for event in line.events:
                if not event.name.startswith("ThunkExecutor"):  # spans around the ops below
                    totals[event.name] += event.duration_ns / 1e6
    return totals


def describe_ops(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: "shape, op_name"} from a compiled module's text, so that a fusion
    in the trace can be traced back to the JAX operation it came from."""
    pattern = re.compile(r'^\s*(?:ROOT )?%?([\w.-]+) = (\S+) .*?op_name="([^"]*)"', re.M)
    return {name: f"{shape} {op_name[-70:]}" for name, shape, op_name in pattern.findall(hlo_text)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="representative")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="--size smoke, one traced call")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.steps = "smoke", 1
    apply_size(args, args.size)
    jax.config.update("jax_default_matmul_precision", "highest")
    print(f"at start: {machine_load.describe()}")
    state, batch = build(args)
    # Compiled once: its text names the ops, and the same executable is warmed up and traced.
    compiled = gradients.lower(state, batch).compile()
    described = describe_ops(compiled.as_text())
    jax.block_until_ready(compiled(state, batch))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                jax.block_until_ready(compiled(state, batch))
        totals = summed_op_times(trace_dir)
    total = sum(totals.values())
    print(f"\nsummed op time over {args.steps} calls: {total:.0f} ms ({len(totals)} ops)\n")
    print("| op | ms per call | share | shape, from |\n|---|---|---|---|")
    for name, ms in totals.most_common(args.top):
        what = described.get(name, "")
        print(f"| {name} | {ms / args.steps:.1f} | {ms / total:.1%} | {what} |")
    kinds = collections.Counter()
    for name, ms in totals.items():
        kinds[op_kind(name)] += ms
    print("\n| kind | ms per call | share |\n|---|---|---|")
    for name, ms in kinds.most_common(15):
        print(f"| {name} | {ms / args.steps:.1f} | {ms / total:.1%} |")
    print(f"\nat end: {machine_load.describe()}")


if __name__ == "__main__":
    main()
