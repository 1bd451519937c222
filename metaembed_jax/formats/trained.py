"""A trained run as a model: `load_trained(workdir) -> (model, processor)`.

Reads the run's own `config.json` and the trained parameters of one checkpoint step (the
`params` item only: no optimizer state is built or read). A full fine-tuning run's checkpoint
holds every parameter, so the model is built abstractly and filled from it; a LoRA run's holds
only the adapters, meta tokens and projection, so its base is built as training built it
(`init_from` or the seed) and checked against the fingerprint the run recorded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from metaembed_jax import sharding
from metaembed_jax.data.pipeline import make_processor
from metaembed_jax.metaembed import MetaEmbed
from metaembed_jax.training.checkpointing import Checkpointer
from metaembed_jax.training.model import (
    DTYPES,
    base_hf_config,
    base_source,
    build_model,
    configure_model,
    model_kwargs,
)
from metaembed_jax.training.run_identity import (
    base_fingerprint,
    check_base_fingerprint,
    check_run_identity,
    read_saved_config,
)
from metaembed_jax.training.state import trainable_filter

logger = logging.getLogger(__name__)


def _abstract_full_model(config, mesh: Mesh | None, vocab_size: int | None):
    """(graphdef, abstract params with their shardings, materialised non-parameter state)."""
    hf = base_hf_config(config, vocab_size)
    kwargs = model_kwargs(config)

    def create() -> MetaEmbed:
        model = MetaEmbed.from_config(hf, rngs=nnx.Rngs(int(config.seed)), **kwargs)
        return configure_model(model, config)

    graphdef, params, _ = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
    # Only the small RNG state is computed: XLA drops the unused parameter initialisers.
    rest = jax.jit(lambda: nnx.state(create(), nnx.Not(nnx.Param)))()
    # orbax restores onto explicit shardings: without a mesh, one device's.
    mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    shardings = sharding.state_shardings(params, mesh)
    params = jax.tree.map(
        lambda v, s: v.replace(
            jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s.get_value())
        ),
        params,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return graphdef, params, rest


def _abstract_like(array: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding)


def restore_trained_model(
    config,
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    mesh: Mesh | None = None,
    vocab_size: int | None = None,
) -> MetaEmbed:
    """The MetaEmbed of the run in `workdir` with the parameters of checkpoint `step` (latest
    when None), reading the checkpoint's `params` item only.

    Raises FileNotFoundError (no such checkpoint), CheckpointError (unreadable checkpoint),
    RunMismatchError (a LoRA base that is not the run's).
    """
    lora = bool(config.lora.enabled)
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        if lora:
            model = build_model(config, mesh=mesh, vocab_size=vocab_size)
            graphdef, params, rest = nnx.split(model, trainable_filter(True), ...)
            fingerprint = base_fingerprint(
                nnx.state(model, nnx.All(nnx.Param, nnx.Not(trainable_filter(True)))),
                base_hf_config(config, vocab_size),
                base_source(config),
            )
            check_base_fingerprint(workdir, fingerprint)
            del model
            params = jax.tree.map(
                lambda v: v.replace(_abstract_like(v[...])),
                params,
                is_leaf=lambda x: isinstance(x, nnx.Variable),
            )
        else:
            graphdef, params, rest = _abstract_full_model(config, mesh, vocab_size)
        params = checkpointer.restore_params(params, step)
    finally:
        checkpointer.close()
    model = nnx.merge(graphdef, params, rest)
    model.eval()  # inference: LoRA dropout off, identical vectors call after call
    return model


def committed_steps(run_dir: Path) -> list[int]:
    """The run's committed checkpoint steps, oldest first, found without building anything.

    Raises FileNotFoundError when the run has no checkpoints directory.
    """
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"no checkpoints in {run_dir}: train first (python train.py --config ... "
            f"--workdir {run_dir}) or pass --checkpoint"
        )
    checkpointer = Checkpointer(run_dir, read_only=True)
    try:
        return checkpointer.all_steps()
    finally:
        checkpointer.close()


def find_step(run_dir: Path, step: int | None, config=None) -> int:
    """The checkpoint step of a run to use (latest when None), found without building anything.
    With the run's `config`, also logs one warning line when the run has not reached
    `config.train.steps` (a stopped or still running training).

    Raises FileNotFoundError when the run has no (such) checkpoint.
    """
    steps = committed_steps(run_dir)
    found = max(steps, default=None) if step is None else step
    if found is None or found not in steps:
        where = "" if step is None else f"of step {step} "
        raise FileNotFoundError(
            f"no checkpoint {where}in {run_dir / 'checkpoints'} (steps there: {sorted(steps)})"
        )
    if config is not None:
        _warn_if_unfinished(config, run_dir, int(found), max(steps))
    return int(found)


def _warn_if_unfinished(config, run_dir: Path, step: int, latest: int) -> None:
    """The warning of `find_step` when the run's newest checkpoint `latest` is before
    `config.train.steps`. Runs that train nothing (`train.steps = 0`, e.g. `metaembed
    import-reference`) never warn."""
    planned = int(config.train.get("steps", 0) or 0)
    if planned <= 0 or latest >= planned:
        return
    logger.warning(
        "%s has not finished training: its newest checkpoint is step %d of train.steps=%d "
        "(loading step %d; rerun train.py --workdir %s to finish it)",
        run_dir,
        latest,
        planned,
        step,
        run_dir,
    )


def dtype_name(dtype: Any) -> str:
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)} (or the jnp dtype)")


def load_trained(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    mesh: Mesh | None = None,
    dtype: Any = None,
    config=None,
):
    """(MetaEmbed, processor) of a training run directory.

    Takes: `workdir` (what `train.py --workdir` wrote), `step` (a checkpoint step; default the
    latest), `mesh` (place the parameters on it; default one device), `dtype` (compute dtype,
    e.g. "bfloat16"; default the run's), `config` (default: the run's saved config.json; one
    given must agree with it on the model / loss / LoRA / base checkpoint fields).
    Returns the model with the trained parameters and the processor (tokenizer and image
    preprocessing) the run trained with. Logs a one-line warning when the run has not reached
    `train.steps` (`find_step`).
    Raises FileNotFoundError, CheckpointError, RunMismatchError with what to do.
    """
    workdir = Path(workdir)
    if config is None:
        config = read_saved_config(workdir)
    else:
        check_run_identity(workdir, config, action="load")
        config = config.copy_and_resolve_references()
    if dtype is not None:
        config.model.dtype = dtype_name(dtype)
    step = find_step(workdir, step, config)
    processor = make_processor(
        config, workdir=workdir
    )  # the run's tokenizer and image preprocessing
    model = restore_trained_model(
        config, workdir, step, mesh=mesh, vocab_size=len(processor.tokenizer)
    )
    return model, processor
