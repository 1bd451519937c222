"""What eval.py runs: restore the model, encode every evaluation set once, score every budget,
report.

Evaluation sets come from the config:
- the built-in dataset's `config.eval.split` split, per task type (`config.eval.builtin`);
- ViDoRe / BEIR directories `config.data.beir.roots` (raw parquet or converted);
- MMEB datasets `config.data.mmeb_eval.datasets` under `config.data.mmeb_eval.root`
  (parquet in the official schema, images under `config.data.mmeb_eval.image_root`).
Embeddings are cached under `DIR/eval/cache/` keyed by the checkpoint, so a re-run or another
budget list re-encodes nothing; the report goes to `DIR/eval/{results.json,scaling.png}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metaembed_jax import sharding
from metaembed_jax.data import builders, sources
from metaembed_jax.data.pipeline import dataset_dir, make_processor, model_family
from metaembed_jax.evaluation import builtin, mmeb, report, vidore
from metaembed_jax.formats.trained import find_step, restore_trained_model
from metaembed_jax.losses import MMR_GROUPS
from metaembed_jax.retrieval.encode import EmbeddingCache, Encode, ModelEncoder, budget_key
from metaembed_jax.scoring import resolve_budgets
from metaembed_jax.training import run_identity

# The budgets the paper reports: those MMR trains.
DEFAULT_BUDGETS = tuple((r_q, r_c) for r_q, r_c, _ in MMR_GROUPS)


def configured_budgets(config) -> tuple[tuple[int, int], ...]:
    """`config.eval.budgets`; by default the paper's five, or (1, 1) for a single-vector model
    (which has no other budget). An explicit budget beyond the trained sizes is kept, and
    refused by `evaluate` (`scoring.resolve_budgets`)."""
    budgets = config.eval.budgets
    if budgets is not None:
        return tuple(tuple(b) for b in budgets)
    return ((1, 1),) if trained_sizes(config) == (1, 1) else DEFAULT_BUDGETS


def trained_sizes(config) -> tuple[int, int]:
    """(R_q, R_c) of the model the config trains (1, 1 for the single-vector readout)."""
    if config.model.get("readout", "meta") == "last_token":
        return 1, 1
    return int(config.model.num_query_tokens), int(config.model.num_candidate_tokens)


def mmeb_datasets(data_config) -> dict[str, Any]:
    """MMEB datasets named in `data_config.mmeb_eval.datasets`: the converted tables under
    `<data.dir>/mmeb_eval/<name>` when built, else the raw parquet rows under `mmeb_eval.root`."""
    section = data_config.get("mmeb_eval")
    if section is None or not section.get("datasets"):
        return {}
    datasets = {}
    for name in section.datasets:
        converted = Path(data_config.dir) / "mmeb_eval" / name
        if builders.eval_set_built(converted):
            datasets[name] = builders.read_eval_set(converted, "test")
            continue
        if not section.root:
            raise ValueError(
                f"MMEB dataset {name!r} is not converted under {converted} and "
                "config.data.mmeb_eval.root is empty"
            )
        files = sources.table_files(section.root, name)
        datasets[name] = [row for file in files for row in sources.iter_rows(file)]
    return datasets


def vidore_datasets(data_config) -> dict[str, Any]:
    """ViDoRe / BEIR sets of `data_config.beir.roots`: converted under `<data.dir>/beir/<name>`
    when built, else read from the raw directory."""
    roots = tuple(data_config.get("beir", {}).get("roots", ()) or ())
    datasets = {}
    for root in roots:
        converted = Path(data_config.dir) / "beir" / Path(root).name
        try:
            datasets[Path(root).name] = vidore.read_dataset(converted)
        except FileNotFoundError:
            datasets[Path(root).name] = vidore.read_dataset(root)
    return datasets


def run_suites(
    encode: Encode,
    config,
    budgets: Sequence[Sequence[int]],
    cache: EmbeddingCache | None,
) -> list[dict[str, Any]]:
    """Every evaluation set the config names, as report suites."""
    suites = []
    if config.eval.builtin:
        split = config.eval.split
        if config.data.name != "synthetic":
            logging.info("config.data.name=%r: no built-in split to evaluate", config.data.name)
        else:
            directory = dataset_dir(config.data)
            suites.append(
                builtin.evaluate_builtin(encode, directory, budgets, split=split, cache=cache)
            )
    datasets = vidore_datasets(config.data)
    if datasets:
        suites.append(vidore.evaluate_vidore(encode, datasets, budgets, cache=cache))
    rows = mmeb_datasets(config.data)
    if rows:
        image_root = config.data.mmeb_eval.image_root or None
        suites.append(mmeb.evaluate_mmeb(encode, rows, budgets, image_root=image_root, cache=cache))
    if not suites:
        raise ValueError(
            "nothing to evaluate: config.eval.builtin is off and config.data.beir.roots / "
            "config.data.mmeb_eval.datasets are empty"
        )
    return suites


def evaluate(
    config,
    workdir: str | os.PathLike,
    *,
    encode: Encode,
    model_fingerprint: str,
    model_info: dict[str, Any] | None = None,
    budgets: Sequence[Sequence[int]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Encode + score + report with a given encoder; returns (console table, results).

    Raises ValueError when a budget exceeds the trained sizes, before anything is encoded.
    """
    budgets = resolve_budgets(
        budgets if budgets is not None else configured_budgets(config), *trained_sizes(config)
    )
    eval_dir = Path(workdir) / "eval"
    cache = EmbeddingCache(
        eval_dir / "cache",
        model_fingerprint=model_fingerprint,
        index_dtype=config.eval.index_dtype,
    )
    suites = run_suites(encode, config, budgets, cache)
    return report.report(
        eval_dir,
        suites,
        [budget_key(b) for b in budgets],
        model_info=model_info,
        plot=config.eval.plot,
    )


