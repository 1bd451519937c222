"""The paper's ablation at small scale: MMR vs `nommr` vs `single`, over seeds, one table.

    python -m metaembed_jax.evaluation.ablation --workdirs runs/mmr runs/nommr runs/single \
        [--names MMR nommr single]

Each workdir is one trained and evaluated run (`<workdir>/eval/results.json`, written by eval.py)
or a folder of such runs, one per seed (`<workdir>/seed*/eval/results.json`, as `make ablation`
writes them). The table has one row per budget and one column per (headline average, variant):
the mean over seeds, `+- std` (sample standard deviation) when there are several; "-" where a
variant cannot serve a budget (the single-vector model only has (1, 1)). Then the paper's three
claims, each with its margin, in points and (over seeds) in units of the seeds' standard
deviation: with MMR quality rises with the budget; without MMR the small budgets collapse; MMR at
the largest budget matches or beats the single vector.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metaembed_jax.evaluation.report import render_table


def _results_file(run: Path) -> Path:
    return run / "eval" / "results.json"


def seed_runs(workdir: str) -> list[Path]:
    """The run folders of a variant: `workdir` itself, or its `seed*` subfolders."""
    root = Path(workdir)
    if _results_file(root).is_file():
        return [root]
    runs = sorted(p for p in root.glob("seed*") if _results_file(p).is_file())
    if not runs:
        raise FileNotFoundError(
            f"neither {_results_file(root)} nor {root}/seed*/eval/results.json found: run "
            f"`python eval.py --config ... --workdir {workdir}` first"
        )
    return runs


def load_results(workdir: str) -> list[dict[str, Any]]:
    """results.json of every seed of a variant (one entry for a single run)."""
    return [json.loads(_results_file(run).read_text()) for run in seed_runs(workdir)]


def _score(results: Mapping[str, Any], budget: str, column: str) -> float | None:
    for row in results["rows"]:
        if row["budget"] == budget:
            return row["scores"].get(column)
    return None


def seed_scores(seeds: Sequence[Mapping[str, Any]], budget: str, column: str) -> list[float]:
    """x100 scores of every seed at one budget ([] when the variant lacks the budget)."""
    values = [_score(results, budget, column) for results in seeds]
    return [100 * v for v in values if v is not None]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} +- {std:.1f}"


def ablation_table(variants: Mapping[str, Sequence[Mapping[str, Any]]]):
    """(table text, budgets, headline columns) for `{variant name: [results.json per seed]}`."""
    all_results = [r for seeds in variants.values() for r in seeds]
    budgets = list(dict.fromkeys(b for r in all_results for b in r["budgets"]))
    columns = list(dict.fromkeys(c for r in all_results for c in r["average_columns"]))
    header = ["budget"] + [f"{column} [{name}]" for column in columns for name in variants]
    body = [
        [budget]
        + [
            format_mean_std(seed_scores(seeds, budget, column))
            for column in columns
            for seeds in variants.values()
        ]
        for budget in budgets
    ]
    return render_table(header, body), budgets, columns


def _margin(better: Sequence[float], worse: Sequence[float]) -> tuple[float, str]:
    """Mean difference in points and, over seeds, the same in units of the larger std."""
    difference = statistics.fmean(better) - statistics.fmean(worse)
    stds = [s for s in (mean_std(better)[1], mean_std(worse)[1]) if s is not None]
    if not stds:
        return difference, f"{difference:+.1f} points"
    spread = max(stds)
    units = "inf" if spread == 0 else f"{difference / spread:+.1f}"
    return difference, f"{difference:+.1f} points = {units} std"


def _series(seeds, budgets, column) -> list[tuple[str, list[float]]]:
    return [(b, v) for b in budgets if (v := seed_scores(seeds, b, column))]


def _rises_claim(name, series) -> str:
    (small, first), (big, last) = series[0], series[-1]
    means = [statistics.fmean(v) for _, v in series]
    worst_drop = max([a - b for a, b in zip(means, means[1:], strict=False)] + [0.0])
    difference, margin = _margin(last, first)
    values = ", ".join(f"{b} {m:.1f}" for (b, _), m in zip(series, means, strict=True))
    return (
        f"[{'yes' if difference > 0 else 'no'}] {name}: quality rises with the budget, {big} vs "
        f"{small}: {margin} (largest drop between neighbours {worst_drop:.1f}): {values}"
    )


def claims(
    variants: Mapping[str, Sequence[Mapping[str, Any]]],
    budgets: Sequence[str],
    column: str,
    mmr: str = "MMR",
    nommr: str = "nommr",
    single: str = "single",
) -> list[str]:
    """The paper's three claims checked on `column`, one line each with its margin."""
    lines = []
    mmr_series = _series(variants[mmr], budgets, column) if mmr in variants else []
    if mmr_series:
        lines.append(_rises_claim(mmr, mmr_series))
    if mmr_series and nommr in variants:
        small, m = mmr_series[0]
        if n := seed_scores(variants[nommr], small, column):
            difference, margin = _margin(m, n)
            lines.append(
                f"[{'yes' if difference > 0 else 'no'}] without MMR the smallest budget {small} "
                f"is worse: {mmr} - {nommr} = {margin}"
            )
    single_series = _series(variants[single], budgets, column) if single in variants else []
    if mmr_series and single_series:
        (big, m), (b1, s) = mmr_series[-1], single_series[0]
        difference, margin = _margin(m, s)
        lines.append(
            f"[{'yes' if difference >= 0 else 'no'}] {mmr} at {big} matches or beats the single "
            f"vector {b1}: {mmr} - {single} = {margin}"
        )
        (small, m1) = mmr_series[0]
        lines.append(
            f"[info] {mmr} at {small} vs the single vector (the cost of the smallest budget): "
            f"{_margin(m1, s)[1]}"
        )
    return [f"{column}: {line}" for line in lines]


def variant_roles(names: Sequence[str]) -> dict[str, str]:
    """Which variant plays MMR / nommr / single in the claims: the names "nommr" and "single"
    (any case) wherever they stand, MMR the first other name; with three unrecognised names, their
    order (MMR, nommr, single)."""
    by_lower = {name.lower(): name for name in names}
    roles = {role: by_lower[role] for role in ("nommr", "single") if role in by_lower}
    rest = [name for name in names if name not in roles.values()]
    if not roles and len(names) == 3:
        return dict(zip(("mmr", "nommr", "single"), names, strict=True))
    roles["mmr"] = rest[0] if rest else "MMR"
    return roles


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workdirs",
        nargs="+",
        required=True,
        help="one run dir (or dir of seed* runs) per variant",
    )
    parser.add_argument("--names", nargs="+", help="variant names (default: MMR nommr single)")
    args = parser.parse_args(argv)
    names = args.names or ["MMR", "nommr", "single"][: len(args.workdirs)]
    if len(names) != len(args.workdirs):
        parser.error(f"{len(names)} names for {len(args.workdirs)} workdirs")
    variants = {name: load_results(d) for name, d in zip(names, args.workdirs, strict=True)}
    table, budgets, columns = ablation_table(variants)
    counts = {name: len(seeds) for name, seeds in variants.items()}
    print(f"seeds per variant: {counts} (mean +- sample std over seeds, x100)")
    print(table)
    print()
    roles = variant_roles(names)
    for column in columns:
        for line in claims(variants, budgets, column, **roles):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
