"""Raw readers for the dataset formats users bring, turned into records (docs/design.md), and the
one image decoder.

- MMEB-style training pairs (JSONL or parquet, image paths under an image root) -> pair records.
- MMEB evaluation sets (parquet: qry_text, qry_img_path, tgt_text [..], tgt_img_path [..]) ->
  deduplicated candidates + queries carrying their candidate ids (positive = candidate 0).
- ViDoRe / BEIR sets (corpus, queries, qrels parquet) -> corpus / queries / qrels records.

Every image is checked (file exists, decodes, is not a decompression bomb) and stored as PNG
bytes. Bad rows (missing image file, undecodable or oversized image, item with neither text nor
image, missing column, text that is not UTF-8, a JSONL line that is not valid JSON or not an
object) raise `BadRowError` naming the file and the row, or are skipped and counted by a
`BadRows` log (`skip=True`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from metaembed_jax.models.processing import BadRowError, open_image

# VLM2Vec / MMEB texts carry an image placeholder; our prompts place image tokens themselves.
_IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")

# MMEB-train column names (TIGER-Lab/MMEB-train); override with `columns=`.
MMEB_TRAIN_COLUMNS = {
    "query_text": "qry",
    "query_image": "qry_image_path",
    "positive_text": "pos_text",
    "positive_image": "pos_image_path",
    "negative_text": "neg_text",
    "negative_image": "neg_image_path",
}
# Aliases accepted for BEIR / ViDoRe columns, first match wins.
_ID_COLUMNS = {
    "corpus": ("corpus-id", "_id", "id", "docid"),
    "queries": ("query-id", "_id", "id", "qid"),
}
_TEXT_COLUMNS = ("text", "query", "content")


@dataclasses.dataclass
class BadRows:
    """Raises on a bad row, or (skip=True) counts it and keeps (file, row, reason) for a report."""

    skip: bool = False
    entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def report(self, file: str | os.PathLike, row: int | str, reason: str) -> None:
        message = f"{file}: row {row}: {reason}"
        if not self.skip:
            raise BadRowError(message + " (set config.data.skip_bad_rows=True to skip such rows)")
        logging.warning("skipping bad row: %s", message)
        self.entries.append({"file": str(file), "row": row, "reason": reason})

    @property
    def count(self) -> int:
        return len(self.entries)

    def write(self, path: str | os.PathLike) -> None:
        """Writes the skipped rows as JSON (always, so an empty list proves nothing was skipped)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"count": self.count, "rows": self.entries}, indent=1))


# ----------------------------------------------------------------------------- images


def to_png_bytes(data: bytes, what: str) -> bytes:
    """Decodes encoded image bytes (any PIL format) and returns them as PNG bytes.

    Raises BadRowError naming `what` when the bytes do not decode.
    """
    image = open_image(data, f"image {what}")
    if image.format == "PNG":
        return bytes(data)  # fully decoded above: a truncated PNG has failed already
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def load_image_file(path: str, image_root: str | os.PathLike) -> bytes:
    """Reads the image at `path` (relative to `image_root` unless absolute) as PNG bytes."""
    full = Path(path) if os.path.isabs(path) else Path(image_root) / path
    if not full.is_file():
        raise BadRowError(f"image file not found: {full}")
    return to_png_bytes(full.read_bytes(), str(full))


def clean_text(text: Any) -> str:
    """None -> ""; strips MMEB image placeholders and surrounding whitespace.

    Raises BadRowError for bytes that are not UTF-8 (a binary parquet column)."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRowError(f"text is not valid UTF-8: {error}") from None
    return _IMAGE_PLACEHOLDER.sub("", str(text)).strip()


def content_id(text: str, image_ref: str) -> str:
    """A stable id for an item from its text and image reference (equal items share it)."""
    return hashlib.sha1(f"{text}\x00{image_ref}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- tables


def iter_rows(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Rows of a .jsonl / .json (one object per line) or .parquet file, as dicts.

    Raises BadRowError (naming file and row) at a line that is not a UTF-8 JSON object."""
    for _, row in iter_numbered_rows(path, BadRows(skip=False)):
        yield row


def iter_numbered_rows(
    path: str | os.PathLike, bad_rows: BadRows
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) of a .jsonl / .json or .parquet file; JSONL rows are numbered by line
    from 0. A line that is not UTF-8, not JSON or not a JSON object goes to `bad_rows` (raised,
    or skipped and counted), and reading goes on with the next line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix == ".parquet":
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield number, row
                number += 1
    elif path.suffix in (".jsonl", ".json"):
        with path.open("rb") as lines:  # bytes: one undecodable line must not end the file
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    yield number, _json_object(line)
                except BadRowError as error:
                    bad_rows.report(path, number, str(error))
    else:
        raise ValueError(
            f"unsupported file type {path.suffix!r} for {path}: expected .jsonl/.parquet"
        )


