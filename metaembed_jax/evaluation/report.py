"""The test-time scaling report: console table, `results.json`, `scaling.png`.

Input: the suites a run evaluated, each `{"suite": name, "tasks": {task: task_result},
"averages": {budget_key: {average_name: value}}}` where a task result is what
`retrieval.evaluate_corpus` / `mmeb.evaluate_dataset` return. One table row per budget; the
columns are each task's primary metric (only the averages for suites with many tasks, e.g.
MMEB's 36 datasets), then the averages, then the per-query scoring latency (summed scoring time
over summed queries of all tasks, compilation excluded) and the index bytes a deployment at that
budget needs (all evaluated corpora, only the first r_c vectors per candidate), and the mean
cosine between two vectors of one item at that budget (queries / candidates, averaged over the
tasks; `retrieval.mean_vector_cosine`): near 1, the vectors have collapsed into one and a larger
budget cannot rank differently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Suites with more tasks than this show only their averages in the console table / plot.
MAX_TASK_COLUMNS = 6


def _columns(suite: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """(column label, "task" | "average", task or average name) of one suite."""
    columns = []
    tasks = suite["tasks"]
    if len(tasks) <= MAX_TASK_COLUMNS:
        for task_name, task in tasks.items():
            columns.append((f"{task_name} {task['metric']}", "task", task_name))
    first_budget = next(iter(suite.get("averages", {}).values()), {})
    for average_name in first_budget:
        columns.append((f"{suite['suite']} {average_name}", "average", average_name))
    return columns


def average_columns(suites: Sequence[Mapping[str, Any]]) -> list[str]:
    """Labels of the suites' average columns (the headline numbers, e.g. "builtin avg")."""
    return [label for suite in suites for label, kind, _ in _columns(suite) if kind == "average"]


def _mean_cosines(tasks: Sequence[Mapping[str, Any]], key: str) -> dict[str, float | None]:
    """`{"query", "candidate"}`: the tasks' mean vector cosines at budget `key` (None when no
    task reports one, e.g. at one vector)."""
    means = {}
    for side in ("query", "candidate"):
        values = [
            t["by_budget"][key].get(f"{side}_vector_cosine") for t in tasks if key in t["by_budget"]
        ]
        values = [v for v in values if v is not None]
        means[side] = sum(values) / len(values) if values else None
    return means


def build_rows(suites: Sequence[Mapping[str, Any]], budgets: Sequence[str]) -> list[dict]:
    """One dict per budget: `{"budget", "scores": {column: value}, "latency_ms_per_query",
    "index_bytes", "vector_cosine": {"query", "candidate"}}`. A task that was not evaluated at a
    budget has no entry for it."""
    rows = []
    all_tasks = [task for suite in suites for task in suite["tasks"].values()]
    for key in budgets:
        scores, seconds, num_queries, index_bytes = {}, 0.0, 0, 0
        for suite in suites:
            for label, kind, name in _columns(suite):
                if kind == "task":
                    task = suite["tasks"][name]
                    if key in task["by_budget"]:
                        scores[label] = task["by_budget"][key][task["metric"]]
                elif name in suite["averages"].get(key, {}):
                    scores[label] = suite["averages"][key][name]
            for task in suite["tasks"].values():
                if key in task["by_budget"]:
                    seconds += task["by_budget"][key]["scoring_seconds"]
                    index_bytes += task["by_budget"][key]["index_bytes"]
                    num_queries += task["num_queries"]
        rows.append(
            {
                "budget": key,
                "scores": scores,
                "latency_ms_per_query": 1e3 * seconds / num_queries if num_queries else None,
                "index_bytes": index_bytes,
                "vector_cosine": _mean_cosines(all_tasks, key),
            }
        )
    return rows


