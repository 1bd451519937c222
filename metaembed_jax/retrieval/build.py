"""The resumable corpus build behind `metaembed index build`.

The corpus is encoded in chunks of `chunk_size` entries; each chunk's embeddings, ids and
skipped files go to `OUT.partial/chunk-<n>.npz` (written whole under a temporary name, then
renamed) before the next chunk starts, keyed by the ids and signatures of its entries (content
sha256, size, mtime: `corpus.Entry.signature`). A killed build continues with the first chunk
that is missing or whose key differs (a corpus file changed since: re-encoded), so nothing is
encoded twice and the finished index equals an uninterrupted build's.

Bad files (`corpus.CorpusFileError`: undecodable, mislabelled, encrypted) are skipped, counted
and listed in the index's `metadata["skipped"]` (the default for a folder), or stop the build
naming the file (`skip_bad=False`, the default for a JSONL). `add=True` appends the entries the
index does not hold yet, saved in place: the index save swaps its manifest atomically, so a kill
at any moment leaves the old index or the new one, and a rerun finishes the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from metaembed_jax.retrieval.corpus import CorpusFileError, Entry, is_folder_corpus, read_corpus
from metaembed_jax.retrieval.index import MultiVectorIndex

PARTIAL_SUFFIX = ".partial"
_NO_TEXT = np.zeros(0, dtype="<U1")


def build_index(
    retriever,
    corpus: str | os.PathLike | list[Entry],
    out: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    chunk_size: int = 256,
    add: bool = False,
    dpi: int = 96,
    skip_bad: bool | None = None,
    allow_other_model: bool = False,
    progress: bool = True,
) -> MultiVectorIndex:
    """Encode `corpus` (a path for `read_corpus`, or its entries) into the index at `out`.

    `dpi` bounds the resolution of PDF pages, which are rendered to the model's pixel budget.
    `skip_bad` (default: True for a folder, False otherwise) skips files that cannot be read,
    listing them in `index.metadata["skipped"]` (`[{"id", "error"}]`). The index records the
    model in `index.metadata["model"]`. Returns the saved index.

    Raises ValueError when `out` exists without `add` or a partial build is of another model
    or chunking; CorpusFileError naming the file when `skip_bad` is False; OtherModelError when
    `add` would mix in another model's vectors (unless `allow_other_model`).
    """
    out = Path(out)
    if skip_bad is None:
        skip_bad = not isinstance(corpus, list) and is_folder_corpus(corpus)
    if isinstance(corpus, list):
        entries = corpus
    else:
        processor = getattr(retriever.encoder, "processor", None)
        entries = read_corpus(corpus, processor=processor, dpi=dpi)
    existing = MultiVectorIndex.load(out) if add and out.exists() else None
    if existing is None and out.exists():
        raise ValueError(f"{out} exists: pass --add to append to it, or choose another --out")
    if existing is not None:
        retriever.check_index(existing, action="add to it", allow_other_model=allow_other_model)
        held = set(map(str, existing.ids))
        entries = [entry for entry in entries if entry.id not in held]
    partial = _open_partial(out, retriever, chunk_size, dtype)
    bar = tqdm(total=len(entries), desc=f"index {out.name}", unit="item", disable=not progress)
    chunks, ids, skipped = [], [], []
    for number, start in enumerate(range(0, len(entries), chunk_size)):
        chunk = entries[start : start + chunk_size]
        embeddings, chunk_ids, chunk_skipped = _chunk(
            retriever, chunk, partial / f"chunk-{number:06d}.npz", skip_bad
        )
        if len(chunk_ids):
            chunks.append(embeddings)
        ids.extend(chunk_ids)
        skipped.extend(chunk_skipped)
        bar.update(len(chunk))
    bar.close()
    index = existing
    if index is None:
        if not ids:
            raise ValueError(f"nothing to index: {_skipped_summary(skipped) or 'no entries'}")
        index = MultiVectorIndex.build(np.concatenate(chunks), ids=ids, dtype=dtype)
    elif ids:
        index.add(np.concatenate(chunks), ids=ids)
    if retriever.provenance is not None:
        index.metadata["model"] = retriever.provenance
    index.metadata["skipped"] = [{"id": i, "error": e} for i, e in skipped]
    index.save(out)  # atomic: the manifest names the old files or the new ones, never a mix
    shutil.rmtree(partial)
    return index


def _skipped_summary(skipped: list[tuple[str, str]]) -> str:
    return "; ".join(error for _, error in skipped[:3]) + (" ..." if len(skipped) > 3 else "")


def chunk_key(chunk: list[Entry]) -> str:
    """sha256 over the ids and signatures of a chunk's entries, in order."""
    rows = [[entry.id, entry.signature] for entry in chunk]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def _chunk(retriever, chunk: list[Entry], path: Path, skip_bad: bool):
    """(embeddings [n, R_c, D], ids [n], skipped [(id, error)]) of one chunk: read back from
    `path` when it holds this chunk's key, else encoded and written there."""
    key = chunk_key(chunk)
    stored = _read_chunk(path, key)
    if stored is None:
        items, ids, skipped = [], [], []
        for entry in chunk:
            try:
                items.append(entry.load())
            except CorpusFileError as error:
                if not skip_bad:
                    raise
                skipped.append((entry.id, str(error)))
                continue
            ids.append(entry.id)
        embeddings = retriever.encoder(items, "candidate") if items else np.zeros((0,))
        stored = (np.asarray(embeddings, np.float32), ids, skipped)
        _write_chunk(path, key, *stored)
    if stored[2] and not skip_bad:
        raise CorpusFileError(stored[2][0][1])
    return stored


