"""Per-device cost of a recipe's train step at its real size, compiled ahead of time on CPU.

No weights and no accelerator: the model is built with `nnx.eval_shape` (abstract arrays with
their shardings), the batch is `jax.ShapeDtypeStruct`s, and the jitted train step is lowered and
compiled for CPU devices standing in for the recipe's mesh (`--devices`, set through XLA_FLAGS
before jax is imported). Prints, per device: parameter and optimizer bytes (exact, from the
shardings), XLA's argument and peak temporary bytes (`memory_analysis`; temporaries are the
activations and gradients), whether the step fits in 80 GB (A100 / H100) and 95 GB (TPU v5p),
FLOPs per step and the step time at 40% MFU on each chip.

FLOPs: `cost_analysis()` counts a scanned body once (the layer stacks are scanned), so it is
printed for reference only; the step's FLOPs are counted analytically (`analytic_flops`: every
matmul and attention product of the forward, x3 for the trained language model under full
remat (forward, recomputation, backward), x1 for the frozen vision tower, whose backward XLA
drops). XLA:CPU's memory figures stand in for an accelerator's: the same program, but a
different compiler's fusion and scheduling, so treat them as estimates.

    python -m benchmarks.recipe_cost --recipe 7b [--seq 2048] [--patches 4096] [--devices 8]
    python -m benchmarks.recipe_cost --recipe 7b --grad_accum 8   # micro-batches of 48

With gradient accumulation one micro-batch's step is compiled (memory: that program's; FLOPs:
times the number of micro-batches). Accumulation changes the method: in-batch negatives then
come from the micro-batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np  # numpy only: jax must be imported after XLA_FLAGS is set

PUBLISHED = {  # published Qwen2.5-VL-{3B,7B,32B}-Instruct sizes
    "3b": dict(hidden=2048, inter=11008, layers=36, heads=16, kv=2, vocab=151936),
    "7b": dict(hidden=3584, inter=18944, layers=28, heads=28, kv=4, vocab=152064),
    "32b": dict(hidden=5120, inter=27648, layers=64, heads=40, kv=8, vocab=152064),
}
VISION = dict(depth=32, hidden=1280, inter=3420, heads=16, window=112, full=(7, 15, 23, 31))
DEVICES = {"3b": 8, "7b": 8, "32b": 16}
CHIPS = {
    "A100 (80 GB)": (80e9, 312e12),
    "H100 (80 GB)": (80e9, 989e12),
    "v5p (95 GB)": (95e9, 459e12),
}
MFU = 0.40


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(PUBLISHED), required=True)
    parser.add_argument("--devices", type=int, default=0, help="0 = the recipe's mesh size")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per input (all sides)")
    parser.add_argument("--patches", type=int, default=4096, help="patches per input (1 image)")
    parser.add_argument("--text_layers", type=int, default=0, help="0 = published depth")
    parser.add_argument("--vision_depth", type=int, default=0, help="0 = published depth")
    parser.add_argument("--grad_accum", type=int, default=0, help="0 = the recipe's")
    parser.add_argument("--fsdp", type=int, default=0, help="0 = the recipe's")
    parser.add_argument("--tensor", type=int, default=0, help="0 = the recipe's")
    return parser.parse_args()


def hf_config(recipe: str, text_layers: int, vision_depth: int) -> dict:
    size = PUBLISHED[recipe]
    depth = vision_depth or VISION["depth"]
    full = tuple(i for i in VISION["full"] if i < depth) or (depth - 1,)
    return dict(
        model_type="qwen2_5_vl",
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=text_layers or size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv"],
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6),
        image_token_id=151655,
        vision_config=dict(
            depth=depth,
            hidden_size=VISION["hidden"],
            intermediate_size=VISION["inter"],
            num_heads=VISION["heads"],
            out_hidden_size=size["hidden"],
            window_size=VISION["window"],
            fullatt_block_indexes=list(full),
            spatial_merge_size=2,
            patch_size=14,
            temporal_patch_size=2,
            in_channels=3,
        ),
    )


def analytic_flops(hf: dict, examples: int, seq: int, patches: int, r_meta: int) -> float:
    """FLOPs of one train step for `examples` inputs (all sides) of `seq` tokens + `r_meta` meta
    tokens and one image of `patches` patches each (see the module docstring)."""
    hidden, inter = hf["hidden_size"], hf["intermediate_size"]
    heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hidden // heads
    tokens = seq + r_meta
    per_token = 2 * (hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden)
    per_token += 2 * 3 * hidden * inter
    attention = 2 * 2 * tokens * tokens * heads * head_dim  # QK^T and PV, full square
    text = hf["num_hidden_layers"] * (tokens * per_token + attention)
    vision = hf["vision_config"]
    width, v_inter, depth = vision["hidden_size"], vision["intermediate_size"], vision["depth"]
    per_patch = 2 * (4 * width * width + 3 * width * v_inter)
    full_blocks = len(vision["fullatt_block_indexes"])
    span = (vision["window_size"] // 14) ** 2  # patches per window
    attn_full = 4 * patches * patches * width
    attn_window = 4 * patches * span * width
    tower = depth * patches * per_patch + full_blocks * attn_full
    tower += (depth - full_blocks) * attn_window
    merged = 4 * width
    tower += 2 * (patches // 4) * (merged * merged + merged * hidden)
    return examples * (3 * text + tower)


def main(args) -> None:
    devices = args.devices or DEVICES[args.recipe]
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    )
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from metaembed_jax import sharding
    from metaembed_jax.metaembed import MetaEmbed
    from metaembed_jax.training import model as model_lib
    from metaembed_jax.training.config import loss_groups
    from metaembed_jax.training.recipes import load_recipe
    from metaembed_jax.training.state import (
        TrainState,
        make_optimizer,
        state_shardings,
        trainable_filter,
    )
    from metaembed_jax.training.step import train_step

    config = load_recipe(f"configs/qwen2_5_vl_{args.recipe}.py")
    for name in ("fsdp", "tensor"):
        if getattr(args, name):
            config.mesh[name] = getattr(args, name)
    if args.grad_accum:
        config.train.grad_accum_steps = args.grad_accum
    hf = hf_config(args.recipe, args.text_layers, args.vision_depth)
    mesh = sharding.make_mesh(dict(config.mesh), jax.devices()[:devices])
    kwargs = model_lib.model_kwargs(config)
    abstract = nnx.eval_shape(lambda: MetaEmbed.from_config(hf, rngs=nnx.Rngs(0), **kwargs))
    lora = bool(config.lora.enabled)
    graphdef, params, frozen, other = nnx.split(abstract, trainable_filter(lora), nnx.Param, ...)
    tx, schedule = make_optimizer(config.optimizer, int(config.train.steps))

    def with_shardings(tree, shardings):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )

    params = with_shardings(params, sharding.state_shardings(params, mesh))
    frozen = with_shardings(frozen, sharding.state_shardings(frozen, mesh))
    replicated = NamedSharding(mesh, P())
    other = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), other
    )
    opt_state = jax.eval_shape(tx.init, params)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = TrainState(step, params, frozen, other, opt_state, graphdef, tx)
    shardings = state_shardings(state, mesh)
    state = with_shardings(state, shardings)

    accum = int(config.train.grad_accum_steps)
    micro = int(config.train.batch_size) // accum
    patch_dim = 3 * 2 * 14 * 14

    def side(length):
        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(
                shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
            )

        return {
            "input_ids": spec((micro, length), jnp.int32),
            "attention_mask": spec((micro, length), jnp.int32),
            "pixel_values": spec((micro, args.patches, patch_dim), jnp.float32),
            "image_grid_thw": spec((micro, 1, 3), jnp.int32),
        }

    hard_negatives = bool(config.data.hard_negatives)
    sides = ("query", "positive") + (("negative",) if hard_negatives else ())
    # One micro-batch's program: the step unrolls its micro-batches, so `accum` copies would
    # multiply the compile time; they run one after another, so memory is about one's (plus the
    # accumulated gradients of the trained parameters) and the FLOPs are `accum` times one's.
    batch = {name: side(args.seq) for name in sides}
    fn = jax.jit(
        lambda state, batch: train_step(
            state,
            batch,
            groups=loss_groups(config),
            temperature=float(config.loss.temperature),
            schedule=schedule,
            mesh=mesh,
        ),
        in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, batch)),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    start = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    report(args, config, hf, mesh, state, compiled, compile_s, micro, accum, len(sides))


def _per_device_bytes(tree) -> int:
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * leaf.dtype.itemsize
    return total


def report(args, config, hf, mesh, state, compiled, compile_s, micro, accum, num_sides) -> None:
    gb = 1e9
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost

    devices = mesh.devices.size
    # Tensor parallelism splits an example's FLOPs over its `tensor` devices too.
    examples_per_device = micro * accum * num_sides / devices  # all micro-batches
    flops = analytic_flops(
        hf, examples_per_device, args.seq, args.patches, int(config.model.num_candidate_tokens)
    )
    param_b = _per_device_bytes(state.params) + _per_device_bytes(state.frozen)
    opt_b = _per_device_bytes(state.opt_state)
    temp_b = memory.temp_size_in_bytes
    peak = memory.argument_size_in_bytes + temp_b  # outputs alias the donated state
    print(
        f"recipe qwen2_5_vl_{args.recipe}: mesh {dict(mesh.shape)} on {devices} CPU devices, "
        f"text layers {hf['num_hidden_layers']}, vision depth {hf['vision_config']['depth']}, "
        f"micro-batch {micro} x {accum} accumulation (one micro-batch compiled), {num_sides} "
        f"sides of {args.seq} tokens + "
        f"one {args.patches}-patch image, remat {config.model.remat}; compiled in {compile_s:.0f} s"
    )
    print("\n| per device | value |\n|---|---|")
    rows = [
        ("parameters (trained + frozen), GB", f"{param_b / gb:.2f}"),
        ("optimizer state, GB", f"{opt_b / gb:.3f}"),
        ("XLA arguments (state + batch), GB", f"{memory.argument_size_in_bytes / gb:.2f}"),
        ("XLA peak temporaries (activations, gradients), GB", f"{temp_b / gb:.2f}"),
        ("arguments + temporaries, GB", f"{peak / gb:.2f}"),
        ("cost_analysis FLOPs (scanned bodies counted once)", f"{cost.get('flops', 0):.3e}"),
        ("analytic FLOPs per step", f"{flops:.3e}"),
    ]
    for name, (hbm, peak_flops) in CHIPS.items():
        fits = "yes" if peak <= hbm else "no"
        seconds = flops / (peak_flops * MFU)
        rows.append((f"{name}: fits / step time at {MFU:.0%} MFU", f"{fits} / {seconds:.1f} s"))
    for row in rows:
        print(f"| {row[0]} | {row[1]} |")


if __name__ == "__main__":
    sys.exit(main(parse_args()))
