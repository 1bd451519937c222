"""The `metaembed` console script: use a trained run from the command line.

    metaembed index build --run DIR --corpus PATH --out INDEX [--dtype int8] [--batch-size N]
        [--add] [--dpi 96]
    metaembed index search --index INDEX --run DIR --query "text" [--query-image img.png]
        [--queries-file FILE] --budget 16x64 --k 10 [--coarse 1x1 --shortlist 300] [--json]
    metaembed export --run DIR --out OUT [--format hf|peft] [--step N]
    metaembed configs [NAME]                 the bundled recipes (or the file of one)
    metaembed train --config demo --workdir DIR [--config.train.steps=100 ...]   = train.py
    metaembed eval --workdir DIR [--config demo]                                 = eval.py
    metaembed compile --config qwen2_5_vl_3b --topology v5p:4x4x4 [--slices N]
        [--index-size N] [--json] [--config.x=...]   compiled for a TPU topology (docs/tpu.md)

`train`, `eval` and `compile` are absl programs (metaembed_jax/apps.py; the first two those of
train.py / eval.py), so an installed package trains and evaluates without a checkout; index /
search / export read the run's own saved config.
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

    search = actions.add_parser("search", help="answer queries from an index")
    search.add_argument("--index", required=True, help="index directory (index build --out)")
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

    configs = commands.add_parser("configs", help="list the bundled recipes, or print one's path")
    configs.add_argument("name", nargs="?", default=None, help="a recipe name, e.g. demo")
    programs = (("train", "train.py"), ("eval", "eval.py"), ("compile", "TPU compile"))
    for name, what in programs:
        program = commands.add_parser(name, help=f"the {what} program (absl flags, see --help)")
        program.add_argument("flags", nargs=argparse.REMAINDER, help=f"{what}'s flags")
    return parser


def _configs(args) -> None:
    from metaembed_jax.config_files import config_dir, config_names, config_path

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
    from metaembed_jax.retriever import Retriever, build_index

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


def _index_search(args) -> None:
    from metaembed_jax.index import MultiVectorIndex
    from metaembed_jax.retriever import Retriever

    queries = _queries(args)
    index = MultiVectorIndex.load(args.index)
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
    if argv and argv[0] in ("train", "eval", "compile"):
        # absl parses these flags itself (argparse would reject `--config.train.steps=5`).
        from metaembed_jax import apps

        program = {"train": apps.run_train, "eval": apps.run_eval, "compile": apps.run_compile}
        # `--index-size` as the command line spells it; absl names the flag `index_size`.
        flags = [a.replace("--index-size", "--index_size", 1) for a in argv[1:]]
        program[argv[0]]([f"metaembed {argv[0]}", *flags])
        return 0
    args = build_parser().parse_args(argv)
    if args.command == "index":
        {"build": _index_build, "search": _index_search}[args.action](args)
    elif args.command == "configs":
        _configs(args)
    elif args.command == "export":
        from metaembed_jax.export import export_run

        print(export_run(args.run, args.out, args.format, step=args.step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
