"""A recipe compiled ahead of time for a TPU topology, on a machine without a TPU.

`jax.experimental.topologies.get_topology_desc` gives a topology's TPU devices from libtpu's
compiler alone (`jax[tpu]` installed, no chip, also under `JAX_PLATFORMS=cpu`). Over them this
module lays out the recipe's mesh (`config.mesh`; several slices: data parallel over the
data-centre network), builds the recipe's model abstractly (`jax.ShapeDtypeStruct`s carrying
the shardings the logical-axis rules give: no weights), and compiles, with the TPU compiler:

- the train step: `training.step.TrainStep`, the one `train` runs, for a step's batch at the
  recipe's largest length bucket and image size (a tuple of micro-batches under accumulation);
- the encode step: `retrieval.encode.embed_step` of the candidate side, for `config.eval
  .batch_size` inputs;
- an index search: `retrieval.index.exhaustive_search_program` at the full budget over `index_size`
  candidates (bfloat16 vectors, split over every chip) for 16 queries.

Nothing is executed. Per chip it reports XLA's memory analysis (argument, output, temporary and
aliased bytes), the chip's HBM and whether the step fits, the compile seconds, and FLOPs and
bytes per step counted with every loop iteration (`hlo_cost.loop_aware_cost`; XLA's own
`cost_analysis()`, which counts a loop body once, is reported beside them), with a roofline
step time `max(FLOPs / peak, bytes / HBM bandwidth)` from `CHIPS`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

from metaembed_jax import tpu_env

tpu_env.set_offline_tpu_env()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import mesh_utils, topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from metaembed_jax import scoring, sharding  # noqa: E402
from metaembed_jax.cli import hlo_cost  # noqa: E402
from metaembed_jax.metaembed import MetaEmbed  # noqa: E402
from metaembed_jax.models import layers  # noqa: E402
from metaembed_jax.models.family import family_for  # noqa: E402
from metaembed_jax.models.published import published_config  # noqa: E402
from metaembed_jax.models.rules import read_config  # noqa: E402
from metaembed_jax.retrieval.encode import embed_step  # noqa: E402
from metaembed_jax.retrieval.index import exhaustive_search_program  # noqa: E402
from metaembed_jax.training import model as model_lib  # noqa: E402
from metaembed_jax.training.config import (  # noqa: E402
    loss_groups,
    loss_temperatures,
    validate_config,
)
from metaembed_jax.training.state import TrainState, make_optimizer, trainable_filter  # noqa: E402
from metaembed_jax.training.step import TrainStep  # noqa: E402

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's figures: HBM capacity (bytes), peak bf16 FLOP/s and HBM bandwidth (B/s)."""

    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    source: str


