"""A trained run as a retriever: encode queries and documents, build an index, search it.

    retriever = Retriever.load("runs/demo")
    index = retriever.index(["a red cube", {"text": "", "image": "page.png"}], ids=["a", "b"])
    hits = retriever.search(["which page shows a red cube?"], index, budget=(16, 64), k=10)

`build_index` is the resumable corpus build behind `metaembed index build`: the corpus is
encoded in chunks of `chunk_size` items, each chunk's embeddings written to `OUT.partial/`
before the next starts, so a killed build continues with the first missing chunk (nothing
encoded twice) and the finished index equals an uninterrupted build's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metaembed_jax import sharding
from metaembed_jax.data.pipeline import make_processor, model_family
from metaembed_jax.formats.trained import dtype_name, find_step, restore_trained_model
from metaembed_jax.retrieval.corpus import Entry, read_corpus
from metaembed_jax.retrieval.encode import ModelEncoder
from metaembed_jax.retrieval.index import MultiVectorIndex
from metaembed_jax.retrieval.qdrant import QdrantIndex
from metaembed_jax.scoring import resolve_budgets
from metaembed_jax.training.run_identity import read_saved_config

PARTIAL_SUFFIX = ".partial"


def as_item(value: Any) -> dict[str, Any]:
    """An encoder item from a text (str), an image (bytes, a path-like or a PIL image: an
    image-only item) or an item dict {"text", "image"}."""
    if isinstance(value, dict):
        return {"text": value.get("text") or "", "image": value.get("image")}
    if isinstance(value, str):
        return {"text": value, "image": None}
    if isinstance(value, os.PathLike):
        return {"text": "", "image": Path(value).read_bytes()}
    return {"text": "", "image": value}  # bytes or PIL image


class Retriever:
    """A MetaEmbed model, its processor and encoder, sharded over the local devices."""

    def __init__(self, encoder, config, run_dir: Path | None = None, step: int | None = None):
        self.encoder, self.config, self.run_dir, self.step = encoder, config, run_dir, step

    @classmethod
    def load(
        cls,
        run_dir: str | os.PathLike,
        step: int | None = None,
        *,
        batch_size: int | None = None,
        dtype: Any = None,
    ) -> Retriever:
        """The retriever of a training run (its saved config, the parameters of `step`, default
        the latest), encoding `batch_size` items per call (default `config.eval.batch_size`,
        rounded up to a multiple of the local devices). Raises as `load_trained` does."""
        import jax

        run_dir = Path(run_dir)
        config = read_saved_config(run_dir)
        if dtype is not None:
            config.model.dtype = dtype_name(dtype)
        step = find_step(run_dir, step)
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
        family = model_family(config)
        processor = make_processor(config, family, run_dir)
        model = restore_trained_model(
            config, run_dir, step, mesh=mesh, vocab_size=len(processor.tokenizer)
        )
        shards = sharding.batch_shards(mesh)
        size = int(batch_size or config.eval.batch_size)
        size = -(-size // shards) * shards
        encoder = ModelEncoder(
            model,
            processor,
            batch_size=size,
            mesh=mesh,
            progress=False,
            pad_features=family.static_shapes(config.data, size, multiple=shards),
        )
        return cls(encoder, config, run_dir, step)

    @property
    def trained_sizes(self) -> tuple[int, int]:
        return self.encoder.num_vectors["query"], self.encoder.num_vectors["candidate"]

    def encode_queries(self, queries: Sequence[Any]) -> np.ndarray:
        """[N, R_q, D] float32 embeddings of texts / images / items (see `as_item`)."""
        return self.encoder([as_item(q) for q in queries], "query")

    def encode_documents(self, documents: Sequence[Any]) -> np.ndarray:
        """[N, R_c, D] float32 embeddings of texts / images / items (see `as_item`)."""
        return self.encoder([as_item(d) for d in documents], "candidate")

    def index(self, documents: Sequence[Any], ids=None, dtype: str = "bfloat16"):
        """A MultiVectorIndex of `documents` (ids default to 0..N-1)."""
        return MultiVectorIndex.build(self.encode_documents(documents), ids=ids, dtype=dtype)

    def search(
        self,
        queries: Sequence[Any],
        index: MultiVectorIndex | QdrantIndex,
        budget: tuple[int, int] | None = None,
        k: int = 10,
        *,
        coarse_budget: tuple[int, int] | None = None,
        shortlist: int = 1000,
    ) -> list[list[tuple[Any, float]]]:
        """Per query, its `k` best (id, score) pairs, best first, at `budget` (default the
        trained (R_q, R_c)); with `coarse_budget`, a two-stage search over a shortlist.
        `index` is a `MultiVectorIndex` or a `QdrantIndex` (the same search contract)."""
        checks = [budget or self.trained_sizes] + ([coarse_budget] if coarse_budget else [])
        checked = resolve_budgets(checks, *self.trained_sizes)
        embeddings = self.encode_queries(queries)
        k = min(int(k), len(index))
        options = {"coarse_budget": checked[1], "shortlist": shortlist} if coarse_budget else {}
        scores, ids = index.search(embeddings, budget=checked[0], k=k, **options)
        return [
            [(_plain_id(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True)]
            for row_ids, row_scores in zip(ids, np.asarray(scores), strict=True)
        ]


def _plain_id(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------- resumable build


def build_index(
    retriever: Retriever,
    corpus: str | os.PathLike | list[Entry],
    out: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    chunk_size: int = 256,
    add: bool = False,
    dpi: int = 96,
    progress: bool = True,
) -> MultiVectorIndex:
    """Encode `corpus` (a path for `read_corpus`, or its entries) into the index at `out`.

    Resumable: chunks already in `out.partial/` (from a build of the same run, corpus and
    chunking that was stopped) are read back, not encoded again. `add=True` appends the items
    whose ids the index at `out` does not hold yet. Returns the saved index.
    Raises ValueError when `out` exists without `add`, or a partial build is of other inputs.
    """
    from tqdm import tqdm

    out = Path(out)
    entries = read_corpus(corpus, dpi=dpi) if not isinstance(corpus, list) else corpus
    existing = MultiVectorIndex.load(out) if add and out.exists() else None
    if existing is None and out.exists():
        raise ValueError(f"{out} exists: pass --add to append to it, or choose another --out")
    if existing is not None:
        held = set(map(str, existing.ids))
        entries = [(i, load) for i, load in entries if i not in held]
    partial = _open_partial(out, retriever, entries, chunk_size, dtype)
    bar = tqdm(total=len(entries), desc=f"index {out.name}", unit="item", disable=not progress)
    chunks = []
    for number, start in enumerate(range(0, len(entries), chunk_size)):
        chunk = entries[start : start + chunk_size]
        path = partial / f"chunk-{number:06d}.npy"
        if not path.exists():  # written whole (temporary name, then renamed) or not at all
            embeddings = retriever.encoder([load() for _, load in chunk], "candidate")
            temporary = path.with_suffix(".tmp.npy")
            np.save(temporary, embeddings.astype(np.float32), allow_pickle=False)
            os.replace(temporary, path)
        chunks.append(np.load(path, allow_pickle=False))
        bar.update(len(chunk))
    bar.close()
    ids = [entry_id for entry_id, _ in entries]
    if existing is not None:
        index = existing
        if ids:
            index.add(np.concatenate(chunks), ids=ids)
        _save_replacing(index, out)
    else:
        if not ids:
            raise ValueError("nothing to index")
        index = MultiVectorIndex.build(np.concatenate(chunks), ids=ids, dtype=dtype)
        index.save(out)
    shutil.rmtree(partial)
    return index


def _open_partial(out: Path, retriever: Retriever, entries, chunk_size: int, dtype: str) -> Path:
    """`out.partial/` with a `build.json` naming the inputs; an existing one must match."""
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    inputs = {
        "run": str(retriever.run_dir.resolve()) if retriever.run_dir else None,
        "step": retriever.step,
        "ids_sha256": hashlib.sha256("\n".join(i for i, _ in entries).encode()).hexdigest(),
        "chunk_size": int(chunk_size),
        "dtype": dtype,
    }
    record = partial / "build.json"
    if record.exists():
        previous = json.loads(record.read_text())
        if previous != inputs:
            raise ValueError(
                f"{partial} holds a stopped build of other inputs ({previous}); delete it to "
                "start over"
            )
    else:
        partial.mkdir(parents=True, exist_ok=True)
        temporary = record.with_suffix(".tmp")  # whole or absent, as the chunks
        temporary.write_text(json.dumps(inputs))
        os.replace(temporary, record)
    return partial


def _save_replacing(index: MultiVectorIndex, out: Path) -> None:
    # Save next to the old index, then swap: a crash leaves the old index readable.
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    index.save(staging)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old)
