"""The dataset, training and evaluation programs (absl apps), shared by train.py / eval.py in a
checkout and by `metaembed data` / `metaembed train` / `metaembed eval` in an installed package.

`--config` takes a recipe file (`configs/demo.py[:variant]`) or, where no such file exists, the
name of a bundled recipe (`demo[:variant]`, see `metaembed configs`). Flags are defined when a
program starts, not at import, so both programs can live in one module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from metaembed_jax.data.build import build
from metaembed_jax.data.pipeline import model_family
from metaembed_jax.evaluation import runner
from metaembed_jax.training.loop import train
from metaembed_jax.training.recipes import resolve_config_argv


def warnings_only_unless_verbosity_given() -> None:
    """absl logging at WARNING unless ``--verbosity`` was passed: orbax logs several INFO lines
    per checkpoint save or restore, which would bury the progress bars (``--verbosity=0`` shows
    them)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _data_main(argv):
    _check_no_positional(argv)
    config = flags.FLAGS.config
    special_tokens = model_family(config).special_tokens
    for directory in build(config.data, special_tokens, convert_eval=flags.FLAGS.convert_eval):
        print(f"built {os.fspath(directory)}")


def run_data(argv: Sequence[str] | None = None) -> None:
    """`metaembed data --config configs/demo.py [--convert_eval]`: the datasets a recipe names
    (metaembed_jax.data.build)."""
    config_flags.DEFINE_config_file(
        "config", None, "Recipe: a file (configs/*.py[:variant]) or a bundled name (demo)."
    )
    flags.DEFINE_bool(
        "convert_eval", False, "Also convert the MMEB eval / BEIR sets the config lists."
    )
    flags.mark_flag_as_required("config")
    app.run(_data_main, argv=resolve_config_argv(sys.argv if argv is None else argv))


def _check_no_positional(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


def _train_main(argv):
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
