"""`metaembed index build | push | search`: the commands behind the parser of `cli/main.py`.

Every check that needs no model runs before the model loads (a missing corpus, index or
queries file, an existing `--out`, a budget beyond the run's trained sizes, an empty query),
so a mistake costs a second, not the 25-55 s of loading and compiling; a line on stderr says
when the model starts loading.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from metaembed_jax.cli.errors import UsageError
from metaembed_jax.evaluation.runner import trained_sizes
from metaembed_jax.formats.trained import find_step
from metaembed_jax.retrieval.build import build_index
from metaembed_jax.retrieval.index import MultiVectorIndex
from metaembed_jax.retrieval.qdrant import QdrantIndex, location
from metaembed_jax.retrieval.retriever import Retriever
from metaembed_jax.scoring import resolve_budgets
from metaembed_jax.training.run_identity import read_saved_config

DEFAULT_K = 10


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_retriever(args) -> Retriever:
    """The run's retriever, announced on stderr first (loading and compiling take a while)."""
    step = find_step(Path(args.run), args.step)
    note(f"loading the model of {args.run} (step {step}); the first batch compiles it ...")
    return Retriever.load(args.run, step, batch_size=args.batch_size)


# ----------------------------------------------------------------------------- build


def index_build(args) -> None:
    out = Path(args.out)
    if out.exists() and not args.add:
        raise FileExistsError(f"{out} exists: pass --add to append to it, or choose another --out")
    if not Path(args.corpus).exists():
        raise FileNotFoundError(f"corpus {args.corpus} does not exist")
    read_saved_config(args.run)  # a missing run is named before anything loads
    retriever = load_retriever(args)
    index = build_index(
        retriever,
        args.corpus,
        out,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        add=args.add,
        dpi=args.dpi,
        skip_bad=args.skip_bad,
        allow_other_model=args.allow_other_model,
        progress=not args.no_progress,
    )
    print(f"{out}: {len(index)} items, {index.nbytes / 2**20:.1f} MiB ({index.dtype})")
    skipped = index.metadata.get("skipped", [])
    if skipped:
        note(
            f"skipped {len(skipped)} files that could not be read (listed in {out}/manifest.json):"
        )
        for row in skipped:
            note(f"  {row['error']}")


# ----------------------------------------------------------------------------- push


def index_push(args) -> None:
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


# ----------------------------------------------------------------------------- search


def read_queries(args) -> list[dict]:
    """The queries of `--query` / `--query-image` / `--queries-file`, each `{"id", "text",
    "image" (bytes), "image_path"}`. Raises UsageError for an empty query or none at all,
    FileNotFoundError for a missing file, ValueError for a bad JSONL line."""
    queries = []
    image_path = args.query_image
    if image_path is not None and not Path(image_path).is_file():
        raise FileNotFoundError(f"--query-image {image_path} does not exist")
    image = Path(image_path).read_bytes() if image_path else None
    for text in args.query:
        if not text.strip() and image is None:
            raise UsageError("--query is empty: give the text to search for (or --query-image)")
        queries.append({"id": None, "text": text, "image": image, "image_path": image_path})
    if image is not None and not args.query:
        queries.append({"id": None, "text": "", "image": image, "image_path": image_path})
    if args.queries_file:
        queries.extend(_file_queries(Path(args.queries_file)))
    if not queries:
        raise UsageError("no query: give --query, --query-image or --queries-file")
    return queries


def _file_queries(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"--queries-file {path} does not exist")
    queries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            queries.append({"id": None, "text": line, "image": None, "image_path": None})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON ({error})") from None
        if not isinstance(row, dict) or not (row.get("text") or row.get("image")):
            raise ValueError(f"{path} line {number}: expected an object with a text or image")
        image = row.get("image")
        image_file = path.parent / image if image else None
        if image_file is not None and not image_file.is_file():
            raise FileNotFoundError(f"{path} line {number}: image {image_file} does not exist")
        queries.append(
            {
                "id": row.get("id"),
                "text": row.get("text") or "",
                "image": image_file.read_bytes() if image_file else None,
                "image_path": image,
            }
        )
    return queries


def _open_index(args):
    if args.qdrant is None:
        if args.collection is not None:
            raise UsageError("--collection goes with --qdrant, not --index")
        return MultiVectorIndex.load(args.index)
    if args.collection is None:
        raise UsageError("--qdrant needs --collection NAME")
    return QdrantIndex(**location(args.qdrant), collection=args.collection)


def _check_search_options(args) -> None:
    if args.k is not None and args.k < 1:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    if args.shortlist is not None and args.coarse is None:
        raise UsageError("--shortlist is the size of the --coarse stage's shortlist: add --coarse")
    if args.shortlist is not None and args.shortlist < (args.k or DEFAULT_K):
        raise UsageError(f"--shortlist {args.shortlist} must be at least --k {args.k or DEFAULT_K}")


def index_search(args) -> None:
    _check_search_options(args)
    queries = read_queries(args)
    index = _open_index(args)
    config = read_saved_config(args.run)
    sizes = trained_sizes(config)
    budgets = [args.budget or sizes] + ([args.coarse] if args.coarse else [])
    resolve_budgets(budgets, *sizes)  # a budget beyond the trained sizes: named, nothing loaded
    k = min(args.k or DEFAULT_K, len(index))
    if args.k is not None and args.k > len(index):  # the default is clamped without a word
        note(f"note: --k {args.k} is more than the index's {len(index)} items: all are returned")
    retriever = load_retriever(args)
    results = retriever.search(
        [{"text": q["text"], "image": q["image"]} for q in queries],
        index,
        budget=args.budget,
        k=k,
        coarse_budget=args.coarse,
        shortlist=1000 if args.shortlist is None else args.shortlist,
        allow_other_model=args.allow_other_model,
    )
    for query, hits in zip(queries, results, strict=True):
        label = query["text"] or "<image>"
        if args.json:
            row = {
                "query": label,
                "query_id": query["id"],
                "text": query["text"],
                "image": query["image_path"],
                "results": [{"id": i, "score": s} for i, s in hits],
            }
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"query: {label}" + ("" if query["id"] is None else f"  (id {query['id']})"))
            for rank, (doc_id, score) in enumerate(hits, 1):
                print(f"  {rank:3d}. {score:9.4f}  {doc_id}")
