"""The `metaembed` console script: use a trained run from the command line.

    metaembed index build --run DIR --corpus PATH --out INDEX [--dtype int8] [--batch-size N]
        [--add] [--dpi 96] [--skip-bad | --no-skip-bad] [--allow-other-model]
    metaembed index search (--index INDEX | --qdrant PATH_OR_URL --collection NAME) --run DIR
        --query "text" [--query-image img.png] [--queries-file FILE] --budget 16x64 --k 10
        [--coarse 1x1 --shortlist 300] [--json] [--allow-other-model]
    metaembed index push --index INDEX --qdrant PATH_OR_URL --collection NAME
        [--prefixes 1,4,16,64] [--overwrite] [--shard-number N] [--replication-factor N]
    metaembed export --run DIR --out OUT [--format hf|peft] [--step N] [--force]
    metaembed import-reference --base DIR --adapter DIR --out RUN [--r_q N]
    metaembed configs [NAME [--path]]        the bundled recipes (or one's file: its text)
    metaembed train --config demo --workdir DIR [--config.train.steps=100 ...]   = train.py
    metaembed eval --workdir DIR [--config demo]                                 = eval.py
    metaembed data --config demo [--convert_eval]      the datasets a recipe names
    metaembed compile --config qwen2_5_vl_3b --topology v5p:4x4x4 [--slices N]
        [--index-size N] [--json] [--config.x=...]   compiled for a TPU topology (docs/tpu.md)

`train`, `eval`, `data` and `compile` are absl programs (metaembed_jax/cli/apps.py; train.py /
eval.py run the first two), so an installed package builds data, trains, evaluates and compiles
without a checkout; index / search / export read the run's own saved config.
`python -m metaembed_jax ...` is the same command. A user's mistake ends in one line on stderr
and exit status 2 (the command line) or 1 (anything else), never a traceback (`cli/errors.py`);
every `--help` shows the defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from metaembed_jax.cli.errors import reporting_errors


def parse_budget(text: str) -> tuple[int, int]:
    """ "16x64" -> (16, 64). Raises argparse.ArgumentTypeError for anything else."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"budget {text!r}: expected R_QxR_C, e.g. 16x64")
    return int(parts[0]), int(parts[1])