def _json_object(line: bytes) -> dict[str, Any]:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise BadRowError(f"not valid UTF-8: {error}") from None
    except json.JSONDecodeError as error:
        raise BadRowError(f"invalid JSON: {error}") from None
    if not isinstance(row, dict):
        raise BadRowError(f"a row must be a JSON object, got {type(row).__name__}")
    return row


def table_files(root: str | os.PathLike, name: str) -> list[Path]:
    """`<root>/<name>.parquet` or the parquet shards of `<root>/<name>/` (sorted)."""
    root = Path(root)
    single = root / f"{name}.parquet"
    if single.is_file():
        return [single]
    shards = sorted((root / name).glob("*.parquet")) if (root / name).is_dir() else []
    if not shards:
        raise FileNotFoundError(f"no {name}.parquet or {name}/*.parquet under {root}")
    return shards


def _column(row: dict[str, Any], name: str) -> Any:
    if name not in row:
        raise BadRowError(f"missing column {name!r} (columns: {sorted(row)})")
    return row[name]


def _first_column(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in row:
            return row[name]
    raise BadRowError(f"missing column, expected one of {list(names)} (columns: {sorted(row)})")


def _item(text: Any, image_path: Any, image_root: str, what: str) -> tuple[str, bytes, str]:
    """(clean text, PNG bytes or b"", image reference) of one side; needs text or image."""
    text = clean_text(text)
    image_path = "" if image_path is None else str(image_path)
    image = load_image_file(image_path, image_root) if image_path else b""
    if not text and not image:
        raise BadRowError(f"{what} has an empty text and no image")
    return text, image, image_path


# ----------------------------------------------------------------------------- MMEB train


def mmeb_train_records(
    files: list[str | os.PathLike],
    image_root: str | os.PathLike,
    bad_rows: BadRows,
    columns: dict[str, str] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (key, pair record) for every good row of MMEB-style training files.

    The query and positive columns are required (values may be empty when the other modality is
    present); the negative columns are optional (absent or empty = no hard negative). The task
    is the `task` column if present, else the file's stem.
    """
    columns = {**MMEB_TRAIN_COLUMNS, **(columns or {})}
    for file in files:
        stem = Path(file).stem
        for number, row in iter_numbered_rows(file, bad_rows):
            try:
                record = _mmeb_train_record(row, columns, str(image_root), stem, number)
            except BadRowError as error:
                bad_rows.report(file, number, str(error))
                continue
            yield f"{stem}:{number}", record


def _mmeb_train_record(row, columns, image_root, stem, number) -> dict[str, Any]:
    record = {"task": str(row.get("task") or stem), "query_id": f"{stem}:{number}"}
    for side in ("query", "positive"):
        text, image, ref = _item(
            _column(row, columns[f"{side}_text"]),
            _column(row, columns[f"{side}_image"]),
            image_root,
            side,
        )
        record.update({f"{side}_text": text, f"{side}_image": image})
        if side == "positive":
            record["positive_id"] = content_id(text, ref)
    negative_text = row.get(columns["negative_text"])
    negative_path = row.get(columns["negative_image"])
    if clean_text(negative_text) or negative_path:
        text, image, ref = _item(negative_text, negative_path, image_root, "negative")
        record.update(negative_text=text, negative_image=image, negative_id=content_id(text, ref))
    else:
        record.update(negative_text="", negative_image=b"", negative_id="")
    return record


# ----------------------------------------------------------------------------- MMEB eval


def mmeb_eval_records(
    files: list[str | os.PathLike], image_root: str | os.PathLike, dataset: str, bad_rows: BadRows
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Reads one MMEB evaluation dataset into deduplicated corpus / queries / qrels records.

    Candidates equal in (text, image path) share one corpus record (MMEB repeats the same
    candidates across queries). Each query keeps its ordered `candidate_ids`; the positive is
    candidate 0 and is also written to qrels with score 1.
    """
    corpus: dict[str, dict[str, Any]] = {}
    queries, qrels = [], []
    for file in files:
        for number, row in iter_numbered_rows(file, bad_rows):
            try:
                query, candidates = _mmeb_eval_row(row, str(image_root), dataset, corpus)
            except BadRowError as error:
                bad_rows.report(file, number, str(error))
                continue
            query_id = f"{dataset}:q{len(queries)}"
            query.update(id=query_id, candidate_ids=[c["id"] for c in candidates])
            for candidate in candidates:
                corpus.setdefault(candidate["id"], candidate)
            queries.append((query_id, query))
            qrels.append(
                (query_id, {"query_id": query_id, "corpus_id": candidates[0]["id"], "score": 1})
            )
    return {
        "corpus": [(key, value) for key, value in corpus.items()],
        "queries": queries,
        "qrels": qrels,
    }


def _mmeb_eval_row(row, image_root, dataset, corpus) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    text, image, _ = _item(
        _column(row, "qry_text"), _column(row, "qry_img_path"), image_root, "query"
    )
    query = {"text": text, "image": image, "task": dataset}
    target_texts = list(_column(row, "tgt_text") or [])
    target_paths = list(_column(row, "tgt_img_path") or [])
    if not target_texts and not target_paths:
        raise BadRowError("no candidates (tgt_text and tgt_img_path empty)")
    # Text-only (or image-only) candidate lists may leave the other list empty.
    target_texts = target_texts or [""] * len(target_paths)
    target_paths = target_paths or [""] * len(target_texts)
    if len(target_texts) != len(target_paths):
        raise BadRowError(
            f"tgt_text has {len(target_texts)} entries but tgt_img_path has {len(target_paths)}"
        )
    candidates = []
    for index, (cand_text, cand_path) in enumerate(zip(target_texts, target_paths, strict=True)):
        key = f"{dataset}:{content_id(clean_text(cand_text), cand_path or '')}"
        if key in corpus:  # already validated and encoded
            candidates.append(corpus[key])
            continue
        text, image, _ = _item(cand_text, cand_path, image_root, f"candidate {index}")
        candidates.append({"id": key, "text": text, "image": image, "task": dataset})
    return query, candidates


# ----------------------------------------------------------------------------- BEIR / ViDoRe


def _beir_image(value: Any, image_root: str, what: str) -> bytes:
    """HF image column (dict with bytes / path), raw bytes, or a path string -> PNG bytes."""
    if value is None or value == b"" or value == "":
        return b""
    if isinstance(value, dict):
        if value.get("bytes"):
            return to_png_bytes(value["bytes"], what)
        return load_image_file(value["path"], image_root) if value.get("path") else b""
    if isinstance(value, bytes):
        return to_png_bytes(value, what)
    return load_image_file(str(value), image_root)


def _beir_item(row, kind, image_root, what) -> dict[str, Any]:
    item_id = str(_first_column(row, _ID_COLUMNS[kind]))
    text = clean_text(next((row[c] for c in _TEXT_COLUMNS if c in row), ""))
    if row.get("title"):
        text = f"{clean_text(row['title'])}\n{text}".strip()
    image_value = row.get("image", row.get("image_path"))
    image = _beir_image(image_value, image_root, f"{what} (id {item_id})")
    if not text and not image:
        raise BadRowError(f"id {item_id}: empty text and no image")
    return {"id": item_id, "text": text, "image": image, "task": str(row.get("task") or "")}


def beir_records(
    root: str | os.PathLike, bad_rows: BadRows, task: str | None = None
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Reads a ViDoRe / BEIR directory (corpus, queries, qrels parquet) into eval records.

    Texts: `text` / `query` column (BEIR `title` prepended). Images: HF image dicts, bytes, or
    paths relative to the directory. qrels: `query-id`, `corpus-id`, `score` (or the
    underscore spellings); qrels naming an unknown query or document are bad rows.
    """
    root = Path(root)
    task = task or root.name
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {"corpus": [], "queries": [], "qrels": []}
    for kind in ("corpus", "queries"):
        for file in table_files(root, kind):
            for number, row in iter_numbered_rows(file, bad_rows):
                try:
                    item = _beir_item(row, kind, str(root), f"{file} row {number}")
                except BadRowError as error:
                    bad_rows.report(file, number, str(error))
                    continue
                item["task"] = item["task"] or task
                out[kind].append((item["id"], item))
    known = {kind: {key for key, _ in out[kind]} for kind in ("corpus", "queries")}
    for file in table_files(root, "qrels"):
        for number, row in iter_numbered_rows(file, bad_rows):
            try:
                qrel = {
                    "query_id": str(_first_column(row, ("query-id", "query_id", "qid"))),
                    "corpus_id": str(_first_column(row, ("corpus-id", "corpus_id", "docid"))),
                    "score": int(_first_column(row, ("score", "relevance"))),
                }
                for kind, key in (("queries", "query_id"), ("corpus", "corpus_id")):
                    if qrel[key] not in known[kind]:
                        raise BadRowError(f"{key} {qrel[key]!r} not in {kind}")
            except BadRowError as error:
                bad_rows.report(file, number, str(error))
                continue
            out["qrels"].append((f"{qrel['query_id']}:{qrel['corpus_id']}", qrel))
    return out