# Google Cloud TPU documentation, "Key specifications" of each version (the pages say "GB" for
# the HBM capacity; the chips hold 16 / 95 / 32 GiB).
CHIPS = {
    "v5e": Chip(16 * GiB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(95 * GiB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(32 * GiB, 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}

INDEX_QUERIES = 16  # queries of the compiled index search (one request's batch)
INDEX_TOP_K = 10
# The TPU compiler refuses a program whose buffers exceed the chip's HBM instead of compiling
# it; its message carries the size it needed (XLA's units: powers of 1024).
_HBM_REFUSAL = re.compile(
    r"RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
    r"(?P<what>[^(]+?) \((?P<size>[\d.]+)(?P<unit>[KMGTP]?)\)"
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
# Vocabulary of a from-scratch recipe (`vocab_size: 0` = the built-in tokenizer's): its target
# size (`data.tokenizer.train_tokenizer`).
BUILTIN_VOCAB = 1024


def chip_of(topology: str) -> Chip:
    """The `CHIPS` entry of a topology name ("v5p:4x4x4" -> v5p). Raises ValueError."""
    kind = topology.split(":")[0]
    if kind not in CHIPS:
        raise ValueError(
            f"topology {topology!r}: no chip figures for {kind!r}; known {list(CHIPS)}"
        )
    return CHIPS[kind]


def tpu_devices(topology: str, slices: int = 1) -> list:
    """The compile-only TPU devices of `slices` slices of `topology` (e.g. "v5p:2x2x1")."""
    tpu_env.set_offline_tpu_env(topology)
    kwargs = {"num_slices": slices} if slices > 1 else {}
    return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)


def topology_mesh(mesh_config, devices: list, slices: int = 1) -> Mesh:
    """The recipe's ("data", "fsdp", "tensor") mesh over TPU devices, laid along the chips' ICI
    links (`mesh_utils`); with several slices the `data` axis spans them (over the data-centre
    network, DCN) and each slice holds `data / slices` of it. Raises ValueError for sizes that
    do not fit the devices or slices."""
    sizes = [sharding.make_mesh(mesh_config, devices).shape[a] for a in sharding.MESH_AXES]
    if slices == 1:
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    else:
        if sizes[0] % slices:
            raise ValueError(
                f"mesh {dict(zip(sharding.MESH_AXES, sizes, strict=True))}: the data axis "
                f"({sizes[0]}) must divide by the {slices} slices"
            )
        per_slice = [sizes[0] // slices, *sizes[1:]]
        grid = mesh_utils.create_hybrid_device_mesh(
            per_slice, [slices, 1, 1], devices, allow_split_physical_axes=True
        )
    return Mesh(grid, sharding.MESH_AXES, axis_types=sharding.AUTO_AXES)


def recipe_hf_config(config) -> dict[str, Any]:
    """The backbone's `config.json` dict: `init_from`'s own when it is a local checkpoint, else
    the published one it names (`models.published`), else `model.hf_config` (a from-scratch
    recipe). Raises ValueError for a checkpoint neither on disk nor in the table."""
    if config.init_from:
        path = os.fspath(config.init_from)
        if os.path.isfile(os.path.join(path, "config.json")):
            return read_config(path)
        published = published_config(path)
        if published is None:
            raise ValueError(
                f"config.init_from={path!r}: no config.json there and not a published checkpoint "
                "of models/published.py; give a local checkpoint directory"
            )
        return published
    return model_lib.hf_config_dict(config, BUILTIN_VOCAB)


def _with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_model_state(config, hf: dict, mesh: Mesh):
    """(graphdef, params, frozen, other) of the recipe's MetaEmbed: ShapeDtypeStructs placed by
    the logical-axis rules, as `build_model` places the real arrays."""
    layers.set_attention_impl(config.model.get("attention_impl", "reference"))
    kwargs = model_lib.model_kwargs(config)
    abstract = nnx.eval_shape(
        lambda: model_lib.configure_model(
            MetaEmbed.from_config(hf, rngs=nnx.Rngs(0), **kwargs), config
        )
    )
    lora = bool(config.lora.enabled)
    graphdef, params, frozen, other = nnx.split(abstract, trainable_filter(lora), nnx.Param, ...)
    params = _with_shardings(params, sharding.state_shardings(params, mesh))
    frozen = _with_shardings(frozen, sharding.state_shardings(frozen, mesh))
    replicated = NamedSharding(mesh, P())
    other = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), other
    )
    return graphdef, params, frozen, other


def abstract_train_state(config, hf: dict, mesh: Mesh) -> tuple[TrainState, Any]:
    """(the TrainState `create_train_state` would build, as ShapeDtypeStructs; the schedule)."""
    graphdef, params, frozen, other = abstract_model_state(config, hf, mesh)
    tx, schedule = make_optimizer(config.optimizer, int(config.train.steps))
    # Adam moments take their parameter's placement (as jit(tx.init) gives the real ones).
    opt_state = jax.eval_shape(tx.init, params)
    by_shape = {}
    for leaf in jax.tree.leaves(params):
        by_shape.setdefault((leaf.shape, leaf.dtype), leaf.sharding)
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=by_shape.get((x.shape, x.dtype), replicated)
        ),
        opt_state,
    )
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return TrainState(step, params, frozen, other, opt_state, graphdef, tx), schedule


