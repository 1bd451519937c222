"""The dataset, training and evaluation programs (absl apps), shared by train.py / eval.py in a
checkout and by `metaembed data` / `metaembed train` / `metaembed eval` in an installed package.

`--config` takes a recipe file (`configs/demo.py[:variant]`) or, where no such file exists, the
name of a bundled recipe (`demo[:variant]`, see `metaembed configs`). Flags are defined when a
program starts, not at import, so both programs can live in one module; `--help` lists them.

A bad flag or config override (`--config.train.stepz=5`) ends in one line and exit status 2, a
user error while running (a missing run, a config the run refuses, a busy run directory) in one
line and 1 (`cli.errors`); training stopped by SIGTERM / SIGINT exits 143 / 130 after saving.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from metaembed_jax.cli import compile as tpu_compile
from metaembed_jax.cli.errors import USAGE_EXIT, message, reporting_errors
from metaembed_jax.data.build import build
from metaembed_jax.data.pipeline import model_family
from metaembed_jax.evaluation import runner
from metaembed_jax.training.loop import StoppedBySignal, train
from metaembed_jax.training.recipes import resolve_config_argv


def warnings_only_unless_verbosity_given() -> None:
    """absl logging at WARNING unless ``--verbosity`` was passed: orbax logs several INFO lines
    per checkpoint save or restore, which would bury the progress bars (``--verbosity=0`` shows
    them)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _program_name() -> str:
    return os.path.basename(sys.argv[0]) or "metaembed"


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with every failure in one line and exit status 2: an unknown or
    missing flag, and a config override naming no config field, which ml_collections raises
    as a KeyError / AttributeError from inside absl (three chained tracebacks otherwise)."""
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as error:
        problem = message(error)
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        problem = _override_problem(error, argv)
    print(f"{argv[0]}: error: {problem} (see --help)", file=sys.stderr)
    raise SystemExit(USAGE_EXIT)


def _override_problem(error: BaseException, argv: Sequence[str]) -> str:
    """ "--config.train.stepz=5: no config field 'stepz' (Did you mean "steps" ...?)"."""
    texts = []
    while error is not None:  # ml_collections wraps its KeyError twice; the first says most
        texts.append(message(error))
        error = error.__context__
    detail = next((t for t in reversed(texts) if "Did you mean" in t), texts[-1])
    detail = " ".join(detail.split())
    key = texts[-1].strip("'")  # the innermost error: the missing field's name
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    flag = next((a for a in overrides if key and key in a), "a --config.* override")
    return f"{flag}: no such config field ({detail})"


def _run(main, argv: Sequence[str], names: Sequence[str]) -> None:
    """`app.run(main)` with our flag parsing, `--help` listing `names` (absl lists only the
    flags of the __main__ module, and these are defined here), and user errors reported."""
    for name in names:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])

    def reported(args):
        with reporting_errors(args[0] if args else _program_name()):
            return main(args)

    app.run(reported, argv=resolve_config_argv(list(argv)), flags_parser=_parse_flags)


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
    _run(_data_main, sys.argv if argv is None else argv, ("config", "convert_eval"))


def _check_no_positional(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


def _train_main(argv):
    _check_no_positional(argv)
    warnings_only_unless_verbosity_given()
    try:
        rows = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except StoppedBySignal as stopped:  # not a success: `make demo` must not go on to eval
        print(f"{argv[0]}: {stopped}", file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None
    if rows:
        print(f"last logged step {rows[-1]['step']}: loss {rows[-1]['loss']:.4f}")


def run_train(argv: Sequence[str] | None = None) -> None:
    """`train.py --config configs/demo.py --workdir DIR [--config.train.steps=100 ...]`."""
    config_flags.DEFINE_config_file(
        "config", None, "Training recipe: a file (configs/*.py[:variant]) or a bundled name."
    )
    flags.DEFINE_string("workdir", None, "Directory of metrics, checkpoints and TensorBoard.")
    flags.mark_flags_as_required(["config", "workdir"])
    _run(_train_main, sys.argv if argv is None else argv, ("config", "workdir"))


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
    _run(_eval_main, sys.argv if argv is None else argv, ("config", "workdir", "checkpoint"))


def _compile_main(argv) -> int:
    _check_no_positional(argv)
    values = flags.FLAGS
    hbm = None if values.hbm_gib is None else int(values.hbm_gib * 2**30)
    try:
        report = tpu_compile.compile_recipe(
            values.config,
            values.topology,
            slices=values.slices,
            index_size=values.index_size,
            hbm_bytes=hbm,
            parts=tuple(values.parts),
        )
    except Exception as error:  # every failure of a compile is reported, with exit status 1
        if values.json:
            print(
                json.dumps({"compiled": False, "topology": values.topology, "error": repr(error)})
            )
        else:
            traceback.print_exc()
        print(f"compile failed: {error!r}", file=sys.stderr)
        return 1
    print(json.dumps(report) if values.json else tpu_compile.format_report(report))
    return 0 if report["fits"] else 3


def run_compile(argv: Sequence[str] | None = None) -> None:
    """`metaembed compile --config RECIPE --topology v5p:4x4x4 [--slices N] [--index_size N]
    [--json] [--config.x=...]`: the recipe's steps compiled for a TPU topology without a TPU
    (`metaembed_jax/cli/compile.py`). Exits 0 when it compiled and fits, 3 when it compiled
    and does not fit or the compiler refused it for HBM, 1 on any other error (printed)."""
    import os

    import jax

    # Only the TPU compiler is needed: no local accelerator (nor libtpu's runtime) starts.
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    config_flags.DEFINE_config_file(
        "config", None, "Recipe: a file (configs/*.py[:variant]) or a bundled name."
    )
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v5e:2x2, v6e:8x8.")
    flags.DEFINE_integer("slices", 1, "Slices of the topology (data parallel over DCN).")
    flags.DEFINE_integer(
        "index_size", 0, "Candidates of the compiled index search at the full budget (0: none)."
    )
    flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
    flags.DEFINE_float("hbm_gib", None, "HBM per chip in GiB instead of the chip's (tests).")
    flags.DEFINE_list("parts", ["train", "encode", "index"], "Programs to compile.")
    flags.mark_flags_as_required(["config", "topology"])
    names = ("config", "topology", "slices", "index_size", "json", "hbm_gib", "parts")
    _run(_compile_main, sys.argv if argv is None else argv, names)
