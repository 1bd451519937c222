"""The training program: `train(config, workdir)`.

Start-up order: distributed runtime, mesh, config checks (before anything expensive), data,
model and state, resume from the latest checkpoint in `workdir` (metrics.jsonl cut back to its
step), then the step loop with metrics, periodic checkpoints, a save then `StoppedBySignal` on
SIGTERM / SIGINT, and a stop on a non-finite loss. One process trains a run directory at a time
(`run_lock`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from metaembed_jax import sharding
from metaembed_jax.data.pipeline import (
    RUN_TOKENIZER_DIR,
    make_processor,
    make_train_iterator,
    model_family,
)
from metaembed_jax.models.lora import partially_adapted
from metaembed_jax.training import checkpointing, metrics, run_identity
from metaembed_jax.training.config import loss_groups, loss_temperatures, validate_config
from metaembed_jax.training.model import (
    base_hf_config,
    base_source,
    build_model,
    check_init_from,
    hf_config_dict,
)
from metaembed_jax.training.run_lock import run_lock
from metaembed_jax.training.state import create_train_state, make_optimizer
from metaembed_jax.training.step import TrainStep


class StopSignal:
    """Remembers SIGTERM / SIGINT so the loop can save and exit between steps."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning(
            "received %s: saving a checkpoint and stopping", signal.Signals(signum).name
        )
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_process(self) -> bool:
        """True if any process got a signal (processes must agree to save together)."""
        local = self.received is not None
        if jax.process_count() == 1:
            return local
        return bool(np.max(multihost_utils.process_allgather(np.int32(local))))


class StoppedBySignal(Exception):
    """Training was stopped by SIGTERM / SIGINT before `train.steps`, after saving a checkpoint.
    A program ends with `exit_code` (128 + the signal, as a process killed by it would: 143 for
    SIGTERM), so that a script or `make` does not take the partial run for a finished one."""

    def __init__(self, signum: int, step: int, workdir: Path):
        self.signum, self.step, self.workdir = int(signum), int(step), workdir
        self.exit_code = 128 + self.signum
        super().__init__(
            f"stopped by {signal.Signals(self.signum).name} at step {self.step}: its checkpoint "
            f"is saved in {workdir}; rerun the same command to resume"
        )


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN / inf loss or gradient norm; the state of that step is not saved."""


@jax.jit
def _first_non_finite(first, step, loss, grad_norm):
    # Device-side, so that watching every step adds no host round trip: the host reads the
    # result only where the loop reads metrics anyway (logging, saving).
    bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return jnp.where((first == 0) & bad, step, first)


class FiniteWatch:
    """Remembers the first step whose loss or gradient norm is not finite."""

    def __init__(self):
        self.first = np.int32(0)

    def update(self, step: int, step_metrics) -> None:
        self.first = _first_non_finite(
            self.first, np.int32(step), step_metrics["loss"], step_metrics["grad_norm"]
        )

    def check(self, last_saved: int | None) -> None:
        """Raises NonFiniteLossError naming the step (and the checkpoint kept) if one was bad."""
        first = int(jax.device_get(self.first))
        if not first:
            return
        kept = (
            f"the last checkpoint (step {last_saved}) is kept and was not overwritten"
            if last_saved is not None
            else "no checkpoint was saved"
        )
        raise NonFiniteLossError(
            f"the loss or gradient norm is not finite at step {first}: training stopped and {kept}"
            " (lower optimizer.lr, raise loss.temperature, or check the data of that step)"
        )


def start_distributed(config) -> bool:
    """jax.distributed per `config.distributed` ("auto" / "on" / "off")."""
    mode = config.distributed.mode
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.distributed.mode={mode!r}; expected auto, on or off")
    if mode == "off":
        return False
    kwargs = {}
    if config.distributed.coordinator_address:
        kwargs["coordinator_address"] = config.distributed.coordinator_address
    if config.distributed.num_processes > 0:
        kwargs["num_processes"] = int(config.distributed.num_processes)
    if config.distributed.process_id >= 0:
        kwargs["process_id"] = int(config.distributed.process_id)
    return sharding.initialize_distributed(True if mode == "on" else None, **kwargs)


def write_run_files(config, workdir: Path, vocab_size: int | None) -> None:
    """config.json (the full config), and for a from-scratch run model_config.json (the backbone
    actually built) and tokenizer/ (the built-in tokenizer, which lives in the data directory,
    so that the run directory alone loads: make_processor(config, workdir=...) reads it)."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    if not config.init_from:
        hf = hf_config_dict(config, vocab_size)
        (workdir / "model_config.json").write_text(json.dumps(hf, indent=2))
        built_in = Path(config.data.dir) / "tokenizer"
        if built_in.is_dir() and not (workdir / RUN_TOKENIZER_DIR).exists():
            shutil.copytree(built_in, workdir / RUN_TOKENIZER_DIR)


def check_full_stacks(model) -> None:
    """Raise ValueError when LoRA targets select some layers of a stacked module only: stacked
    layers train one adapter array, so PEFT's per-layer selections load (the other layers keep
    zero adapters) but cannot train."""
    partial = partially_adapted(model.backbone)
    if partial:
        listed = "; ".join(f"{path}: layers {list(ids)}" for path, ids in partial.items())
        raise ValueError(
            f"config.lora targets select only some layers of a stacked module ({listed}): "
            "training adapts every layer of a stack or none; widen config.lora.target_regex"
        )


