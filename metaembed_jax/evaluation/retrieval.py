"""Corpus retrieval protocol shared by ViDoRe (BEIR layout) and the built-in test split.

Queries are scored against the whole corpus through the candidate `MultiVectorIndex` at each
budget; the top `depth` documents per query form the run that the trec_eval-style metrics of
`metrics.py` judge against the qrels.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from metaembed_jax.evaluation import metrics
from metaembed_jax.retrieval.encode import (
    EmbeddingCache,
    Encode,
    budget_key,
    encode_items,
)


def qrels_from_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """`{"query_id","corpus_id","score"}` rows -> `{query_id: {corpus_id: grade}}`."""
    qrels: dict[str, dict[str, int]] = {}
    for row in rows:
        missing = {"query_id", "corpus_id", "score"} - set(row)
        if missing:
            raise ValueError(f"qrels row {dict(row)!r} is missing {sorted(missing)}")
        qrels.setdefault(str(row["query_id"]), {})[str(row["corpus_id"])] = int(row["score"])
    return qrels


def _as_item(row: Mapping[str, Any]) -> dict[str, Any]:
    image = row.get("image")
    return {"text": row.get("text") or "", "image": image if image else None}


def index_bytes_at(index, num_candidate_vectors: int) -> int:
    """Bytes an index holding only the first `r_c` vectors per candidate would take."""
    return int(round(index.nbytes * num_candidate_vectors / index.num_vectors))


def search_timed(index, query_embeddings: np.ndarray, budget, k: int):
    """`index.search` at `budget`, timed on a second identical call (compilation excluded:
    the warm-up has the same shapes, so the timed call reuses its program).

    Returns (scores [Nq, k], row positions [Nq, k], seconds).
    """
    index.search(query_embeddings, budget=budget, k=k)
    start = time.perf_counter()
    scores, positions = index.search(query_embeddings, budget=budget, k=k)
    scores, positions = np.asarray(scores), np.asarray(positions)
    return scores, positions, time.perf_counter() - start


# `candidate_vector_cosine` reads the first this many candidates (a diagnostic; not the corpus).
COSINE_SAMPLE = 1024


def mean_vector_cosine(embeddings: np.ndarray, count: int) -> float | None:
    """Mean cosine similarity between two different vectors among each item's first `count`
    of `embeddings` [N, R, D], averaged over items; None for `count` < 2.

    A collapse detector: near 1, an item's vectors are one vector repeated and a larger budget
    cannot rank differently from (1, 1). All-zero vectors count as cosine 0."""
    if count < 2 or len(embeddings) == 0:
        return None
    vectors = np.asarray(embeddings[:, :count], np.float64)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    summed = unit.sum(axis=1)  # sum over pairs i != j of <u_i, u_j> = |sum u|^2 - sum |u|^2
    pairs = (summed**2).sum(-1) - (unit**2).sum((-2, -1))
    return float(np.mean(pairs / (count * (count - 1))))


def evaluate_corpus(
    encode: Encode,
    corpus: Sequence[Mapping[str, Any]],
    queries: Sequence[Mapping[str, Any]],
    qrels: Mapping[str, Mapping[str, int]],
    budgets: Sequence[Sequence[int]],
    *,
    name: str,
    cache: EmbeddingCache | None = None,
    depth: int = 100,
    ndcg_k: int = 5,
    recall_ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, Any]:
    """Retrieval of `queries` over `corpus` at every budget.

    `corpus` / `queries` rows: `{"id","text","image"}`; `qrels`: `{query_id: {corpus_id: grade}}`.
    Only queries with judgments are encoded (trec_eval ignores the others).
    Returns `{"name", "num_queries", "num_candidates", "metric", "by_budget": {"(r_q, r_c)":
    {metric: value, ..., "scoring_seconds", "index_bytes", "query_vector_cosine",
    "candidate_vector_cosine"}}}` (the last two: `mean_vector_cosine` of the budget's vectors,
    of the first `COSINE_SAMPLE` candidates; None at 1 vector).
    Raises ValueError for an empty corpus, no judged query, or a budget beyond the embeddings.
    """
    corpus_ids = [str(row["id"]) for row in corpus]
    judged = [row for row in queries if str(row["id"]) in qrels]
    if not corpus_ids or not judged:
        raise ValueError(
            f"{name}: need a non-empty corpus and at least one judged query, got "
            f"{len(corpus_ids)} documents and {len(judged)} judged queries of {len(queries)}"
        )
    query_embeddings = encode_items(
        encode, [_as_item(r) for r in judged], "query", f"{name}/queries", cache
    )
    index = encode_items(
        encode, [_as_item(r) for r in corpus], "candidate", f"{name}/corpus", cache
    )
    k = min(depth, len(corpus_ids))
    query_ids = [str(row["id"]) for row in judged]
    candidate_embeddings = index.embeddings(COSINE_SAMPLE)
    by_budget = {}
    for budget in budgets:
        scores, positions, seconds = search_timed(index, query_embeddings, budget, k)
        run = {
            query_id: {
                corpus_ids[p]: float(s) for s, p in zip(row_scores, row_positions, strict=True)
            }
            for query_id, row_scores, row_positions in zip(
                query_ids, scores, positions, strict=True
            )
        }
        result = metrics.retrieval_metrics(qrels, run, ndcg_k=ndcg_k, recall_ks=recall_ks)
        result["scoring_seconds"] = seconds
        result["index_bytes"] = index_bytes_at(index, budget[1])
        result["query_vector_cosine"] = mean_vector_cosine(query_embeddings, budget[0])
        result["candidate_vector_cosine"] = mean_vector_cosine(candidate_embeddings, budget[1])
        by_budget[budget_key(budget)] = result
    return {
        "name": name,
        "num_queries": len(judged),
        "num_candidates": len(corpus_ids),
        "metric": f"ndcg@{ndcg_k}",
        "by_budget": by_budget,
    }


def mean_averages(tasks: Mapping[str, Any], budgets: Sequence[Sequence[int]]) -> dict:
    """`{budget: {"avg": mean of the tasks' primary metrics}}`."""
    averages = {}
    for budget in budgets:
        key = budget_key(budget)
        values = [t["by_budget"][key][t["metric"]] for t in tasks.values() if key in t["by_budget"]]
        if values:
            averages[key] = {"avg": float(np.mean(values))}
    return averages