def abstract_side(config, mesh: Mesh, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One side's features at the largest length bucket and image size of `config.data`, as the
    pipeline pads them under accumulation (the family's static shapes, `same_shapes`), leading
    axis `batch_size` split over the batch axes."""
    family = family_for(recipe_hf_config(config))
    buckets = tuple(config.data.length_buckets)
    length = max(buckets) if buckets else 512
    features = {
        "input_ids": np.zeros((1, length), np.int32),
        "attention_mask": np.ones((1, length), np.int32),
    }
    padded = family.static_shapes(config.data, 1, same_shapes=True)(features)
    batch_axes = sharding.present_batch_axes(mesh, tuple(config.data.batch_axes))
    placement = NamedSharding(mesh, P(batch_axes if batch_axes else None))
    return {
        key: jax.ShapeDtypeStruct((batch_size, *np.shape(value)[1:]), np.asarray(value).dtype,
                                  sharding=placement)
        for key, value in padded.items()
        if key in family.feature_keys
    }  # fmt: skip


def _train_batch(config, mesh: Mesh):
    accum = int(config.train.grad_accum_steps)
    micro = int(config.train.batch_size) // accum
    names = ("query", "positive") + (("negative",) if config.data.hard_negatives else ())

    def one():
        return {name: abstract_side(config, mesh, micro) for name in names}

    return (one() if accum == 1 else tuple(one() for _ in range(accum))), micro


def _measure(lowered_fn, hbm_bytes: int) -> dict[str, Any]:
    """Compile (timed) and read the memory and cost analyses of one program. A program the
    compiler refuses for HBM gives `fits: False` with the compiler's message (`refused`) and
    the size it needed (`required_bytes`); any other compile error propagates."""
    start = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as error:  # the compiler's JaxRuntimeError: only its HBM refusal is kept
        refusal = _HBM_REFUSAL.search(str(error))
        if refusal is None:
            raise
        return {
            "compile_s": round(time.perf_counter() - start, 2),
            "refused": str(error),
            "required_bytes": int(float(refusal["size"]) * _UNITS[refusal["unit"]]),
            "fits": False,
        }
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    counted = hlo_cost.loop_aware_cost(compiled.as_text())
    per_chip = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {
        "compile_s": round(seconds, 2),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "per_chip_bytes": int(per_chip),
        "fits": bool(per_chip <= hbm_bytes),
        "flops_per_step": counted["flops"],
        "bytes_per_step": counted["bytes"],
        "cost_analysis_flops": float(cost.get("flops", 0.0)),
        "cost_analysis_bytes": float(cost.get("bytes accessed", 0.0)),
    }


def _roofline(result: dict[str, Any], chip: Chip) -> None:
    if "refused" in result:
        return
    compute = result["flops_per_step"] / chip.peak_flops
    memory = result["bytes_per_step"] / chip.hbm_bandwidth
    result["roofline_s"] = max(compute, memory)
    result["roofline_bound"] = "compute" if compute >= memory else "memory"


def compile_train_step(config, hf: dict, mesh: Mesh, hbm_bytes: int) -> dict[str, Any]:
    """Compile the recipe's train step over `mesh` (see the module docstring)."""
    validate_config(config, sharding.batch_shards(mesh))
    state, schedule = abstract_train_state(config, hf, mesh)
    batch, micro = _train_batch(config, mesh)
    step = TrainStep(
        state,
        groups=loss_groups(config),
        temperature=loss_temperatures(config),
        schedule=schedule,
        mesh=mesh,
        grad_cache=bool(config.train.get("grad_cache", False)),
    )
    result = _measure(lambda: step.lower(state, batch), hbm_bytes)
    result["micro_batch"] = micro
    result["grad_accum_steps"] = int(config.train.grad_accum_steps)
    return result


def compile_encode_step(config, hf: dict, mesh: Mesh, hbm_bytes: int) -> dict[str, Any]:
    """Compile the candidate side's encode step for `config.eval.batch_size` inputs."""
    graphdef, params, frozen, other = abstract_model_state(config, hf, mesh)
    state = nnx.merge_state(params, frozen, other)
    batch = int(config.eval.batch_size)
    shards = sharding.batch_shards(mesh, tuple(config.data.batch_axes))
    batch = -(-batch // shards) * shards  # as ModelEncoder requires
    features = abstract_side(config, mesh, batch)
    step = embed_step(graphdef, "candidate")

    def lower():
        with sharding.mesh_context(mesh):
            return step.lower(state, features)

    result = _measure(lower, hbm_bytes)
    result["batch"] = batch
    return result


def compile_index_search(devices: list, dim: int, size: int, hbm_bytes: int) -> dict[str, Any]:
    """Compile an exhaustive search at the full budget (16, 64) over `size` bfloat16 candidates
    of width `dim` split over every device (the index's placement), for `INDEX_QUERIES`."""
    r_q, r_c = 16, 64
    mesh = Mesh(np.asarray(devices), ("index",))
    rows = -(-size // len(devices)) * len(devices)
    per_device = rows // len(devices)
    chunk = scoring.default_chunk_size(INDEX_QUERIES * r_q, r_c, per_device, dim, 2)
    search = exhaustive_search_program(mesh, (r_q, r_c), INDEX_TOP_K, chunk)
    replicated = NamedSharding(mesh, P())
    queries = jax.ShapeDtypeStruct((INDEX_QUERIES, r_q, dim), jnp.float32, sharding=replicated)
    # bfloat16 vectors are placed as their raw 16-bit words (`scoring.bfloat16_words`).
    block = jax.ShapeDtypeStruct(
        (r_c, rows, dim), jnp.uint16, sharding=NamedSharding(mesh, P(None, "index"))
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    result = _measure(lambda: search.lower(queries, None, block, None, scalar, scalar), hbm_bytes)
    result["candidates"] = size
    return result


def compile_recipe(
    config,
    topology: str,
    *,
    slices: int = 1,
    index_size: int = 0,
    hbm_bytes: int | None = None,
    parts: tuple[str, ...] = ("train", "encode", "index"),
) -> dict[str, Any]:
    """Compile `parts` of the recipe `config` for `slices` x `topology`; returns the report
    (`--json` of `metaembed compile`): the train step's figures at the top level, the others
    under their names. `hbm_bytes` replaces the chip's HBM (tests). Raises ValueError for an
    unknown topology or a mesh that does not fit it; the compiler's errors pass through."""
    chip = chip_of(topology)
    hbm = chip.hbm_bytes if hbm_bytes is None else int(hbm_bytes)
    devices = tpu_devices(topology, slices)
    mesh = topology_mesh(config.mesh, devices, slices)
    hf = recipe_hf_config(config)
    report: dict[str, Any] = {
        "compiled": False,
        "topology": topology,
        "slices": slices,
        "chips": len(devices),
        "mesh": {name: int(size) for name, size in mesh.shape.items()},
        "attention_impl": config.model.get("attention_impl", "reference"),
        "remat": config.model.remat,
        "hbm_bytes": hbm,
        "chip": dataclasses.asdict(chip),
    }
    if "train" in parts:
        report.update(compile_train_step(config, hf, mesh, hbm))
        _roofline(report, chip)
    if "encode" in parts:
        report["encode"] = compile_encode_step(config, hf, mesh, hbm)
        _roofline(report["encode"], chip)
    if "index" in parts and index_size > 0:
        dim = int(config.model.projection_dim) or _hidden_size(hf)
        report["index"] = compile_index_search(devices, dim, index_size, hbm)
        _roofline(report["index"], chip)
    checked = [report] if "train" in parts else []
    checked += [report[name] for name in ("encode", "index") if name in report]
    report["compiled"] = not any("refused" in part for part in checked)
    report["fits"] = all(part["fits"] for part in checked)
    return report


def _hidden_size(hf: dict) -> int:
    text = hf.get("text_config") or hf
    return int(text["hidden_size"])


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one block per compiled program."""
    lines = [
        f"{report['topology']} x {report['slices']} slice(s): {report['chips']} chips, mesh "
        f"{report['mesh']}, attention {report['attention_impl']}, remat {report['remat']}, "
        f"HBM {report['hbm_bytes'] / GiB:.1f} GiB per chip (source {report['chip']['source']})"
    ]
    parts = [("train step", report)] if "compile_s" in report else []
    parts += [(f"{name} step", report[name]) for name in ("encode", "index") if name in report]
    for name, part in parts:
        extra = ""
        if "micro_batch" in part:
            extra = f", micro-batch {part['micro_batch']} x {part['grad_accum_steps']}"
        if "refused" in part:
            lines.append(
                f"{name}{extra}: refused by the compiler after {part['compile_s']:.1f} s, does "
                f"not fit: needs {part['required_bytes'] / GiB:.2f} GiB ({part['refused']})"
            )
            continue
        lines.append(
            f"{name}{extra}: compiled in {part['compile_s']:.1f} s; per chip "
            f"{part['per_chip_bytes'] / GiB:.2f} GiB (arguments {part['argument_bytes'] / GiB:.2f}"
            f" + outputs {part['output_bytes'] / GiB:.2f} + temporaries "
            f"{part['temp_bytes'] / GiB:.2f} - aliased {part['alias_bytes'] / GiB:.2f}), "
            f"fits: {'yes' if part['fits'] else 'NO'}; {part['flops_per_step'] / 1e12:.2f} TFLOP "
            f"and {part['bytes_per_step'] / 1e9:.1f} GB per step per chip (cost_analysis, loop "
            f"bodies once: {part['cost_analysis_flops'] / 1e12:.2f} TFLOP); roofline "
            f"{part['roofline_s']:.3f} s ({part['roofline_bound']}-bound)"
        )
    return "\n".join(lines)