def _write_chunk(path: Path, key: str, embeddings, ids, skipped) -> None:
    temporary = path.with_name(path.stem + ".tmp.npz")
    arrays = {
        "key": np.asarray(key),
        "embeddings": embeddings,
        "ids": np.asarray(ids, dtype=str) if ids else _NO_TEXT,
        "skipped_ids": np.asarray([i for i, _ in skipped], dtype=str) if skipped else _NO_TEXT,
        "skipped_errors": np.asarray([e for _, e in skipped], dtype=str) if skipped else _NO_TEXT,
    }
    with open(temporary, "wb") as handle:
        np.savez(handle, allow_pickle=False, **arrays)
    os.replace(temporary, path)  # whole or absent


def _read_chunk(path: Path, key: str):
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as stored:
        if str(stored["key"]) != key:  # a corpus file changed since: encode the chunk again
            return None
        names, errors = stored["skipped_ids"].tolist(), stored["skipped_errors"].tolist()
        skipped = list(zip(names, errors, strict=True))
        return stored["embeddings"], stored["ids"].tolist(), skipped


def _open_partial(out: Path, retriever, chunk_size: int, dtype: str) -> Path:
    """`out.partial/` with a `build.json` naming the model and chunking; an existing one must
    match (its chunks are another model's vectors otherwise)."""
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    record = retriever.provenance or {}
    inputs = {
        "run": str(retriever.run_dir.resolve()) if retriever.run_dir else None,
        "step": retriever.step,
        "params_sha256": record.get("params_sha256"),
        "processor_sha256": record.get("processor_sha256"),
        "chunk_size": int(chunk_size),
        "dtype": dtype,
    }
    build_record = partial / "build.json"
    if build_record.exists():
        previous = json.loads(build_record.read_text())
        if previous != inputs:
            raise ValueError(
                f"{partial} holds a stopped build of other inputs ({previous}); delete it to "
                "start over"
            )
    else:
        partial.mkdir(parents=True, exist_ok=True)
        temporary = build_record.with_suffix(".tmp")  # whole or absent, as the chunks
        temporary.write_text(json.dumps(inputs))
        os.replace(temporary, build_record)
    return partial
