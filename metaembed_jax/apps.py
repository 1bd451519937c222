"""The training and evaluation programs (absl apps), shared by train.py / eval.py in a checkout
and by `metaembed train` / `metaembed eval` in an installed package.

`--config` takes a recipe file (`configs/demo.py[:variant]`) or, where no such file exists, the
name of a bundled recipe (`demo[:variant]`, see `metaembed configs`). Flags are defined when a
program starts, not at import, so both programs can live in one module.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from metaembed_jax.config_files import resolve_config_argv


def _check_no_positional(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


def _train_main(argv):
    from metaembed_jax.cli import warnings_only_unless_verbosity_given
    from metaembed_jax.training.loop import train

    _check_no_positional(argv)
    warnings_only_unless_verbosity_given()
    rows = train(flags.FLAGS.config, flags.FLAGS.workdir)
    if rows:
        print(f"last logged step {rows[-1]['step']}: loss {rows[-1]['loss']:.4f}")


def run_train(argv: Sequence[str] | None = None) -> None:
    """`train.py --config configs/demo.py --workdir DIR [--config.train.steps=100 ...]`."""
    config_flags.DEFINE_config_file(
        "config", None, "Training recipe: a file (configs/*.py[:variant]) or a bundled name."
    )
    flags.DEFINE_string("workdir", None, "Directory of metrics, checkpoints and TensorBoard.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(_train_main, argv=resolve_config_argv(sys.argv if argv is None else argv))


def _eval_main(argv):
    from metaembed_jax.cli import warnings_only_unless_verbosity_given
    from metaembed_jax.evaluation import runner

    _check_no_positional(argv)
    warnings_only_unless_verbosity_given()
    values = flags.FLAGS
    table, _ = runner.run(values.config, values.workdir, checkpoint=values.checkpoint)
    print(table)


def run_eval(argv: Sequence[str] | None = None) -> None:
    """`eval.py --workdir DIR [--config RECIPE] [--checkpoint STEP]`."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Recipe (file or bundled name); default: the run's config.json.",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints are read, eval/ written.")
    flags.DEFINE_string(
        "checkpoint",
        None,
        "A step of workdir (400) or a step directory DIR/checkpoints/400 (default: the latest).",
    )
    flags.mark_flags_as_required(["workdir"])
    app.run(_eval_main, argv=resolve_config_argv(sys.argv if argv is None else argv))
