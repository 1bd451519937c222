"""MMEB (VLM2Vec's Massive Multimodal Embedding Benchmark) evaluation protocol.

As the official `eval.py` does it: per dataset, every row has one query and a list of candidates
whose first entry is the positive; the prediction is the arg-max score (the first index wins a
tie, as `np.argmax`), and Precision@1 is the fraction of rows predicting index 0. Identical
(text, image) items are encoded once per dataset and side. Meta-task, IND / OOD and overall
scores are plain means over the datasets they contain (overall = mean of all datasets, not of
the meta-task means), computed over the datasets present.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metaembed_jax.evaluation.retrieval import index_bytes_at, search_timed
from metaembed_jax.retrieval.encode import (
    EmbeddingCache,
    Encode,
    budget_key,
    encode_items,
    unique_items,
)

# The 36 MMEB datasets by meta-task (VLM2Vec, Table 1).
META_TASKS: dict[str, tuple[str, ...]] = {
    "Classification": (
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
        "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211",
    ),
    "VQA": (
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA",
        "Visual7W", "ScienceQA", "VizWiz", "GQA", "TextVQA",
    ),
    "Retrieval": (
        "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i",
        "MSCOCO_i2t", "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS",
    ),
    "Grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}  # fmt: skip
# In-distribution = the 20 datasets of MMEB-train; the other 16 are out of distribution.
IND_DATASETS: tuple[str, ...] = (
    "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
    "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
    "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
    "NIGHTS", "WebQA", "MSCOCO",
)  # fmt: skip
ALL_DATASETS: tuple[str, ...] = tuple(d for names in META_TASKS.values() for d in names)
OOD_DATASETS: tuple[str, ...] = tuple(d for d in ALL_DATASETS if d not in IND_DATASETS)

# MMEB texts mark the image with Phi-3-V's placeholder; our prompt template places the image
# itself (docs/design.md), so the placeholder is removed from the text.
IMAGE_PLACEHOLDER = "<|image_1|>"


def meta_task_averages(per_dataset: Mapping[str, float]) -> dict[str, float]:
    """Means of per-dataset scores per meta-task, IND, OOD and overall (present datasets only).

    Datasets outside the official lists count only in "Overall". A group with no dataset
    present is left out.
    """
    groups = dict(META_TASKS)
    groups["IND"] = IND_DATASETS
    groups["OOD"] = OOD_DATASETS
    averages = {}
    for group, names in groups.items():
        values = [per_dataset[n] for n in names if n in per_dataset]
        if values:
            averages[group] = float(np.mean(values))
    if per_dataset:
        averages["Overall"] = float(np.mean(list(per_dataset.values())))
    return averages


def _resolve_image(path: str, image_bytes: bytes | None, image_root: str | None):
    if image_bytes:
        return image_bytes
    if not path:
        return None
    return path if os.path.isabs(path) or not image_root else os.path.join(image_root, path)


def _row_items(row: Mapping[str, Any], image_root: str | None):
    """(query item, candidate items) of one MMEB row, images as bytes or resolved paths."""
    for column in ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"):
        if column not in row:
            raise ValueError(f"MMEB row is missing column {column!r}: {sorted(row)}")
    texts, paths = list(row["tgt_text"]), list(row["tgt_img_path"])
    if not texts or len(texts) != len(paths):
        raise ValueError(
            f"MMEB row has {len(texts)} tgt_text and {len(paths)} tgt_img_path entries; "
            "expected the same non-zero number"
        )
    target_images = row.get("tgt_image") or [None] * len(paths)
    query = {
        "text": (row["qry_text"] or "").replace(IMAGE_PLACEHOLDER, "").strip(),
        "image": _resolve_image(row["qry_img_path"], row.get("qry_image"), image_root),
    }
    candidates = [
        {
            "text": (text or "").replace(IMAGE_PLACEHOLDER, "").strip(),
            "image": _resolve_image(path, image, image_root),
        }
        for text, path, image in zip(texts, paths, target_images, strict=True)
    ]
    return query, candidates


def score_matrix(index, query_embeddings: np.ndarray, budget) -> tuple[np.ndarray, float]:
    """Scores of every query against every indexed candidate: ([Nq, Nc] float32, seconds)."""
    scores, positions, seconds = search_timed(index, query_embeddings, budget, len(index))
    full = np.empty_like(scores)
    np.put_along_axis(full, positions, scores, axis=1)
    return full, seconds


def _precision_at_1(
    encode: Encode,
    queries: Sequence[dict[str, Any]],
    candidates: Sequence[dict[str, Any]],
    candidate_lists: Sequence[np.ndarray],
    budgets: Sequence[Sequence[int]],
    name: str,
    cache: EmbeddingCache | None,
) -> dict[str, Any]:
    """P@1 at every budget; `candidate_lists[i]` = positions in `candidates` of row i's list."""
    unique_queries, query_of_row = unique_items(queries)
    query_embeddings = encode_items(encode, unique_queries, "query", f"mmeb/{name}/query", cache)
    index = encode_items(encode, candidates, "candidate", f"mmeb/{name}/candidate", cache)
    by_budget = {}
    for budget in budgets:
        scores, seconds = score_matrix(index, query_embeddings, budget)
        correct = sum(
            int(np.argmax(scores[query_position, row_candidates]) == 0)
            for query_position, row_candidates in zip(query_of_row, candidate_lists, strict=True)
        )
        by_budget[budget_key(budget)] = {
            "p@1": correct / len(queries),
            "scoring_seconds": seconds,
            "index_bytes": index_bytes_at(index, budget[1]),
        }
    return {
        "name": name,
        "num_queries": len(queries),
        "num_candidates": len(candidates),
        "metric": "p@1",
        "by_budget": by_budget,
    }


