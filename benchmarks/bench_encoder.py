"""Encoder forward throughput: our jitted JAX Qwen2.5-VL backbone vs transformers' PyTorch model
(and PaliGemma and Mllama rows: the full forward of a mid-size PaliGemma / Llama-3.2-Vision,
same comparison).

One process, same random weights (the HF model is saved with `save_pretrained` and loaded with
`load_hf`), same inputs, float32, the same thread count for both. Mid-size config: hidden 512,
8 decoder layers, vision depth 8; each example is one 224x224 image + 32 text tokens.
Also prints the compile time of the jitted forward for 4 vs 16 layers (decoder and vision depth):
the layer stacks are scanned, so it should stay nearly flat.

    python -m benchmarks.bench_encoder [--batch 8] [--repeats 5] [--threads N]
    python -m benchmarks.bench_encoder --size large   # hidden 1024, 8+8 layers, 448 px + 64 tokens
    python -m benchmarks.bench_encoder --images_only  # just the vision tower's images line
    python -m benchmarks.bench_encoder --smoke        # every part at tiny sizes (a test runs it)

Also prints the "linear in images" line: the JAX tower's forward (4 blocks, width 256, 2 of them
full attention) on 8 images of 448 px packed in one batch, against 8 times one image, with the
per-image bound (the per-example layout's) and without it (attention over the packed sequence).

Prints a markdown table and the machine's load (a loaded machine inflates absolute times).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from PIL import Image

from benchmarks import machine_load
from metaembed_jax.models import from_config, load_hf


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text_tokens", type=int, default=None, help="default: the size's")
    parser.add_argument("--image_size", type=int, default=None, help="default: the size's")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per framework")
    # XLA's CPU client uses every core of the machine; torch is given the same count.
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--skip_compile", action="store_true", help="skip the 4 vs 16 layers part")
    parser.add_argument(
        "--paligemma_layers",
        type=int,
        default=8,
        help="decoder = SigLIP depth of the PaliGemma row",
    )
    parser.add_argument(
        "--mllama_layers", type=int, default=8, help="decoder = vision depth of the Mllama row"
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--images_only", action="store_true", help="only the images line")
    parser.add_argument(
        "--peak_tflops", type=float, default=0.0, help="the machine's peak, for MFU (0 = skip)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="--size smoke, batch 2, one repeat, tiny rows"
    )
    args = parser.parse_args(argv)
    # The images line: `line_images` images of `line_pixels` px; the compile part's depths.
    args.line_images, args.line_pixels, args.compile_depths = 8, 448, (4, 16)
    if args.smoke:
        args.size, args.batch, args.repeats = "smoke", 2, 1
        args.paligemma_layers, args.mllama_layers = 1, 3
        args.line_images, args.line_pixels, args.compile_depths = 2, 56, (2, 4)
    for name, value in SIZES[args.size]["defaults"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


IMAGE_PAD, VISION_START, VISION_END = 1000, 1001, 1002


# mid: the default (hidden 512); large: the larger size (hidden 1024, 8+8 layers);
# smoke: the tiniest that keeps head dim 64 and windowed vision blocks (2 + 4 layers).
SIZES = {
    "mid": dict(
        text=dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8),
        vision=dict(hidden_size=256, intermediate_size=704, num_heads=4),
        defaults=dict(text_tokens=32, image_size=224),
        layers=(8, 8),
    ),
    "large": dict(
        text=dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16),
        vision=dict(hidden_size=512, intermediate_size=1408, num_heads=8),
        defaults=dict(text_tokens=64, image_size=448),
        layers=(8, 8),
    ),
    "smoke": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_attention_heads=2),
        vision=dict(hidden_size=32, intermediate_size=64, num_heads=2),
        defaults=dict(text_tokens=4, image_size=56),
        layers=(2, 4),
    ),
}


def mid_config(
    num_layers: int | None = None, vision_depth: int | None = None, size: str = "mid"
) -> transformers.Qwen2_5_VLConfig:
    """The `size`'s config; `num_layers` / `vision_depth` default to its `layers`."""
    sizes = SIZES[size]
    num_layers = num_layers or sizes["layers"][0]
    vision_depth = vision_depth or sizes["layers"][1]
    text = dict(
        vocab_size=1024,
        num_hidden_layers=num_layers,
        num_key_value_heads=2,
        # head_dim 64 at both sizes: the sections sum to head_dim / 2
        rope_parameters=dict(rope_type="default", mrope_section=[8, 12, 12], rope_theta=1e6),
        **sizes["text"],
    )
    vision = dict(
        depth=vision_depth,
        out_hidden_size=sizes["text"]["hidden_size"],
        window_size=112,
        fullatt_block_indexes=[vision_depth // 2 - 1, vision_depth - 1],
        **sizes["vision"],
    )
    return transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_PAD,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )


