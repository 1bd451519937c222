"""The MMR loss's scoring: each group scored anew with `scoring.maxsim` (the loss's way) vs every
group's scores from one (16, 64) similarity and a running max over candidate vectors. Compiled
FLOPs and bytes of the loss and its gradient (`cost_analysis`, machine-load independent), plus
a rough wall time.

    python -m benchmarks.mmr_loss_cost [--batch 384] [--dim 3584] [--negatives 1]
    python -m benchmarks.mmr_loss_cost --smoke   # tiny, seconds (tests/test_benchmarks.py)

The per-group variant is run with every candidate in one chunk so that its `fori_loop` runs
once and `cost_analysis` (which counts a loop body once) counts it fully.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import machine_load
from metaembed_jax import losses
from metaembed_jax.scoring import maxsim


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=384)
    parser.add_argument("--dim", type=int, default=3584)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="batch 4, dim 8, one repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.dim, args.repeats = 4, 8, 1
    return args


def per_group_sums(q, pos, neg, targets, groups, temperature):
    """The loss's core with one chunk per MaxSim (so cost_analysis counts it fully)."""
    sums = []
    for r_q, r_c, _ in groups:
        q_g = q[:, :r_q]
        logits = maxsim(q_g, pos, budget=(r_q, r_c), chunk_size=pos.shape[0])
        if neg is not None:

            def own(query, negs, b=(r_q, r_c)):
                return maxsim(query[None], negs, budget=b, chunk_size=negs.shape[0])[0]

            logits = jnp.concatenate([logits, jax.vmap(own)(q_g, neg)], axis=1)
        log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
        sums.append(-jnp.sum(jnp.take_along_axis(log_probs, targets[:, None], axis=1)[:, 0]))
    return jnp.stack(sums)


def shared_scores(q, candidates, groups):
    """`[G, b, N]`: the (max r_q, max r_c) similarities once, a running max over the candidate
    vectors gives every r_c prefix's max, summed over the first r_q query vectors."""
    r_q_max = max(g[0] for g in groups)
    r_c_max = max(g[1] for g in groups)
    spec = "iqd,ncd->inqc" if candidates.ndim == 3 else "iqd,incd->inqc"
    sims = jnp.einsum(
        spec, q[:, :r_q_max], candidates[..., :r_c_max, :], preferred_element_type=jnp.float32
    )
    prefix_max = jax.lax.cummax(sims, axis=3)
    return jnp.stack([prefix_max[:, :, :r_q, r_c - 1].sum(axis=2) for r_q, r_c, _ in groups])


def shared_sums(q, pos, neg, targets, groups, temperature):
    logits = shared_scores(q, pos, groups)
    if neg is not None:
        logits = jnp.concatenate([logits, shared_scores(q, neg, groups)], axis=2)
    log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[None, :, None], axis=2)[..., 0]
    return -jnp.sum(picked, axis=1)


def loss_and_grad(core):
    def loss(q, pos, neg):
        targets = jnp.arange(q.shape[0])
        return jnp.sum(core(q, pos, neg, targets, losses.MMR_GROUPS, 0.03))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> None:
    args = parse_args(argv)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (args.batch, 16, args.dim), jnp.float32)
    pos = jax.random.normal(keys[1], (args.batch, 64, args.dim), jnp.float32)
    neg = jax.random.normal(keys[2], (args.batch, args.negatives, 64, args.dim), jnp.float32)
    print(f"batch {args.batch}, dim {args.dim}, {args.negatives} hard negative(s); "
          f"{machine_load.describe()}\n")  # fmt: skip
    variants = {
        "per group (the loss)": loss_and_grad(per_group_sums),
        "one (16, 64) similarity": loss_and_grad(shared_sums),
    }
    values, costs = {}, {}
    print("| scoring | GFLOPs (loss + grad) | GB accessed | wall, s (rough) |")
    print("|---|---|---|---|")
    for name, fn in variants.items():
        compiled = fn.lower(q, pos, neg).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        values[name] = jax.block_until_ready(compiled(q, pos, neg))
        start = time.perf_counter()
        for _ in range(args.repeats):
            jax.block_until_ready(compiled(q, pos, neg))
        seconds = (time.perf_counter() - start) / args.repeats
        costs[name] = (cost.get("flops", 0), cost.get("bytes accessed", 0), seconds)
        print(
            f"| {name} | {cost.get('flops', 0) / 1e9:.2f} | "
            f"{cost.get('bytes accessed', 0) / 1e9:.2f} | {seconds:.3f} |"
        )
    (a, _), (b, _) = values.values()
    print(f"\nloss values: {float(a):.6f} vs {float(b):.6f}")
    print("per group / one similarity: " + ratios(*costs.values()))
    print(f"\nat end: {machine_load.describe()}")


def ratios(per_group, shared) -> str:
    """FLOPs, bytes and wall-time ratios of the two variants ("-" where the peer's is 0)."""
    cells = [
        f"{name} {a / b:.2f}x" if b else f"{name} -"
        for name, a, b in zip(("FLOPs", "bytes", "wall"), per_group, shared, strict=True)
    ]
    return ", ".join(cells)


if __name__ == "__main__":
    sys.exit(main())