def checkpoint_location(workdir, checkpoint: str | int | None) -> tuple[Path, int | None]:
    """(run directory, step or None = latest) from `--workdir` / `--checkpoint`.

    `checkpoint` may be a step number of `workdir` (`--checkpoint 400`), a step directory
    (`RUN/checkpoints/<step>`) or a run directory.
    """
    if checkpoint is None or checkpoint == "":
        return Path(workdir), None
    if isinstance(checkpoint, int) or str(checkpoint).isdigit():
        return Path(workdir), int(checkpoint)
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint!r} does not exist")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path, None
    raise ValueError(
        f"--checkpoint {checkpoint!r} is neither a step number, a step directory "
        "RUN/checkpoints/<step> nor a run directory holding checkpoints/"
    )


def model_fingerprint(config, run_dir: Path, step: int) -> str:
    """Identity of the embeddings a checkpoint produces: run dir, step, the step directory's
    modification time (a retrained run in the same dir differs) and the model / data settings
    (image resolution, buckets) that change what the encoder computes."""
    step_dir = run_dir / "checkpoints" / str(step)
    mtime = step_dir.stat().st_mtime_ns if step_dir.exists() else 0
    settings = json.dumps(
        {
            "model": config.model.to_dict(),
            "data": config.data.to_dict(),
            "lora": config.lora.to_dict(),
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return f"{run_dir.resolve()}@{step}:{mtime}:{digest}"


class LazyEncoder:
    """Restores the model and builds its `ModelEncoder` on the first call only: a run whose
    embeddings are all cached never loads the model."""

    def __init__(self, config, run_dir: Path, step: int):
        self.config, self.run_dir, self.step = config, run_dir, step
        self.encoder = None

    def _build(self):
        config = self.config
        mesh = sharding.make_mesh(config.mesh)
        family = model_family(config)
        processor = make_processor(
            config, family, self.run_dir
        )  # the run's tokenizer, as training used it
        model = restore_trained_model(
            config, self.run_dir, self.step, mesh=mesh, vocab_size=len(processor.tokenizer)
        )
        shards = sharding.batch_shards(mesh, tuple(config.data.batch_axes))
        batch_size = -(-int(config.eval.batch_size) // shards) * shards
        return ModelEncoder(
            model,
            processor,
            batch_size=batch_size,
            mesh=mesh,
            batch_axes=tuple(config.data.batch_axes),
            pad_features=family.static_shapes(config.data, batch_size, multiple=shards),
        )

    def __call__(self, items, side):
        if self.encoder is None:
            self.encoder = self._build()
        return self.encoder(items, side)


def run_config(config, run_dir: Path):
    """The config to evaluate `run_dir` with: the run's saved config.json when `config` is None,
    else `config` after checking it names the same model / loss / LoRA / base checkpoint.

    Raises RunMismatchError naming every differing field.
    """
    if config is None:
        return run_identity.read_saved_config(run_dir)
    run_identity.check_run_identity(run_dir, config, action="evaluate")
    return config


def run(config, workdir: str | os.PathLike, checkpoint: str | int | None = None):
    """eval.py: restore, encode (cached), score every budget, report; returns (table, results).

    `config` None = the run's saved config. Raises RunMismatchError for a config that is not
    the run's, ValueError for a budget beyond the trained sizes before anything is loaded
    (`evaluate` checks the budgets before the lazy encoder restores the model), and
    FileNotFoundError when there is no checkpoint to evaluate.
    """
    run_dir, step = checkpoint_location(workdir, checkpoint)
    config = run_config(config, run_dir)
    step = find_step(run_dir, step, config)
    r_q, r_c = trained_sizes(config)
    info = {
        "name": f"{run_dir.name} step {step}",
        "checkpoint": str(run_dir / "checkpoints" / str(step)),
        "step": step,
        "num_query_tokens": r_q,
        "num_candidate_tokens": r_c,
        "loss": config.loss.variant,
    }
    return evaluate(
        config,
        workdir,
        encode=LazyEncoder(config, run_dir, step),
        model_fingerprint=model_fingerprint(config, run_dir, step),
        model_info=info,
        budgets=configured_budgets(config),
    )
