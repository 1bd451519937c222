"""Ranking metrics equal pytrec_eval's (trec_eval) on random graded qrels and runs with ties."""

import random

import pytest
import pytrec_eval

from metaembed_jax.evaluation import metrics


def _random_case(seed: int, num_queries: int = 40, num_docs: int = 30):
    """Graded qrels and runs with many exact score ties, unjudged docs, short runs and
    queries present on one side only (pytrec_eval drops those)."""
    rng = random.Random(seed)
    # Mixed-length ids so lexical order differs from numeric order ("d10" < "d2").
    doc_ids = [f"d{i}" for i in range(num_docs)] + ["D", "a", "doc_z", "é1"]
    qrels, run = {}, {}
    for q in range(num_queries):
        query_id = f"q{q}"
        judged = rng.sample(doc_ids, rng.randint(1, 8))
        grades = {d: rng.choice([0, 0, 1, 1, 2, 3]) for d in judged}
        if q % 7 == 0:
            grades = dict.fromkeys(grades, 0)  # no relevant document at all
        retrieved = rng.sample(doc_ids, rng.randint(1, 20))
        # Few distinct score values -> many ties, decided by doc id like trec_eval.
        scores = {d: float(rng.choice([0.5, 1.0, 1.0, 2.25, -1.0])) for d in retrieved}
        if q % 11 != 5:
            qrels[query_id] = grades
        if q % 13 != 6:
            run[query_id] = scores
    return qrels, run


def _pytrec(qrels, run, measures):
    results = pytrec_eval.RelevanceEvaluator(qrels, set(measures)).evaluate(run)
    return results


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_ndcg_recall_precision_match_pytrec_eval(seed, k):
    qrels, run = _random_case(seed)
    reference = _pytrec(qrels, run, {f"ndcg_cut_{k}", f"recall_{k}", f"P_{k}"})
    ours = {
        f"ndcg_cut_{k}": metrics.ndcg_at_k(qrels, run, k, per_query=True),
        f"recall_{k}": metrics.recall_at_k(qrels, run, k, per_query=True),
        f"P_{k}": metrics.precision_at_k(qrels, run, k, per_query=True),
    }
    assert set(reference) == set(ours[f"ndcg_cut_{k}"])  # same query set as pytrec_eval
    for measure, per_query in ours.items():
        for query_id, value in per_query.items():
            assert value == pytest.approx(reference[query_id][measure], abs=1e-12), (
                measure,
                query_id,
            )
    # The mean is over the queries pytrec_eval evaluates (in both qrels and run).
    for measure, function in [
        (f"ndcg_cut_{k}", metrics.ndcg_at_k),
        (f"recall_{k}", metrics.recall_at_k),
        (f"P_{k}", metrics.precision_at_k),
    ]:
        mean_reference = sum(r[measure] for r in reference.values()) / len(reference)
        assert function(qrels, run, k) == pytest.approx(mean_reference, abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_mrr_at_10_matches_pytrec_recip_rank_on_top10(seed):
    qrels, run = _random_case(seed)
    # trec_eval's recip_rank has no cutoff: give it the top 10 in trec_eval order.
    truncated = {
        q: {d: scores[d] for d in metrics.rank_documents(scores)[:10]} for q, scores in run.items()
    }
    reference = _pytrec(qrels, truncated, {"recip_rank"})
    ours = metrics.mrr_at_k(qrels, run, 10, per_query=True)
    for query_id, value in ours.items():
        assert value == pytest.approx(reference[query_id]["recip_rank"], abs=1e-12)
    assert metrics.precision_at_1(qrels, run) == pytest.approx(
        sum(r["P_1"] for r in _pytrec(qrels, run, {"P_1"}).values()) / len(ours)
    )


def test_tie_order_is_doc_id_descending():
    """All four documents tie; trec_eval ranks them z, c, b, a (strcmp descending)."""
    qrels = {"q": {"a": 3, "b": 0, "c": 0, "z": 1}}
    run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0, "z": 1.0}}
    assert metrics.rank_documents(run["q"]) == ["z", "c", "b", "a"]
    assert metrics.mrr_at_k(qrels, run, 10) == pytest.approx(1.0)
    # DCG@1 = 1 (z), ideal@1 = 3 (a): 1/3, as pytrec_eval says.
    assert metrics.ndcg_at_k(qrels, run, 1) == pytest.approx(1 / 3)
    assert metrics.ndcg_at_k(qrels, run, 1) == pytest.approx(
        _pytrec(qrels, run, {"ndcg_cut_1"})["q"]["ndcg_cut_1"]
    )


def test_ideal_dcg_uses_unretrieved_judged_documents():
    qrels = {"q": {"a": 1, "b": 2}}
    run = {"q": {"a": 5.0, "x": 1.0}}  # b (grade 2) never retrieved
    expected = 1.0 / (2 + 1 / 1.584962500721156)
    assert metrics.ndcg_at_k(qrels, run, 5) == pytest.approx(expected)


def test_bad_cutoff_is_refused():
    with pytest.raises(ValueError, match="cutoff k"):
        metrics.ndcg_at_k({"q": {"a": 1}}, {"q": {"a": 1.0}}, k=0)
