"""The paper's ablation at small scale: MMR vs `nommr` vs `single`, one table.

    python -m metaembed_jax.evaluation.ablation --workdirs runs/mmr runs/nommr runs/single \
        [--names MMR nommr single]

Reads each run's `<workdir>/eval/results.json` (written by eval.py) and prints one table: rows
= budgets, one column per (headline average, variant); a variant that cannot serve a budget
(the single-vector model only has (1, 1)) shows "-". Then the three claims of the paper, each
with the numbers it rests on: with MMR quality rises with the budget; without MMR the small
budgets collapse; MMR at the largest budget beats the single vector.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metaembed_jax.evaluation.report import format_score, render_table


def load_results(workdir: str) -> dict[str, Any]:
    path = Path(workdir) / "eval" / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `python eval.py --config ... --workdir {workdir}` first"
        )
    return json.loads(path.read_text())


def _score(results: Mapping[str, Any], budget: str, column: str) -> float | None:
    for row in results["rows"]:
        if row["budget"] == budget:
            return row["scores"].get(column)
    return None


def ablation_table(variants: Mapping[str, Mapping[str, Any]]) -> tuple[str, list[str], list[str]]:
    """(table text, budgets, headline columns) for `{variant name: results.json content}`."""
    budgets = list(dict.fromkeys(b for r in variants.values() for b in r["budgets"]))
    columns = list(dict.fromkeys(c for r in variants.values() for c in r["average_columns"]))
    header = ["budget"] + [f"{column} [{name}]" for column in columns for name in variants]
    body = [
        [budget]
        + [
            format_score(_score(results, budget, column))
            for column in columns
            for results in variants.values()
        ]
        for budget in budgets
    ]
    return render_table(header, body), budgets, columns


def _series(results, budgets, column) -> list[tuple[str, float]]:
    return [(b, v) for b in budgets if (v := _score(results, b, column)) is not None]


def claims(
    variants: Mapping[str, Mapping[str, Any]],
    budgets: Sequence[str],
    column: str,
    mmr: str = "MMR",
    nommr: str = "nommr",
    single: str = "single",
) -> list[str]:
    """The paper's three claims checked on `column`, one line each with its numbers."""
    lines = []
    if mmr in variants:
        series = _series(variants[mmr], budgets, column)
        if series:
            rises = series[-1][1] > series[0][1]
            monotone = all(b[1] >= a[1] for a, b in zip(series, series[1:], strict=False))
            values = ", ".join(f"{b} {100 * v:.1f}" for b, v in series)
            lines.append(
                f"[{'yes' if rises else 'no'}] {mmr}: quality rises with the budget, largest vs "
                f"smallest (monotone: {'yes' if monotone else 'no'}): {values}"
            )
    if mmr in variants and nommr in variants:
        small = budgets[0]
        m, n = _score(variants[mmr], small, column), _score(variants[nommr], small, column)
        if m is not None and n is not None:
            verdict = "yes" if n < m else "no"
            lines.append(
                f"[{verdict}] without MMR the smallest budget {small} is worse: "
                f"{nommr} {100 * n:.1f} vs {mmr} {100 * m:.1f}"
            )
    if mmr in variants and single in variants:
        mmr_series = _series(variants[mmr], budgets, column)
        single_series = _series(variants[single], budgets, column)
        if mmr_series and single_series:
            (big, m), (b1, s) = mmr_series[-1], single_series[0]
            lines.append(
                f"[{'yes' if m > s else 'no'}] {mmr} at {big} beats the single vector: "
                f"{100 * m:.1f} vs {single} {b1} {100 * s:.1f}"
            )
    return [f"{column}: {line}" for line in lines]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdirs", nargs="+", required=True, help="one run dir per variant")
    parser.add_argument("--names", nargs="+", help="variant names (default: MMR nommr single)")
    args = parser.parse_args(argv)
    names = args.names or ["MMR", "nommr", "single"][: len(args.workdirs)]
    if len(names) != len(args.workdirs):
        parser.error(f"{len(names)} names for {len(args.workdirs)} workdirs")
    variants = {name: load_results(d) for name, d in zip(names, args.workdirs, strict=True)}
    table, budgets, columns = ablation_table(variants)
    print(table)
    print()
    for column in columns:
        for line in claims(variants, budgets, column, *names[:3]):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
