"""ViDoRe v1 / v2 in the BEIR layout (corpus, queries, qrels), and any BEIR-style set.

Each dataset is ranked over its whole corpus; reported: nDCG@5 (the ViDoRe headline, with
trec_eval semantics), recall@1/5/10, MRR@10 and P@1. The suite average is the mean nDCG@5.
Datasets are read either converted (`metaembed_jax.data.build` -> `read_eval_set`) or straight
from a BEIR directory of parquet files (`metaembed_jax.data.sources.beir_records`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metaembed_jax.data import sources
from metaembed_jax.data.builders import eval_set_built, read_eval_set
from metaembed_jax.evaluation.retrieval import evaluate_corpus, mean_averages, qrels_from_rows
from metaembed_jax.retrieval.encode import EmbeddingCache, Encode


def read_beir_dir(root: str | os.PathLike) -> dict[str, Any]:
    """A raw BEIR / ViDoRe directory (corpus, queries, qrels parquet) as in-memory tables."""
    tables = sources.beir_records(root, sources.BadRows(skip=False))
    return {
        "corpus": [record for _, record in tables["corpus"]],
        "queries": [record for _, record in tables["queries"]],
        "qrels": qrels_from_rows(record for _, record in tables["qrels"]),
    }


def read_dataset(path: str | os.PathLike) -> dict[str, Any]:
    """Tables of one dataset: a converted `RetrievalEval` dir or a raw BEIR parquet dir."""
    if eval_set_built(path):
        return read_eval_set(path, "test")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"ViDoRe / BEIR dataset directory {os.fspath(path)!r} not found")
    return read_beir_dir(path)


def evaluate_vidore(
    encode: Encode,
    datasets: Mapping[str, Mapping[str, Any]],
    budgets: Sequence[Sequence[int]],
    *,
    suite: str = "vidore",
    cache: EmbeddingCache | None = None,
) -> dict[str, Any]:
    """Every dataset of `datasets` (`{name: {"corpus","queries","qrels"}}`) at every budget.

    Returns `{"suite", "tasks": {name: result}, "averages": {budget: {"avg": mean nDCG@5}}}`.
    """
    tasks = {
        name: evaluate_corpus(
            encode,
            tables["corpus"],
            tables["queries"],
            tables["qrels"],
            budgets,
            name=f"{suite}/{name}",
            cache=cache,
        )
        for name, tables in datasets.items()
    }
    return {"suite": suite, "tasks": tasks, "averages": mean_averages(tasks, budgets)}
