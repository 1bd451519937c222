"""Ranking metrics with trec_eval / pytrec_eval semantics.

`qrels` is `{query_id: {doc_id: grade}}` (integer grades, 0 = judged non-relevant) and `run` is
`{query_id: {doc_id: score}}`. As in trec_eval:

- a run is ranked by score descending, ties broken by doc id in descending lexical order
  (trec_eval's `comp_sim_docno`: `strcmp(b, a)`), whatever the dict's order;
- a document counts as relevant when its grade is >= 1 (`relevance_level` 1);
- nDCG@k: linear gain (the grade), discount `log2(rank + 1)` for 1-based ranks, ideal DCG from
  all judged documents of the query (not only the retrieved ones); a query with no relevant
  document scores 0;
- the mean is taken over the queries present in both `qrels` and `run` (pytrec_eval drops the
  others; the protocols in this package always give a ranking for every query).

MRR@k is BEIR's: reciprocal rank of the first relevant document within the top k, 0 if none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

RELEVANCE_LEVEL = 1


def rank_documents(doc_scores: Mapping[str, float]) -> list[str]:
    """Doc ids of one query's run in trec_eval order: score desc, then doc id desc."""
    ordered = sorted(doc_scores.items(), key=lambda item: (float(item[1]), item[0]), reverse=True)
    return [doc_id for doc_id, _ in ordered]


def _check_cutoff(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"cutoff k must be a positive integer, got {k!r}")


def _ndcg_one(judgments: Mapping[str, int], ranking: list[str], k: int) -> float:
    dcg = sum(
        judgments.get(doc_id, 0) / math.log2(rank + 2) for rank, doc_id in enumerate(ranking[:k])
    )
    ideal_grades = sorted((g for g in judgments.values() if g > 0), reverse=True)[:k]
    ideal = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(ideal_grades))
    return dcg / ideal if ideal > 0 else 0.0


def _recall_one(judgments: Mapping[str, int], ranking: list[str], k: int) -> float:
    num_relevant = sum(1 for g in judgments.values() if g >= RELEVANCE_LEVEL)
    if num_relevant == 0:
        return 0.0
    hits = sum(1 for doc_id in ranking[:k] if judgments.get(doc_id, 0) >= RELEVANCE_LEVEL)
    return hits / num_relevant


def _mrr_one(judgments: Mapping[str, int], ranking: list[str], k: int) -> float:
    for rank, doc_id in enumerate(ranking[:k]):
        if judgments.get(doc_id, 0) >= RELEVANCE_LEVEL:
            return 1.0 / (rank + 1)
    return 0.0


def _precision_one(judgments: Mapping[str, int], ranking: list[str], k: int) -> float:
    # trec_eval's P_k divides by k even when fewer than k documents were retrieved.
    hits = sum(1 for doc_id in ranking[:k] if judgments.get(doc_id, 0) >= RELEVANCE_LEVEL)
    return hits / k


def _per_query(
    metric_one: Callable[[Mapping[str, int], list[str], int], float], qrels: Qrels, run: Run, k: int
) -> dict[str, float]:
    _check_cutoff(k)
    return {
        query_id: metric_one(qrels[query_id], rank_documents(doc_scores), k)
        for query_id, doc_scores in run.items()
        if query_id in qrels
    }


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else 0.0


def ndcg_at_k(qrels: Qrels, run: Run, k: int = 5, per_query: bool = False):
    """Mean nDCG@k over the queries in both `qrels` and `run` (trec_eval `ndcg_cut_k`).

    Returns a float, or `{query_id: value}` when `per_query` is True.
    Raises ValueError when k is not a positive integer.
    """
    values = _per_query(_ndcg_one, qrels, run, k)
    return values if per_query else _mean(values)


def recall_at_k(qrels: Qrels, run: Run, k: int = 10, per_query: bool = False):
    """Mean recall@k: relevant documents in the top k / all relevant (trec_eval `recall_k`)."""
    values = _per_query(_recall_one, qrels, run, k)
    return values if per_query else _mean(values)


def mrr_at_k(qrels: Qrels, run: Run, k: int = 10, per_query: bool = False):
    """Mean reciprocal rank of the first relevant document within the top k (BEIR's MRR@k)."""
    values = _per_query(_mrr_one, qrels, run, k)
    return values if per_query else _mean(values)


def precision_at_k(qrels: Qrels, run: Run, k: int = 1, per_query: bool = False):
    """Mean precision@k: relevant documents in the top k / k (trec_eval `P_k`)."""
    values = _per_query(_precision_one, qrels, run, k)
    return values if per_query else _mean(values)


def precision_at_1(qrels: Qrels, run: Run, per_query: bool = False):
    """Mean precision@1 (trec_eval `P_1`)."""
    return precision_at_k(qrels, run, k=1, per_query=per_query)


def retrieval_metrics(
    qrels: Qrels, run: Run, ndcg_k: int = 5, recall_ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """The metrics every retrieval protocol here reports, keyed like BEIR (`ndcg@5`, ...)."""
    metrics = {
        f"ndcg@{ndcg_k}": ndcg_at_k(qrels, run, ndcg_k),
        "mrr@10": mrr_at_k(qrels, run, 10),
        "p@1": precision_at_1(qrels, run),
    }
    for k in recall_ks:
        metrics[f"recall@{k}"] = recall_at_k(qrels, run, k)
    return metrics
