"""Orbax checkpoints of the train state under `DIR/checkpoints/`, with the data iterator state.

Layout of one step, `DIR/checkpoints/<step>/`, as separate named orbax items so that a reader
takes only what it needs (evaluation and `load_trained` read `params` alone):
- `params`: the trained variables by name (`backbone.layers.0.attn.q_proj.kernel`, ...);
- `opt_state`: the step counter, the non-parameter state (dropout RNG streams, typed keys
  stored as their raw uint32 data) and the optimizer state, by tree path;
- `meta`: JSON, the names of both items (a format check and the error messages' vocabulary).
The input iterator position of each process is `DIR/checkpoints/data/<step>/process_<i>.json`,
written before the orbax save so a committed step always has it. Frozen weights (LoRA base) are
not saved: they are re-derived from `init_from` / the seed, and checked against the base
fingerprint the training run wrote (`metaembed_jax.formats.trained`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from metaembed_jax.training.state import TrainState

FORMAT = 2  # 1 = one "state" item of numbered arrays (before params / opt_state were split)
ITEMS = ("params", "opt_state", "meta")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (corrupted, emptied, or of another format)."""


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def param_names(params: nnx.State) -> dict[str, Any]:
    """{"backbone.layers.0.attn.q_proj.kernel": array} of an nnx.State of parameters."""
    return {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(params)}


def _optimizer_part(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "other": state.other, "opt_state": state.opt_state}


def _flatten_optimizer_part(state: TrainState) -> tuple[dict[str, Any], list[str]]:
    """Flat {"000000": array} (PRNG keys as raw data) and the tree paths, in leaf order."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(_optimizer_part(state))
    arrays, paths = {}, []
    for index, (path, leaf) in enumerate(with_paths):
        arrays[f"{index:06d}"] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        paths.append(jax.tree_util.keystr(path))
    return arrays, paths


def _abstract(arrays: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
        for k, v in arrays.items()
    }


def _with_values(params: nnx.State, values: dict[str, Any]) -> nnx.State:
    """A copy of `params` holding `values` (by name), each in its template's sharding."""
    flat = []
    for path, variable in nnx.to_flat_state(params):
        flat.append((path, variable.replace(values[".".join(map(str, path))])))
    return nnx.from_flat_state(flat)