def make_inputs(batch: int, text_tokens: int, image_size: int, seed: int = 0) -> dict:
    """One random image + `text_tokens` random text tokens per example (no padding needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    rng = np.random.default_rng(seed)
    size = (image_size, image_size, 3)
    images = [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for _ in range(batch)]
    processed = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=image_size**2)(
        images=images, return_tensors="np"
    )
    grid = np.asarray(processed["image_grid_thw"], np.int32)
    pads = int(np.prod(grid[0])) // 4
    rows = [
        [VISION_START]
        + [IMAGE_PAD] * pads
        + [VISION_END]
        + rng.integers(1, 900, text_tokens).tolist()
        for _ in range(batch)
    ]
    input_ids = np.asarray(rows, np.int32)
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "pixel_values": np.asarray(processed["pixel_values"], np.float32),
        "image_grid_thw": grid,
    }


def interleaved_seconds(runs: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each callable; runs alternate so that load changes on a shared machine
    hit every framework alike. One untimed warm-up each (compilation for JAX)."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def torch_runs(hf_model, batch, embeds, positions) -> dict:
    """Full forward, vision tower alone, decoder alone (on the same embeddings / positions)."""
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
    tensors["input_ids"] = tensors["input_ids"].long()
    tensors["image_grid_thw"] = tensors["image_grid_thw"].long()
    tensors["mm_token_type_ids"] = (tensors["input_ids"] == IMAGE_PAD).int()
    embeds, positions = torch.from_numpy(np.array(embeds)), torch.from_numpy(np.array(positions))

    def forward():
        with torch.inference_mode():
            return hf_model.model(**tensors).last_hidden_state

    def vision():
        with torch.inference_mode():
            return hf_model.model.visual(
                tensors["pixel_values"], grid_thw=tensors["image_grid_thw"]
            )

    def decoder():
        with torch.inference_mode():
            return hf_model.model.language_model(
                inputs_embeds=embeds,
                attention_mask=tensors["attention_mask"],
                position_ids=positions.long(),
            )

    return {"forward": forward, "vision": vision, "decoder": decoder}


def jax_runs(model, batch) -> tuple[dict, jax.Array, jax.Array]:
    """The same three jitted, plus the embeddings and positions they feed the decoder."""
    graphdef, state = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    grid = batch["image_grid_thw"]
    # The per-example layout (the pipeline's default): one image per example, so a reshape.
    # Its patch budget bounds each image, and the tower attends per image.
    examples = batch["input_ids"].shape[0]
    per_example = {
        **batch,
        "pixel_values": batch["pixel_values"].reshape(examples, -1, batch["pixel_values"].shape[1]),
        "image_grid_thw": grid.reshape(examples, 1, 3),
    }
    patches = per_example["pixel_values"].shape[1]

    def call(method):
        return jax.jit(lambda state, *args: method(nnx.merge(graphdef, state), *args))

    forward = call(lambda m, b: m(**b))
    vision = call(lambda m, pixels, grid: m.visual(pixels, grid, max_image_patches=patches))
    decoder = call(lambda m, embeds, mask, positions: m.decode(embeds, mask, positions))
    embeds = call(lambda m, ids, pixels, grid: m.embed_inputs(ids, pixels, grid))(
        state, batch["input_ids"], batch["pixel_values"], grid
    )
    positions = model.position_ids(batch["input_ids"], batch["attention_mask"], grid)
    runs = {
        "forward": lambda: forward(state, per_example).block_until_ready(),
        "vision": lambda: vision(state, batch["pixel_values"], grid).block_until_ready(),
        "decoder": lambda: decoder(
            state, embeds, batch["attention_mask"], positions
        ).block_until_ready(),
    }
    return runs, embeds, positions


def throughput(args) -> list[tuple[str, ...]]:
    torch.manual_seed(0)
    hf_model = transformers.Qwen2_5_VLForConditionalGeneration(mid_config(size=args.size)).eval()
    batch = make_inputs(args.batch, args.text_tokens, args.image_size)
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        model = load_hf(directory, dtype=jnp.float32)
    runs_jax, embeds, positions = jax_runs(model, batch)
    runs_torch = torch_runs(hf_model, batch, embeds, positions)
    diff = float(np.abs(np.asarray(runs_jax["forward"]()) - runs_torch["forward"]().numpy()).max())
    runs = {f"jax {k}": v for k, v in runs_jax.items()}
    runs.update({f"torch {k}": v for k, v in runs_torch.items()})
    seconds = interleaved_seconds(runs, args.repeats)
    length = batch["input_ids"].shape[1]
    print(
        f"batch {args.batch} x {length} tokens ({length - args.text_tokens - 2} image tokens), "
        f"max abs diff of last hidden states JAX vs torch: {diff:.1e}\n"
    )
    # Rough MFU: 2 FLOPs per parameter per token (vision params per patch, decoder per token).
    params = {
        "vision": _count(model.visual),
        "decoder": _count(model) - _count(model.visual),
    }
    flops = {
        "vision": 2 * params["vision"] * batch["pixel_values"].shape[0],
        "decoder": 2 * params["decoder"] * batch["input_ids"].size,
    }
    flops["forward"] = flops["vision"] + flops["decoder"]
    rows = []
    for part in ("forward", "vision", "decoder"):
        torch_s, jax_s = seconds[f"torch {part}"], seconds[f"jax {part}"]
        mfu = "-"
        if args.peak_tflops:
            mfu = f"{flops[part] / jax_s / (args.peak_tflops * 1e12):.1%}"
        row = (part, f"{torch_s:.3f}", f"{jax_s:.3f}", f"{torch_s / jax_s:.2f}x")
        rows.append((*row, f"{flops[part] / jax_s / 1e9:.1f}", mfu))
    return rows


def _count(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def images_line(args) -> None:
    """The JAX tower on 8 images of 448 px (`args.line_images` of `args.line_pixels`) in one
    packed batch vs 8 times one image: with the per-image bound (attention per image) and
    without it (over the whole packed sequence)."""
    count, side = args.line_images, args.line_pixels
    size = "smoke" if args.smoke else "mid"
    config = mid_config(num_layers=1, vision_depth=4, size=size)
    tower = from_config(config, rngs=nnx.Rngs(0)).visual
    graphdef, state = nnx.split(tower)
    one = make_inputs(1, 0, side)
    packed = make_inputs(count, 0, side)
    patches = int(np.prod(one["image_grid_thw"][0]))

    def forward(bound):
        def run(state, pixels, grid):
            return nnx.merge(graphdef, state)(pixels, grid, max_image_patches=bound)

        return jax.jit(run)

    runs = {}
    for name, bound in (("per image", patches), ("packed, no bound", None)):
        fn = forward(bound)
        for images, batch in (("1", one), ("packed", packed)):
            pixels, grid = jnp.asarray(batch["pixel_values"]), jnp.asarray(batch["image_grid_thw"])
            runs[(name, images)] = lambda fn=fn, p=pixels, g=grid: fn(
                state, p, g
            ).block_until_ready()
    seconds = interleaved_seconds(runs, args.repeats)
    width = config.vision_config.hidden_size
    print(
        f"\nvision tower (4 blocks, width {width}, 2 full-attention), {side} px images "
        f"({patches} patches each), JAX jitted:\n"
    )
    print(
        f"| attention | 1 image, s | {count} images packed, s | "
        f"{count} images / ({count} x 1 image) |"
    )
    print("|---|---|---|---|")
    for name in ("per image", "packed, no bound"):
        single, together = seconds[(name, "1")], seconds[(name, "packed")]
        print(f"| {name} | {single:.3f} | {together:.3f} | {together / (count * single):.2f}x |")


def row_widths(args) -> tuple[dict, dict]:
    """(text, vision) widths of the PaliGemma and Mllama rows: the mid size's, or the smoke's."""
    size = SIZES["smoke" if args.smoke else "mid"]
    return size["text"], size["vision"]


def paligemma_forward(args) -> tuple[str, ...]:
    """The PaliGemma row: full forward of a mid-size PaliGemma (Gemma decoder, hidden 512,
    `--paligemma_layers` layers; SigLIP width 256, as deep; `--smoke`: the smoke size's widths),
    one `--image_size` image (its 14 px patches as `<image>` tokens) + `<bos>` +
    `--text_tokens` text tokens per example."""
    from metaembed_jax.models.paligemma import tiny_config as paligemma_config

    layers, (text, vision) = args.paligemma_layers, row_widths(args)
    config = paligemma_config(
        1024, image_size=args.image_size, hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"], num_hidden_layers=layers,
        num_attention_heads=text["num_attention_heads"], num_key_value_heads=1, head_dim=64,
    )  # fmt: skip
    config["vision_config"].update(
        hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=vision["num_heads"],
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = transformers.PaliGemmaForConditionalGeneration(
        transformers.PaliGemmaConfig(**config)
    ).eval()
    rng = np.random.default_rng(0)
    image_tokens = (args.image_size // 14) ** 2
    head = [config["image_token_index"]] * image_tokens + [2]  # <image> x T, <bos>
    rows = [head + rng.integers(4, 1000, args.text_tokens).tolist() for _ in range(args.batch)]
    input_ids = np.asarray(rows, np.int32)
    pixels = rng.normal(size=(args.batch, 3, args.image_size, args.image_size)).astype(np.float32)
    # token_type_ids of ones: transformers' causal path even without padding (the model's
    # docstring: its SDPA path is bidirectional for an unpadded batch without them).
    batch = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
    batch.update(pixel_values=pixels, token_type_ids=np.ones_like(input_ids))
    diff, seconds = jax_vs_torch(hf_model, batch, args.repeats, jax_drop=("token_type_ids",))
    print(
        f"PaliGemma: batch {args.batch} x {input_ids.shape[1]} tokens ({image_tokens} image "
        f"tokens), max abs diff of last hidden states JAX vs torch: {diff:.1e}\n"
    )
    torch_s, jax_s = seconds["torch"], seconds["jax"]
    speedup = f"{torch_s / jax_s:.2f}x"
    return ("paligemma forward", f"{torch_s:.3f}", f"{jax_s:.3f}", speedup, "-", "-")


def jax_vs_torch(hf_model, batch, repeats, jax_drop=()) -> tuple[float, dict[str, float]]:
    """`hf_model` saved and loaded with `load_hf` (float32); our jitted forward vs
    `hf_model.model(...).last_hidden_state` on the same numpy `batch` (integer arrays as torch
    longs; `jax_drop`: keys only transformers takes). Returns (max abs diff of the last hidden
    states, seconds per forward {"jax", "torch"})."""
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        model = load_hf(directory, dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, b: nnx.merge(graphdef, state)(**b))
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items() if k not in jax_drop}
    tensors = {
        k: torch.from_numpy(v).long() if np.issubdtype(v.dtype, np.integer) else torch.from_numpy(v)
        for k, v in batch.items()
    }

    def torch_forward():
        with torch.inference_mode():
            return hf_model.model(**tensors).last_hidden_state

    runs = {
        "jax": lambda: forward(state, jax_batch).block_until_ready(),
        "torch": torch_forward,
    }
    diff = float(np.abs(np.asarray(runs["jax"]()) - runs["torch"]().numpy()).max())
    return diff, interleaved_seconds(runs, repeats)


def mllama_forward(args) -> tuple[str, ...]:
    """The Mllama row: full forward of a mid-size Llama-3.2-Vision (Llama 3 decoder, hidden 512,
    `--mllama_layers` layers with a gated cross-attention layer every 4th; vision width 256,
    as many local layers + 2 global ones; `--smoke`: the smoke size's widths), one image of one
    `--image_size` tile (it enters through cross-attention: one `<|image|>` token) + `<bos>` +
    `--text_tokens` tokens."""
    from metaembed_jax.models.mllama import tiny_config as mllama_config

    layers, side = args.mllama_layers, args.image_size
    widths, vision_widths = row_widths(args)
    heads, vision_width = widths["num_attention_heads"], vision_widths["hidden_size"]
    text = dict(
        hidden_size=widths["hidden_size"], intermediate_size=widths["intermediate_size"],
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=min(2, heads),
        cross_attention_layers=list(range(3, layers, 4)) or [layers - 1],
    )  # fmt: skip
    vision = dict(
        hidden_size=vision_width, intermediate_size=vision_widths["intermediate_size"],
        num_hidden_layers=layers, num_global_layers=2, attention_heads=vision_widths["num_heads"],
        image_size=side, max_num_tiles=4, intermediate_layers_indices=[layers // 2, layers - 1],
        vision_output_dim=3 * vision_width,
    )  # fmt: skip
    config = mllama_config(1024, text_config=text, vision_config=vision)
    torch.manual_seed(0)
    hf_model = transformers.MllamaForConditionalGeneration(
        transformers.MllamaConfig(**config)
    ).eval()
    rng = np.random.default_rng(0)
    head = [config["image_token_index"], config["text_config"]["bos_token_id"]]
    rows = [head + rng.integers(8, 1000, args.text_tokens).tolist() for _ in range(args.batch)]
    input_ids = np.asarray(rows, np.int32)
    # transformers requires 4 tiles (its aspect-ratio table); the image fills tile 0 (1x1).
    tile_0 = np.zeros((args.batch, 1, 4), np.int32)
    tile_0[..., 0] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "pixel_values": rng.normal(size=(args.batch, 1, 4, 3, side, side)).astype(np.float32),
        "aspect_ratio_ids": np.ones((args.batch, 1), np.int32),  # 1 = the 1x1 canvas
        "aspect_ratio_mask": tile_0,
        "cross_attention_mask": np.repeat(tile_0[:, None], input_ids.shape[1], axis=1),
    }
    diff, seconds = jax_vs_torch(hf_model, batch, args.repeats)
    print(
        f"Mllama: batch {args.batch} x {input_ids.shape[1]} tokens, one {side} px tile per "
        f"example, max abs diff of last hidden states JAX vs torch: {diff:.1e}\n"
    )
    torch_s, jax_s = seconds["torch"], seconds["jax"]
    return ("mllama forward", f"{torch_s:.3f}", f"{jax_s:.3f}", f"{torch_s / jax_s:.2f}x", "-", "-")


def compile_seconds(num_layers: int, batch: dict, size: str = "mid") -> float:
    """Lower + compile time of the jitted forward, on abstract weights (no memory for them)."""
    config = mid_config(num_layers=num_layers, vision_depth=num_layers, size=size)
    abstract = nnx.eval_shape(lambda: from_config(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(**batch))
    start = time.perf_counter()
    forward.lower(state, batch).compile()
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, threads {args.threads}, float32; "
        f"{machine_load.describe()}\n"
    )
    if args.images_only:
        images_line(args)
        print(f"\nat end: {machine_load.describe()}")
        return
    print(f"size {args.size}")
    rows = throughput(args)
    rows.append(paligemma_forward(args))
    rows.append(mllama_forward(args))
    print("| part | transformers (PyTorch), s | JAX jitted, s | JAX speed-up | JAX GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    images_line(args)
    if not args.skip_compile:
        batch = {k: jnp.asarray(v) for k, v in make_inputs(2, 8, 112).items()}
        print("\n| layers (decoder = vision depth) | compile time of the jitted forward, s |")
        print("|---|---|")
        size = "smoke" if args.smoke else "mid"
        for layers in args.compile_depths:
            print(f"| {layers} | {compile_seconds(layers, batch, size):.2f} |")
    print(f"\nat end: {machine_load.describe()}")


if __name__ == "__main__":
    sys.exit(main())
