"""The `metaembed` console script: use a trained run from the command line.

    metaembed index build --run DIR --corpus PATH --out INDEX [--dtype int8] [--batch-size N]
        [--add] [--dpi 96]
    metaembed index search (--index INDEX | --qdrant PATH_OR_URL --collection NAME) --run DIR
        --query "text" [--query-image img.png] [--queries-file FILE] --budget 16x64 --k 10
        [--coarse 1x1 --shortlist 300] [--json]
    metaembed index push --index INDEX --qdrant PATH_OR_URL --collection NAME
        [--prefixes 1,4,16,64] [--overwrite] [--shard-number N] [--replication-factor N]
    metaembed export --run DIR --out OUT [--format hf|peft] [--step N]
    metaembed import-reference --base DIR --adapter DIR --out RUN [--r_q N]
    metaembed configs [NAME]                 the bundled recipes (or the file of one)
    metaembed train --config demo --workdir DIR [--config.train.steps=100 ...]   = train.py
    metaembed eval --workdir DIR [--config demo]                                 = eval.py
    metaembed data --config demo [--convert_eval]      the datasets a recipe names
    metaembed compile --config qwen2_5_vl_3b --topology v5p:4x4x4 [--slices N]
        [--index-size N] [--json] [--config.x=...]   compiled for a TPU topology (docs/tpu.md)

`train`, `eval`, `data` and `compile` are absl programs (metaembed_jax/cli/apps.py; train.py /
eval.py run the first two), so an installed package builds data, trains, evaluates and compiles
without a checkout; index / search / export read the run's own saved config.
`python -m metaembed_jax ...` is the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


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


QDRANT_HELP = "a directory (Qdrant's embedded engine) or a server URL (http://host:6333)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaembed", description="Index and search with a trained MetaEmbed run."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="build or search a multi-vector index")
    actions = index.add_subparsers(dest="action", required=True)

    build = actions.add_parser("build", help="encode a corpus into an index (resumable)")
    build.add_argument("--run", required=True, help="training run directory (train.py --workdir)")
    build.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    build.add_argument(
        "--corpus", required=True, help="folder of png/jpg/webp/pdf files, or a .jsonl"
    )
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "int8"))
    build.add_argument("--batch-size", type=int, default=None, help="items per encoder call")
    build.add_argument("--chunk-size", type=int, default=256, help="items per resumable chunk")
    build.add_argument("--dpi", type=int, default=96, help="resolution of rendered PDF pages")
    build.add_argument("--add", action="store_true", help="append new ids to an existing index")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    push = actions.add_parser("push", help="push an index to a Qdrant collection")
    push.add_argument("--index", required=True, help="index directory (index build --out)")
    push.add_argument("--qdrant", required=True, help=QDRANT_HELP)
    push.add_argument("--collection", required=True, help="the Qdrant collection to write")
    push.add_argument(
        "--prefixes",
        type=parse_prefixes,
        default=(1, 4, 16, 64),
        help="candidate prefixes r_c to store, each stored again (default 1,4,16,64)",
    )
    push.add_argument("--overwrite", action="store_true", help="replace an existing collection")
    push.add_argument("--shard-number", type=int, default=None, help="server: shards")
    push.add_argument("--replication-factor", type=int, default=None, help="server: replicas")
    push.add_argument("--no-progress", action="store_true", help="no progress bar")

    search = actions.add_parser("search", help="answer queries from an index")
    where = search.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", help="index directory (index build --out)")
    where.add_argument("--qdrant", help=f"a Qdrant collection's home: {QDRANT_HELP}")
    search.add_argument("--collection", default=None, help="the Qdrant collection (--qdrant)")
    search.add_argument("--run", required=True, help="the training run that built the index")
    search.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    search.add_argument("--query", action="append", default=[], help="a text query (repeatable)")
    search.add_argument(
        "--query-image", default=None, help="an image for the query (with or without --query)"
    )
    search.add_argument(
        "--queries-file", default=None, help="one text query per line, or a .jsonl of items"
    )
    search.add_argument("--budget", type=parse_budget, default=None, help="R_QxR_C (e.g. 16x64)")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--coarse", type=parse_budget, default=None, help="first-stage budget")
    search.add_argument("--shortlist", type=int, default=1000, help="candidates re-ranked")
    search.add_argument("--batch-size", type=int, default=None, help="queries per encoder call")
    search.add_argument("--json", action="store_true", help="one JSON object per query")

    export = commands.add_parser("export", help="write a run for transformers / PyTorch users")
    export.add_argument("--run", required=True, help="training run directory (train.py --workdir)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    export.add_argument("--out", required=True, help="directory to write")
    export.add_argument(
        "--format",
        default="hf",
        choices=("hf", "peft"),
        help="hf: merged transformers checkpoint; peft: PEFT LoRA adapter on the run's base",
    )

    imported = commands.add_parser(
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
        help="query meta tokens R_q (the reference stores none; default 16 for an 80-row table)",
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

    configs = commands.add_parser("configs", help="list the bundled recipes, or print one's path")
    configs.add_argument("name", nargs="?", default=None, help="a recipe name, e.g. demo")
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
        print(config_path(args.name))
        return
    print(f"bundled recipes in {config_dir()} (use as --config NAME[:variant]):")
    for name in config_names():
        print(f"  {name}")


def _queries(args) -> list[dict]:
    queries = []
    image = Path(args.query_image).read_bytes() if args.query_image else None
    for text in args.query:
        queries.append({"text": text, "image": image})
    if image is not None and not args.query:
        queries.append({"text": "", "image": image})
    if args.queries_file:
        path = Path(args.queries_file)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SystemExit(f"{path} line {number} is not JSON ({error})") from None
                row_image = row.get("image")
                queries.append(
                    {
                        "text": row.get("text") or "",
                        "image": (path.parent / row_image).read_bytes() if row_image else None,
                    }
                )
            else:
                queries.append({"text": line, "image": None})
    if not queries:
        raise SystemExit("no query: give --query, --query-image or --queries-file")
    return queries


def _index_build(args) -> None:
    from metaembed_jax.retrieval.retriever import Retriever, build_index

    retriever = Retriever.load(args.run, args.step, batch_size=args.batch_size)
    index = build_index(
        retriever,
        args.corpus,
        args.out,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        add=args.add,
        dpi=args.dpi,
        progress=not args.no_progress,
    )
    print(f"{args.out}: {len(index)} items, {index.nbytes / 2**20:.1f} MiB ({index.dtype})")


def _index_push(args) -> None:
    from metaembed_jax.retrieval.index import MultiVectorIndex
    from metaembed_jax.retrieval.qdrant import QdrantIndex, location

    index = MultiVectorIndex.load(args.index)
    pushed = QdrantIndex.from_index(
        index,
        **location(args.qdrant),
        collection=args.collection,
        prefixes=args.prefixes,
        overwrite=args.overwrite,
        shard_number=args.shard_number,
        replication_factor=args.replication_factor,
        progress=not args.no_progress,
    )
    print(
        f"{args.qdrant} {args.collection}: {len(pushed)} items, prefixes "
        f"{','.join(map(str, pushed.prefixes))} ({pushed.dtype})"
    )
    pushed.close()


def _open_index(args):
    if args.qdrant is None:
        from metaembed_jax.retrieval.index import MultiVectorIndex

        if args.collection is not None:
            raise SystemExit("--collection goes with --qdrant, not --index")
        return MultiVectorIndex.load(args.index)
    from metaembed_jax.retrieval.qdrant import QdrantIndex, location

    if args.collection is None:
        raise SystemExit("--qdrant needs --collection NAME")
    return QdrantIndex(**location(args.qdrant), collection=args.collection)


def _index_search(args) -> None:
    from metaembed_jax.retrieval.retriever import Retriever

    queries = _queries(args)
    index = _open_index(args)
    retriever = Retriever.load(args.run, args.step, batch_size=args.batch_size)
    results = retriever.search(
        queries,
        index,
        budget=args.budget,
        k=args.k,
        coarse_budget=args.coarse,
        shortlist=args.shortlist,
    )
    for query, hits in zip(queries, results, strict=True):
        label = query["text"] or "<image>"
        if args.json:
            rows = [{"id": i, "score": s} for i, s in hits]
            print(json.dumps({"query": label, "results": rows}))
        else:
            print(f"query: {label}")
            for rank, (doc_id, score) in enumerate(hits, 1):
                print(f"  {rank:3d}. {score:9.4f}  {doc_id}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `metaembed` script; returns the exit status."""
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
    if args.command == "index":
        {"build": _index_build, "push": _index_push, "search": _index_search}[args.action](args)
    elif args.command == "configs":
        _configs(args)
    elif args.command == "import-reference":
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
    elif args.command == "export":
        from metaembed_jax.formats.files import MissingTorchError, require_torch

        try:
            require_torch()  # before the export's imports load transformers (its own warning)
        except MissingTorchError as error:  # an install step, not a bug: no traceback
            print(f"metaembed export: {error}", file=sys.stderr)
            return 1
        from metaembed_jax.formats.export import export_run

        print(export_run(args.run, args.out, args.format, step=args.step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
