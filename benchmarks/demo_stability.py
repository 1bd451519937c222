"""How sensitive is a training recipe to rounding? The same run on 1 CPU device and on a 4 x 2
(data x fsdp) mesh of 8 virtual CPU devices: same data, seed and global batch; only the order of
the floating-point sums differs. Prints the largest |loss difference| per window of steps and
whether the first `--within` steps stay within `--tolerance`. The runs are the recipe's own
first `--steps` steps (its warm-up and schedule over its `train.steps`; `train.stop_after` ends
them), as in a full run. (Until 2026-12-06 the script set `train.steps` to `--steps`, which
compressed the schedule into those steps.)

    python benchmarks/demo_stability.py                       # configs/demo.py, 100 steps
    python benchmarks/demo_stability.py --steps 40 -- --config.loss.temperature=0.1
    python benchmarks/demo_stability.py --smoke   # 3 steps of a tiny demo (a test runs it)

Arguments after `--` are passed to both train.py runs (config overrides). The dataset must have
been built (`python -m metaembed_jax data --config configs/demo.py`, or `--data DIR`).
Runs go to `--workdir` (default runs/stability/{one,eight}); a finished run is reused.
`--smoke`: 3 steps of the demo recipe at benchmarks/demo_smoke.py's sizes, on a dataset of that
size built first under `--workdir` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import demo_smoke, machine_load  # noqa: E402

# The eight-device run adds the device count to the inherited XLA_FLAGS, so that both runs
# compile with the same other XLA settings.
_EIGHT_FLAGS = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
MESHES = {
    "one": ({}, ["--config.mesh.data=1", "--config.mesh.fsdp=1"]),
    "eight": (
        {"XLA_FLAGS": _EIGHT_FLAGS.strip()},
        ["--config.mesh.data=4", "--config.mesh.fsdp=2"],
    ),
}
WINDOWS = ((1, 10), (11, 25), (26, 50), (51, 75), (76, 100), (101, 10**9))


def logged_losses(workdir: Path) -> dict[int, float]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows}


def train(name: str, workdir: Path, args, overrides: list[str]) -> dict[int, float]:
    losses = logged_losses(workdir)
    if len(losses) >= args.steps:
        print(f"{name}: reusing {workdir}")
        return losses
    env, mesh = MESHES[name]
    command = [sys.executable, str(REPO / "train.py"), f"--config={args.config}",
               f"--workdir={workdir}", f"--config.train.stop_after={args.steps}",
               "--config.train.log_every=1", f"--config.checkpoint.every={10**6}",
               "--config.train.progress_bar=False", *mesh, *overrides]  # fmt: skip
    if args.data:
        command.append(f"--config.data.dir={args.data}")
    print(f"{name}: training {args.steps} steps -> {workdir}", flush=True)
    subprocess.run(["rm", "-rf", str(workdir)], check=True)
    subprocess.run(command, env={**os.environ, **env, "PYTHONPATH": str(REPO)}, check=True)
    return logged_losses(workdir)


def build_smoke_data(args, data_dir: Path) -> None:
    """The recipe's dataset at `demo_smoke`'s sizes, as `metaembed data` builds it."""
    command = [sys.executable, "-m", "metaembed_jax", "data", f"--config={args.config}",
               f"--config.data.dir={data_dir}", *demo_smoke.flags()]  # fmt: skip
    print(f"building the smoke dataset -> {data_dir}", flush=True)
    subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    args.data = str(data_dir)


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.py"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--within", type=int, default=100, help="steps the tolerance covers")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--data", default="", help="dataset dir (default: the config's)")
    parser.add_argument("--workdir", default=None, help="default: runs/stability")
    parser.add_argument("--smoke", action="store_true", help="3 steps, tiny model and dataset")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = args.within = 3
    return args


def compare(args, overrides: list[str]) -> None:
    """Trains (or reuses) both runs under `args.workdir` and prints their loss differences."""
    runs = {name: train(name, Path(args.workdir) / name, args, overrides) for name in MESHES}
    steps = sorted(set(runs["one"]) & set(runs["eight"]))
    difference = {s: abs(runs["one"][s] - runs["eight"][s]) for s in steps}
    print(f"|loss on 1 device - loss on 4 x 2 devices| ({args.config} {' '.join(overrides)})")
    for low, high in WINDOWS:
        window = [difference[s] for s in steps if low <= s <= high]
        if window:
            print(f"  steps {low:4d}-{min(high, steps[-1]):4d}: max {max(window):.2e}")
    covered = [difference[s] for s in steps if s <= args.within]
    worst = max(covered) if covered else float("nan")
    verdict = "yes" if covered and worst <= args.tolerance else "no"
    print(f"[{verdict}] first {args.within} steps within {args.tolerance:g}: max {worst:.2e}")
    print(
        f"loss at step {steps[-1]}: {runs['one'][steps[-1]]:.4f} / {runs['eight'][steps[-1]]:.4f}"
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = parse_args(argv)
    print(machine_load.describe())
    if not args.smoke:
        args.workdir = args.workdir or str(REPO / "runs" / "stability")
        compare(args, overrides)
    else:
        # A smoke run never reuses or overwrites the full runs under runs/stability.
        with tempfile.TemporaryDirectory(prefix="demo_stability_smoke_") as scratch:
            args.workdir = args.workdir or scratch
            if not args.data:
                build_smoke_data(args, Path(scratch) / "data")
            compare(args, [*demo_smoke.flags(), *overrides])
    print(machine_load.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
