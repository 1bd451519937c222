"""Orbax checkpoints of the train state under `DIR/checkpoints/`, with the data iterator state.

Layout: `DIR/checkpoints/<step>/state` (orbax, sharded arrays: trained params, non-param state,
optimizer state, step) and `DIR/checkpoints/data/<step>/process_<i>.json` (each process's input
iterator position, written before the orbax save so a committed step always has it). Frozen
weights (LoRA base) are not saved: they are re-derived from `init_from` / the seed at start.
Typed PRNG keys are stored as their raw uint32 data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from metaembed_jax.training.state import TrainState


def _saved_part(state: TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "other": state.other,
        "opt_state": state.opt_state,
    }


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flatten(state: TrainState) -> tuple[dict[str, Any], list[str]]:
    """Flat {"000000": array} (PRNG keys as raw data) and the tree paths, in leaf order."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(_saved_part(state))
    arrays, paths = {}, []
    for index, (path, leaf) in enumerate(with_paths):
        arrays[f"{index:06d}"] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        paths.append(jax.tree_util.keystr(path))
    return arrays, paths


class Checkpointer:
    """Save / restore TrainState + data-iterator state; keep the last `keep`; async optional."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.data_directory = self.directory / "data"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: Any = None, *, force: bool = False) -> bool:
        """Start saving at `state.step` (returns at once when async); True if a save started."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        step_dir = self.data_directory / str(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        (step_dir / f"process_{jax.process_index()}.json").write_text(json.dumps(data_state))
        arrays, paths = _flatten(state)
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave({"paths": paths})
            ),
            force=force,
        )
        self._prune_data_states()
        return saved

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, Any]:
        """(state at `step` (default latest), this process's data-iterator state).

        `template` is a TrainState of the same model and optimizer (e.g. the fresh one): it gives
        the tree structure, shapes, shardings and the frozen weights.
        Raises FileNotFoundError if there is no checkpoint, ValueError if it does not fit.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        arrays, paths = _flatten(template)
        abstract = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
            for k, v in arrays.items()
        }
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        if restored["meta"]["paths"] != paths:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} holds a different train state (model or "
                "optimizer settings changed since it was written)"
            )
        leaves = jax.tree.leaves(_saved_part(template))
        values = []
        for template_leaf, key in zip(leaves, sorted(restored["state"]), strict=True):
            value = restored["state"][key]
            if _is_key(template_leaf):
                value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(template_leaf))
            values.append(value)
        part = jax.tree.unflatten(jax.tree.structure(_saved_part(template)), values)
        state = template.replace(**part)
        return state, self._read_data_state(step)

    def _read_data_state(self, step: int) -> Any:
        path = self.data_directory / str(step) / f"process_{jax.process_index()}.json"
        if not path.exists():
            raise FileNotFoundError(f"checkpoint step {step} has no data-iterator state at {path}")
        return json.loads(path.read_text())

    def _prune_data_states(self) -> None:
        # Keep the iterator states of the steps orbax keeps (plus the one being written).
        if jax.process_index() != 0 or not self.data_directory.exists():
            return
        kept = {str(s) for s in self.manager.all_steps()}
        newest = max(
            (int(p.name) for p in self.data_directory.iterdir() if p.name.isdigit()), default=None
        )
        for path in self.data_directory.iterdir():
            if path.name.isdigit() and path.name not in kept and int(path.name) != newest:
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Drop metric lines past `last_step` (written after the checkpoint a run resumes from)."""
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        logging.info("metrics: dropping %d lines past step %d", len(lines) - len(kept), last_step)
        path.write_text("".join(line + "\n" for line in kept))