def evaluate_dataset(
    encode: Encode,
    rows: Sequence[Mapping[str, Any]],
    budgets: Sequence[Sequence[int]],
    *,
    name: str,
    image_root: str | None = None,
    cache: EmbeddingCache | None = None,
) -> dict[str, Any]:
    """Precision@1 of one MMEB dataset given in the official schema, at every budget.

    `rows`: `{"qry_text","qry_img_path","tgt_text": [..],"tgt_img_path": [..]}` (optionally
    `qry_image` / `tgt_image` bytes in place of the paths); image paths relative to `image_root`.
    Returns `{"name", "num_queries", "num_candidates", "metric": "p@1", "by_budget":
    {"(r_q, r_c)": {"p@1", "scoring_seconds", "index_bytes"}}}`.
    """
    if not rows:
        raise ValueError(f"MMEB dataset {name!r} has no rows")
    queries, candidate_lists = zip(*(_row_items(row, image_root) for row in rows), strict=True)
    flat_candidates = [c for candidates in candidate_lists for c in candidates]
    unique_candidates, candidate_position = unique_items(flat_candidates)
    offsets = np.cumsum([0] + [len(c) for c in candidate_lists])
    positions = [candidate_position[offsets[i] : offsets[i + 1]] for i in range(len(rows))]
    return _precision_at_1(encode, queries, unique_candidates, positions, budgets, name, cache)


def evaluate_records(
    encode: Encode,
    corpus: Sequence[Mapping[str, Any]],
    queries: Sequence[Mapping[str, Any]],
    budgets: Sequence[Sequence[int]],
    *,
    name: str,
    cache: EmbeddingCache | None = None,
) -> dict[str, Any]:
    """Precision@1 of one MMEB dataset as converted by `metaembed_jax.data` (corpus records
    `{"id","text","image"}`, query records carrying their ordered `candidate_ids`)."""
    if not queries:
        raise ValueError(f"MMEB dataset {name!r} has no queries")
    position = {str(row["id"]): i for i, row in enumerate(corpus)}
    try:
        lists = [np.array([position[str(c)] for c in q["candidate_ids"]]) for q in queries]
    except KeyError as error:
        raise ValueError(f"MMEB dataset {name!r}: candidate id {error} not in corpus") from None
    candidates = [{"text": row.get("text", ""), "image": row.get("image")} for row in corpus]
    query_items = [{"text": q.get("text", ""), "image": q.get("image")} for q in queries]
    return _precision_at_1(encode, query_items, candidates, lists, budgets, name, cache)


def evaluate_mmeb(
    encode: Encode,
    datasets: Mapping[str, Any],
    budgets: Sequence[Sequence[int]],
    *,
    image_root: str | None = None,
    cache: EmbeddingCache | None = None,
) -> dict[str, Any]:
    """Every dataset of `datasets` plus the meta-task / IND / OOD / overall averages per budget.

    `datasets`: `{name: rows in the MMEB schema}` or `{name: {"corpus","queries",...}}` as
    converted by `metaembed_jax.data` (queries with `candidate_ids`).
    Returns `{"suite": "mmeb", "tasks": {name: result}, "averages": {budget: {group: P@1}}}`.
    """
    tasks = {}
    for name, data in datasets.items():
        if isinstance(data, Mapping) and "corpus" in data:
            tasks[name] = evaluate_records(
                encode, data["corpus"], data["queries"], budgets, name=name, cache=cache
            )
        else:
            tasks[name] = evaluate_dataset(
                encode, data, budgets, name=name, image_root=image_root, cache=cache
            )
    averages = {}
    for budget in budgets:
        key = budget_key(budget)
        averages[key] = meta_task_averages(
            {name: task["by_budget"][key]["p@1"] for name, task in tasks.items()}
        )
    return {"suite": "mmeb", "tasks": tasks, "averages": averages}