def _has_checkpoint(workdir: Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def record_base_fingerprint(
    config, workdir: Path, state, vocab_size, *, check: bool = False
) -> None:
    """A LoRA run's checkpoints hold only the adapters: write the fingerprint of the base they
    need (a fresh run) or, with `check`, check the base built now against it (a resume)."""
    fingerprint = run_identity.base_fingerprint(
        state.frozen, base_hf_config(config, vocab_size), base_source(config)
    )
    if check and (workdir / run_identity.FINGERPRINT_FILE).exists():
        run_identity.check_base_fingerprint(workdir, fingerprint)
    elif jax.process_index() == 0:
        run_identity.write_base_fingerprint(workdir, fingerprint)


def _next_batch(iterator, accum_steps: int):
    if accum_steps == 1:
        return next(iterator)
    return tuple(next(iterator) for _ in range(accum_steps))


def train(config, workdir: str | os.PathLike, *, train_iterator=None) -> list[dict[str, Any]]:
    """Train `config` in `workdir` (resuming from its latest checkpoint); returns logged rows.

    `train_iterator` (tests) replaces the configured data pipeline: an iterator of batches of
    `batch_size / grad_accum_steps` examples with `get_state()` / `set_state()`.
    Raises ValueError / FileNotFoundError for an invalid config before building anything,
    RunLockedError when another process trains in `workdir` (`run_lock`), NonFiniteLossError
    when a step's loss or gradient norm is NaN / inf (that state is neither logged nor saved;
    the last checkpoint stays the latest), and StoppedBySignal after saving when SIGTERM /
    SIGINT stopped it before `train.steps`.
    """
    workdir = Path(workdir)
    start_distributed(config)
    with run_lock(workdir, take=jax.process_index() == 0):
        return _train(config, workdir, train_iterator)


def _train(config, workdir: Path, train_iterator) -> list[dict[str, Any]]:
    mesh = sharding.make_mesh(config.mesh)
    validate_config(config, sharding.batch_shards(mesh))
    check_init_from(config)
    steps, accum = int(config.train.steps), int(config.train.grad_accum_steps)
    micro_batch = int(config.train.batch_size) // accum
    vocab_size = None
    if train_iterator is None:
        family = model_family(config)
        processor = make_processor(config, family)
        vocab_size = len(processor.tokenizer)
        train_iterator = make_train_iterator(
            config.data,
            processor,
            family=family,
            mesh=mesh,
            global_batch_size=micro_batch,
            seed=config.seed,
            same_shapes=accum > 1,  # one shape for every micro-batch of a step
        )
    resuming = _has_checkpoint(workdir)
    if resuming:  # before config.json is overwritten with the config given
        run_identity.check_run_identity(workdir, config, action="resume")
    write_run_files(config, workdir, vocab_size)

    model = build_model(config, mesh=mesh, vocab_size=vocab_size)
    check_full_stacks(model)
    tx, schedule = make_optimizer(config.optimizer, steps)
    state = create_train_state(model, tx, lora=bool(config.lora.enabled), mesh=mesh)
    del model
    if config.lora.enabled:
        record_base_fingerprint(config, workdir, state, vocab_size, check=resuming)
    checkpointer = checkpointing.Checkpointer(
        workdir, keep=int(config.checkpoint.keep), async_save=bool(config.checkpoint.async_save)
    )
    start = 0
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(state)
        train_iterator.set_state(data_state)
        start = int(jax.device_get(state.step))
        logging.info("resumed from step %d in %s", start, checkpointer.directory)
    # Also without a checkpoint (a kill before the first save): the run restarts at step 0, so
    # lines an earlier attempt logged would otherwise appear twice.
    metrics.truncate_to_step(workdir / "metrics.jsonl", start)
    groups = loss_groups(config)
    train_step = TrainStep(
        state,
        groups=groups,
        temperature=loss_temperatures(config),
        schedule=schedule,
        mesh=mesh,
        grad_cache=bool(config.train.get("grad_cache", False)),
    )
    writer = metrics.MetricsWriter(
        workdir,
        groups=groups,
        total_steps=steps,
        start_step=start,
        progress_bar=bool(config.train.progress_bar),
    )
    try:
        with StopSignal() as stop:
            rows, step, signalled = _loop(
                config, state, start, train_step, train_iterator, checkpointer, writer, stop
            )
    finally:
        writer.close()
        checkpointer.close()  # waits for the last (asynchronous) save
        close = getattr(train_iterator, "close", None)
        if close is not None:  # stop the input pipeline's threads / worker processes
            close()
    if signalled and step < steps:
        raise StoppedBySignal(stop.received or signal.SIGTERM, step, workdir)
    return rows


def _loop(config, state, start, train_step, iterator, checkpointer, writer, stop):
    steps, accum = int(config.train.steps), int(config.train.grad_accum_steps)
    log_every, save_every = int(config.train.log_every), int(config.checkpoint.every)
    stop_after = int(config.train.stop_after)
    throughput = metrics.Throughput()
    watch = FiniteWatch()
    rows = []
    step, last_saved, signalled = start, (start or None), False
    while step < steps:
        state, step_metrics = train_step(state, _next_batch(iterator, accum))
        checkpointer.check_for_errors()  # a failed background save stops the run at once
        step += 1
        watch.update(step, step_metrics)
        throughput.add(int(config.train.batch_size))
        writer.advance()
        if step % log_every == 0 or step == steps:
            watch.check(last_saved)  # a non-finite row is never logged
            rows.append(writer.record(step, step_metrics, throughput.rate()))
        signalled = stop.any_process()
        preempted = signalled or (stop_after and step - start >= stop_after)
        if step % save_every == 0 or step == steps or preempted:
            watch.check(last_saved)  # ... nor saved
            checkpointer.save(state, iterator.get_state(), force=True)
            last_saved = step
        if preempted:
            logging.warning("stopping at step %d (checkpoint saved); rerun to resume", step)
            break
    return rows, step, signalled