class Checkpointer:
    """Save / restore TrainState + data-iterator state; keep the last `keep`; async optional.

    `read_only=True` opens an existing run for reading (evaluation): nothing is created.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.data_directory = self.directory / "data"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save and not read_only,
            # Not orbax's read_only (it logs warnings for every option it overrides): a reader
            # that never calls save() writes nothing.
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The committed steps, oldest first."""
        return sorted(int(s) for s in self._manager.all_steps())

    def check_for_errors(self) -> None:
        """Raise the error of an asynchronous save that has failed (without waiting for one
        still running)."""
        self._manager.check_for_errors()
        # The manager's finalize thread keeps the error of a failed background save; waiting
        # on a finished thread returns at once, or raises that error.
        if not self._manager.is_saving_in_progress():
            self._manager.wait_until_finished()

    def save(self, state: TrainState, data_state: Any = None, *, force: bool = False) -> bool:
        """Start saving at `state.step` (returns at once when async); True if a save started.

        Raises the error of a previous asynchronous save that failed.
        """
        self.check_for_errors()
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        step_dir = self.data_directory / str(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        (step_dir / f"process_{jax.process_index()}.json").write_text(json.dumps(data_state))
        params = param_names(state.params)
        optimizer_arrays, optimizer_paths = _flatten_optimizer_part(state)
        meta = {"format": FORMAT, "params": sorted(params), "opt_state": optimizer_paths}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(optimizer_arrays),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        self._prune_data_states()
        return saved

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, Any]:
        """(state at `step` (default latest), this process's data-iterator state).

        `template` is a TrainState of the same model and optimizer (e.g. the fresh one): it gives
        the tree structure, shapes, shardings and the frozen weights.
        Raises FileNotFoundError if there is no checkpoint, CheckpointError if it does not fit or
        cannot be read (naming the step, the parameter and the newest intact earlier step).
        """
        step = self._step_to_read(step)
        optimizer_arrays, optimizer_paths = _flatten_optimizer_part(template)
        params = param_names(template.params)
        meta = self.read_meta(step)
        self._check_names(step, meta, "params", sorted(params))
        self._check_names(step, meta, "opt_state", optimizer_paths)
        args = dict(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(optimizer_arrays)),
        )
        restored = self._restore_items(step, args)
        leaves = jax.tree.leaves(_optimizer_part(template))
        values = []
        for template_leaf, key in zip(leaves, sorted(restored["opt_state"]), strict=True):
            value = restored["opt_state"][key]
            if _is_key(template_leaf):
                value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(template_leaf))
            values.append(value)
        part = jax.tree.unflatten(jax.tree.structure(_optimizer_part(template)), values)
        state = template.replace(params=_with_values(template.params, restored["params"]), **part)
        return state, self._read_data_state(step)

    def restore_params(self, abstract_params: nnx.State, step: int | None = None) -> nnx.State:
        """The trained parameters of `step` (default latest) only; no optimizer state is read.

        `abstract_params` (e.g. from `nnx.eval_shape`) gives names, shapes, dtypes and
        shardings. Raises FileNotFoundError / CheckpointError as `restore` does.
        """
        step = self._step_to_read(step)
        template = {
            name: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
            for name, v in (
                (".".join(map(str, path)), variable)
                for path, variable in nnx.to_flat_state(abstract_params)
            )
        }
        self._check_names(step, self.read_meta(step), "params", sorted(template))
        restored = self._restore_items(step, {"params": ocp.args.StandardRestore(template)})
        return _with_values(abstract_params, restored["params"])

    def read_meta(self, step: int) -> dict[str, Any]:
        """The `meta` item of `step`: {"format", "params": [names], "opt_state": [paths]}."""
        step_dir = self.directory / str(step)
        if (step_dir / "state").is_dir() and not (step_dir / "params").is_dir():
            raise CheckpointError(
                f"checkpoint {step_dir} is in the format before parameters and optimizer state "
                "were separate items; retrain, or evaluate it with the version that wrote it"
            )
        path = step_dir / "meta" / "metadata"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has no {path.name} file at {path}"
                f"{self._intact_hint(step)}"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(
                f"checkpoint step {step}: its metadata file {path} is not valid JSON ({error}); "
                f"the checkpoint is damaged{self._intact_hint(step)}"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(
                f"checkpoint step {step}: {path} holds format {meta!r:.80}, expected "
                f"{{'format': {FORMAT}, ...}}"
            )
        return meta

    def _step_to_read(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {self.directory} (steps there: {steps})"
            )
        return int(step)

    def _check_names(self, step: int, meta: dict, item: str, expected: list[str]) -> None:
        stored = list(meta.get(item, []))
        if stored == expected:
            return
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        detail = "; ".join(
            part
            for part in (
                f"not in the checkpoint: {', '.join(missing[:5])}" if missing else "",
                f"only in the checkpoint: {', '.join(unexpected[:5])}" if unexpected else "",
            )
            if part
        )
        raise CheckpointError(
            f"checkpoint {self.directory / str(step)} holds a different {item} tree (model or "
            f"optimizer settings changed since it was written): {detail or 'order differs'}"
        )

    def _restore_items(self, step: int, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as error:  # orbax / tensorstore raise many types for damaged files
            names = [n for item in args.values() for n in getattr(item, "item", {}) or {}]
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be read: "
                f"{_damaged_parameter(error, names)}{self._intact_hint(step, args)}"
            ) from error

    def _intact_hint(self, step: int, args: dict[str, Any] | None = None) -> str:
        """'; step N is intact: ...' for the newest earlier step that restores, else ''."""
        for earlier in reversed([s for s in self.all_steps() if s < step]):
            if args is None:
                try:
                    self.read_meta(earlier)
                except CheckpointError:
                    continue
                return f"; step {earlier} is intact{_pick_hint(earlier)}"
            try:
                self._manager.restore(earlier, args=ocp.args.Composite(**args))
            except Exception:  # noqa: BLE001 - any failure means "not intact"
                continue
            return f"; step {earlier} is intact{_pick_hint(earlier)}"
        return "; no earlier step is intact"

    def _read_data_state(self, step: int) -> Any:
        path = self.data_directory / str(step) / f"process_{jax.process_index()}.json"
        if not path.exists():
            raise FileNotFoundError(f"checkpoint step {step} has no data-iterator state at {path}")
        return json.loads(path.read_text())

    def _prune_data_states(self) -> None:
        # Keep the iterator states of the steps orbax keeps (plus the one being written).
        if jax.process_index() != 0 or not self.data_directory.exists():
            return
        kept = {str(s) for s in self._manager.all_steps()}
        newest = max(
            (int(p.name) for p in self.data_directory.iterdir() if p.name.isdigit()), default=None
        )
        for path in self.data_directory.iterdir():
            if path.name.isdigit() and path.name not in kept and int(path.name) != newest:
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self.check_for_errors()
        self._manager.close()


def _pick_hint(step: int) -> str:
    return (
        f" (evaluate it with eval.py --checkpoint {step} or load_trained(step={step}); to resume "
        "training from it, delete the newer step directories)"
    )


def _damaged_parameter(error: BaseException, names: list[str]) -> str:
    """'parameter NAME is damaged (first line of the cause)' from an orbax restore error."""
    text, cause = "", error
    while cause is not None:
        text += f"\n{cause}"
        cause = cause.__cause__ or cause.__context__
    # Longest first: "a.kernel" must not be reported for "a.kernel_scale".
    found = next((n for n in sorted(names, key=len, reverse=True) if n in text), None)
    first_line = next((line for line in str(error).splitlines() if line.strip()), type(error))
    reason = f"{first_line}"[:200]
    if found is None:
        return f"a file is damaged ({reason})"
    return f"parameter {found} is damaged ({reason})"
