"""Long-sequence attention: our reference path in query blocks vs in one piece vs torch's SDPA.

The case is Mllama's vision attention (transformers' `MllamaVisionAttention`): every tile of an
image attends to every other at once, 4 tiles x 1,032 patches = 4,128 rows, and a pair is masked
only when the query AND the key are padding (one real tile of 1,025 patches here). Same inputs
and mask on every side, float32, one process; prints the median of `--repeats` calls, the ratio
to torch, and the largest difference from the one-piece output.

    python benchmarks/bench_attention.py [--batch 2] [--length 4128] [--real 1025]
    python benchmarks/bench_attention.py --smoke   # tiny, seconds (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
import torch

from benchmarks import machine_load
from benchmarks.bench_encoder import interleaved_seconds
from metaembed_jax.models import layers


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=4128, help="rows (queries = keys)")
    parser.add_argument("--real", type=int, default=1025, help="real rows; the rest is padding")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes (still two query blocks), one repeat"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.heads, args.head_dim = 1, 2, 8
        args.length, args.real, args.repeats = layers.QUERY_BLOCK_ROWS + 8, 100, 1
    return args


def jitted_attention(block_rows: int, implementation: str):
    """Our attention with `layers.QUERY_BLOCK_ROWS` set while it traces (the first call)."""

    def run(query, key, value, mask):
        saved = layers.QUERY_BLOCK_ROWS
        layers.QUERY_BLOCK_ROWS = block_rows
        try:
            return layers.dot_product_attention(
                query, key, value, mask, implementation=implementation
            )
        finally:
            layers.QUERY_BLOCK_ROWS = saved

    return jax.jit(run)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__}, torch {torch.__version__}, {machine_load.describe()}")
    rng = np.random.default_rng(0)
    shape = (args.batch, args.length, args.heads, args.head_dim)
    query, key, value = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    padding = np.arange(args.length) >= args.real
    mask = ~(padding[:, None] & padding[None, :])[None, None]  # [1, 1, L, S]
    mask = np.array(np.broadcast_to(mask, (args.batch, 1, args.length, args.length)))
    sides = {
        f"reference, blocks of {layers.QUERY_BLOCK_ROWS}": (layers.QUERY_BLOCK_ROWS, "reference"),
        "reference, one block": (10**9, "reference"),
        "xla (jax.nn.dot_product_attention)": (layers.QUERY_BLOCK_ROWS, "xla"),
    }
    runs = {}
    for name, (rows, implementation) in sides.items():
        fn = jitted_attention(rows, implementation)
        runs[name] = lambda fn=fn: fn(query, key, value, mask).block_until_ready()
    heads_first = [torch.from_numpy(a).transpose(1, 2).contiguous() for a in (query, key, value)]
    torch_mask = torch.from_numpy(mask)

    def torch_sdpa():
        with torch.inference_mode():
            out = torch.nn.functional.scaled_dot_product_attention(
                *heads_first, attn_mask=torch_mask
            )
            return out.transpose(1, 2)

    runs["torch SDPA (bool mask)"] = torch_sdpa
    whole = np.asarray(runs["reference, one block"]())
    outputs = {name: np.asarray(run()) for name, run in runs.items()}
    seconds = interleaved_seconds(runs, args.repeats)
    torch_s = seconds["torch SDPA (bool mask)"]
    print(
        f"\nbatch {args.batch} x {args.heads} heads x {args.length} rows ({args.real} real), "
        f"head dim {args.head_dim}, float32, median of {args.repeats}\n"
    )
    print("| attention | s per call | torch / it | max abs diff vs one block |")
    print("|---|---|---|---|")
    for name, value_s in seconds.items():
        diff = float(np.abs(outputs[name] - whole).max())
        print(f"| {name} | {value_s:.3f} | {torch_s / value_s:.2f}x | {diff:.1e} |")
    print(f"\nat end: {machine_load.describe()}")


if __name__ == "__main__":
    main()