def format_bytes(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GiB"


def format_score(value: float | None) -> str:
    """A score x100 with one decimal; "-" when missing."""
    return "-" if value is None else f"{100 * value:.1f}"


def render_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    """Right-aligned columns separated by two spaces, a dashed rule under the header."""
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(line, widths, strict=True))
             for line in [header, *body]]  # fmt: skip
    rule = "-" * len(lines[0])
    return "\n".join([lines[0], rule, *lines[1:]])


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table: rows = budgets, scores x100 with one decimal."""
    columns = list(dict.fromkeys(c for row in rows for c in row["scores"]))
    header = ["budget", *columns, "ms/query", "index", "vector cos q / c"]
    body = []
    for row in rows:
        cells = [row["budget"], *(format_score(row["scores"].get(c)) for c in columns)]
        latency = row["latency_ms_per_query"]
        cells.append("-" if latency is None else f"{latency:.3f}")
        cells.append(format_bytes(row["index_bytes"]))
        cosine = row["vector_cosine"]
        cells.append(" / ".join(_format_cosine(cosine[s]) for s in ("query", "candidate")))
        body.append(cells)
    return render_table(header, body)


def _format_cosine(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> None:
    """Writes `results` as indented JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=1, sort_keys=False))
    os.replace(temporary, path)


def plot_scaling(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    title: str = "",
    averages: Sequence[str] = (),
):
    """Quality vs budget (one line per column, `averages` drawn thicker) beside latency and
    index size vs budget (second y axis)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    labels = [row["budget"] for row in rows]
    positions = list(range(len(labels)))
    figure, (quality_axis, cost_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = ["-", "--", ":", "-."]  # the colour cycle has 10 entries; styles tell more apart
    columns = dict.fromkeys(c for row in rows for c in row["scores"])
    for number, column in enumerate(columns):
        points = [
            (i, 100 * r["scores"][column]) for i, r in enumerate(rows) if column in r["scores"]
        ]
        quality_axis.plot(
            *zip(*points, strict=True),
            marker="o",
            linestyle=styles[(number // 10) % len(styles)],
            linewidth=3.0 if column in averages else 1.5,
            label=column,
        )
    quality_axis.set(xlabel="budget (r_q, r_c)", ylabel="score x100", title="quality vs budget")
    quality_axis.set_xticks(positions, labels)
    quality_axis.grid(alpha=0.3)
    quality_axis.legend(fontsize=7)

    latencies = [row["latency_ms_per_query"] or 0.0 for row in rows]
    cost_axis.plot(positions, latencies, marker="o", color="tab:red", label="ms / query")
    cost_axis.set(xlabel="budget (r_q, r_c)", ylabel="scoring latency (ms / query)")
    cost_axis.set_xticks(positions, labels)
    size_axis = cost_axis.twinx()  # the second axis: index size
    size_axis.plot(
        positions,
        [row["index_bytes"] / 2**20 for row in rows],
        marker="s",
        linestyle="--",
        color="tab:blue",
        label="index MiB",
    )
    size_axis.set_ylabel("index size (MiB)")
    cost_axis.set_title("cost vs budget")
    handles = cost_axis.get_legend_handles_labels()
    size_handles = size_axis.get_legend_handles_labels()
    cost_axis.legend(handles[0] + size_handles[0], handles[1] + size_handles[1], fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(
    eval_dir: str | os.PathLike,
    suites: Sequence[Mapping[str, Any]],
    budgets: Sequence[str],
    model_info: Mapping[str, Any] | None = None,
    plot: bool = True,
) -> tuple[str, dict[str, Any]]:
    """Writes `<eval_dir>/results.json` (and `scaling.png`); returns (table text, results)."""
    rows = build_rows(suites, budgets)
    results = {
        "model": dict(model_info or {}),
        "budgets": list(budgets),
        "average_columns": average_columns(suites),
        "rows": rows,
        "suites": {suite["suite"]: suite for suite in suites},
    }
    write_results(Path(eval_dir) / "results.json", results)
    if plot:
        plot_scaling(
            Path(eval_dir) / "scaling.png",
            rows,
            title=str((model_info or {}).get("name", "")),
            averages=results["average_columns"],
        )
    return format_table(rows), results