def parse_prefixes(text: str) -> tuple[int, ...]:
    """ "1,4,16,64" -> (1, 4, 16, 64). Raises argparse.ArgumentTypeError for anything else."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"prefixes {text!r}: expected R_C values, e.g. 1,4,16,64")
    return tuple(int(p) for p in parts)


class HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help already says it (a default
    that means "whatever the run has" is written out there) or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings:
            return text
        if action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return text
        return f"{text} (default: %(default)s)"


QDRANT_HELP = "a directory (Qdrant's embedded engine) or a server URL (http://host:6333)"
STEP_HELP = "checkpoint step (default: the latest)"
OTHER_MODEL_HELP = (
    "use an index another model (another run, or this run at another step) built: refused "
    "otherwise, since its vectors mean nothing to this model"
)


def _command(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    return commands.add_parser(name, formatter_class=HelpWithDefaults, **kwargs)


def _add_build(actions) -> None:
    build = _command(actions, "build", help="encode a corpus into an index (resumable)")
    build.add_argument("--run", required=True, help="training run directory (train.py --workdir)")
    build.add_argument("--step", type=int, default=None, help=STEP_HELP)
    build.add_argument(
        "--corpus", required=True, help="folder of png/jpg/webp/pdf files, or a .jsonl"
    )
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("float32", "bfloat16", "int8"),
        help="storage dtype of the vectors",
    )
    build.add_argument(
        "--batch-size", type=int, default=None, help="items per encoder call (default: the run's)"
    )
    build.add_argument("--chunk-size", type=int, default=256, help="items per resumable chunk")
    build.add_argument(
        "--dpi",
        type=int,
        default=96,
        help="upper bound of the resolution of rendered PDF pages (each page is rendered to the "
        "model's pixel budget, at most this)",
    )
    build.add_argument("--add", action="store_true", help="append new ids to an existing index")
    build.add_argument(
        "--skip-bad",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip files that cannot be read (listed at the end and in the index's manifest) "
        "or stop at the first, naming it (default: skip for a folder, stop for a .jsonl)",
    )
    build.add_argument(
        "--allow-other-model", action="store_true", help="with --add: " + OTHER_MODEL_HELP
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_push(actions) -> None:
    push = _command(actions, "push", help="push an index to a Qdrant collection")
    push.add_argument("--index", required=True, help="index directory (index build --out)")
    push.add_argument("--qdrant", required=True, help=QDRANT_HELP)
    push.add_argument("--collection", required=True, help="the Qdrant collection to write")
    push.add_argument(
        "--prefixes",
        type=parse_prefixes,
        default=(1, 4, 16, 64),
        help="candidate prefixes r_c to store, each stored again (default: 1,4,16,64)",
    )
    push.add_argument("--overwrite", action="store_true", help="replace an existing collection")
    push.add_argument("--shard-number", type=int, default=None, help="server: shards")
    push.add_argument("--replication-factor", type=int, default=None, help="server: replicas")
    push.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_search(actions) -> None:
    search = _command(actions, "search", help="answer queries from an index")
    where = search.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", help="index directory (index build --out)")
    where.add_argument("--qdrant", help=f"a Qdrant collection's home: {QDRANT_HELP}")
    search.add_argument("--collection", default=None, help="the Qdrant collection (--qdrant)")
    search.add_argument("--run", required=True, help="the training run that built the index")
    search.add_argument("--step", type=int, default=None, help=STEP_HELP)
    search.add_argument("--query", action="append", default=[], help="a text query (repeatable)")
    search.add_argument(
        "--query-image", default=None, help="an image for the query (with or without --query)"
    )
    search.add_argument(
        "--queries-file",
        default=None,
        help='one text query per line, or a .jsonl of {"id", "text", "image"} (image paths '
        "relative to the file)",
    )
    search.add_argument(
        "--budget",
        type=parse_budget,
        default=None,
        help="R_QxR_C, e.g. 16x64 (default: the full trained budget)",
    )
    search.add_argument(
        "--k",
        type=int,
        default=None,
        help="results per query (default: 10; more than the index holds: all, with a note)",
    )
    search.add_argument(
        "--coarse", type=parse_budget, default=None, help="first-stage budget, e.g. 1x1"
    )
    search.add_argument(
        "--shortlist",
        type=int,
        default=None,
        help="candidates the --coarse stage keeps for re-ranking (default: 1000)",
    )
    search.add_argument(
        "--batch-size", type=int, default=None, help="queries per encoder call (default: the run's)"
    )
    search.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per query: query, query_id, text, image, results [{id, score}]",
    )
    search.add_argument("--allow-other-model", action="store_true", help=OTHER_MODEL_HELP)


def _add_export(commands) -> None:
    export = _command(commands, "export", help="write a run for transformers / PyTorch users")
    export.add_argument("--run", required=True, help="training run directory (train.py --workdir)")
    export.add_argument("--step", type=int, default=None, help=STEP_HELP)
    export.add_argument(
        "--out",
        required=True,
        help="directory to write: not inside a run or index directory, and new or empty",
    )
    export.add_argument(
        "--force", action="store_true", help="write into an existing non-empty --out"
    )
    export.add_argument(
        "--format",
        default="hf",
        choices=("hf", "peft"),
        help="hf: merged transformers checkpoint; peft: PEFT LoRA adapter on the run's base",
    )


def _add_import_reference(commands) -> None:
    imported = _command(
        commands,
        "import-reference",
        help="turn a model trained with the reference PyTorch MetaEmbed into a run directory",
    )
    imported.add_argument("--base", required=True, help="the base checkpoint dir or Hub id")
    imported.add_argument("--adapter", required=True, help="the PEFT adapter directory")
    imported.add_argument("--out", required=True, help="run directory to write")
    imported.add_argument(
        "--r_q",
        type=int,
        default=None,
        help="query meta tokens R_q (the reference stores none; default: 16 for an 80-row table)",
    )
    imported.add_argument(
        "--projection-dim",
        type=int,
        default=None,
        help="apply the base's custom_text_proj of this width (the adapter's is always applied)",
    )
    imported.add_argument(
        "--recipe",
        default=None,
        help="recipe giving the data settings (default: the family's reference recipe)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaembed",
        description="Index and search with a trained MetaEmbed run.",
        formatter_class=HelpWithDefaults,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    index = _command(commands, "index", help="build or search a multi-vector index")
    actions = index.add_subparsers(dest="action", required=True)
    _add_build(actions)
    _add_push(actions)
    _add_search(actions)
    _add_export(commands)
    _add_import_reference(commands)
    configs = _command(commands, "configs", help="list the bundled recipes, or print one")
    configs.add_argument("name", nargs="?", default=None, help="a recipe name, e.g. demo")
    configs.add_argument(
        "--path", action="store_true", help="print the recipe file's path, not its text"
    )
    programs = (
        ("train", "train.py"),
        ("eval", "eval.py"),
        ("data", "the dataset build"),
        ("compile", "TPU compile"),
    )
    for name, what in programs:
        program = commands.add_parser(name, help=f"the {what} program (absl flags, see --help)")
        program.add_argument("flags", nargs=argparse.REMAINDER, help=f"{what}'s flags")
    return parser


def _configs(args) -> None:
    from metaembed_jax.training.recipes import config_dir, config_names, config_path

    if args.name:
        path = config_path(args.name)
        print(
            path if args.path else path.read_text(encoding="utf-8"), end="\n" if args.path else ""
        )
        return
    print(f"bundled recipes in {config_dir()} (use as --config NAME[:variant]):")
    for name in config_names():
        print(f"  {name}")


def _export(args) -> None:
    from metaembed_jax.formats.files import require_torch

    require_torch()  # before the export's imports load transformers (its own warning)
    from metaembed_jax.formats.export import export_run

    print(export_run(args.run, args.out, args.format, step=args.step, force=args.force))


def _import_reference(args) -> None:
    from metaembed_jax.formats.reference import import_reference

    out = import_reference(
        args.base,
        args.adapter,
        args.out,
        args.r_q,
        recipe=args.recipe,
        projection_dim=args.projection_dim,
    )
    print(f"{out}: a run directory (step 0); use it with eval.py --workdir, metaembed index")


def _index(args) -> None:
    from metaembed_jax.cli import index_commands

    commands = {
        "build": index_commands.index_build,
        "push": index_commands.index_push,
        "search": index_commands.index_search,
    }
    commands[args.action](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `metaembed` script; returns the exit status (0, or SystemExit with
    1 for a user error and 2 for a bad command line, each said in one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval", "data", "compile"):
        # absl parses these flags itself (argparse would reject `--config.train.steps=5`).
        from metaembed_jax.cli import apps

        programs = {
            "train": apps.run_train,
            "eval": apps.run_eval,
            "data": apps.run_data,
            "compile": apps.run_compile,
        }
        # `--index-size` as the command line spells it; absl names the flag `index_size`.
        flags = [a.replace("--index-size", "--index_size", 1) for a in argv[1:]]
        programs[argv[0]]([f"metaembed {argv[0]}", *flags])
        return 0
    args = build_parser().parse_args(argv)
    name = " ".join(
        ["metaembed", args.command] + ([args.action] if args.command == "index" else [])
    )
    commands = {
        "index": _index,
        "configs": _configs,
        "export": _export,
        "import-reference": _import_reference,
    }
    with reporting_errors(name):
        commands[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
