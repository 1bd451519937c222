"""Training metrics: `DIR/metrics.jsonl`, TensorBoard event files, a tqdm bar with ETA.

Only process 0 writes. One JSON object per logged step: step, loss, group_losses (one per
(r_q, r_c) group, also as `loss/r{r_q}x{r_c}`), lr, grad_norm, examples_per_s.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np


class MetricsWriter:
    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        groups,
        total_steps: int,
        start_step: int,
        progress_bar: bool = True,
    ):
        self.enabled = jax.process_index() == 0
        self.groups = tuple(tuple(g) for g in groups)
        self.path = Path(workdir) / "metrics.jsonl"
        self._bar = None
        self._tensorboard = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))
        except ImportError:  # optional: metrics.jsonl is the record
            self._tensorboard = None
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def record(self, step: int, metrics: dict[str, Any], examples_per_s: float) -> dict:
        """Write one logged step; returns the JSON row."""
        metrics = jax.device_get(metrics)
        group_losses = np.asarray(metrics["group_losses"], np.float64).tolist()
        row = {
            "step": int(step),
            "loss": float(metrics["loss"]),
            "group_losses": group_losses,
            "lr": float(metrics["lr"]),
            "grad_norm": float(metrics["grad_norm"]),
            "examples_per_s": float(examples_per_s),
        }
        for (r_q, r_c, _), value in zip(self.groups, group_losses, strict=True):
            row[f"loss/r{r_q}x{r_c}"] = value
        if not self.enabled:
            return row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "group_losses"):
                    self._tensorboard.add_scalar(key if "/" in key else f"train/{key}", value, step)
            self._tensorboard.flush()
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        return row

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def truncate_to_step(path: str | os.PathLike, last_step: int) -> None:
    """Keep only the metric lines of steps <= `last_step` (the step a run resumes from; 0 = a
    fresh start, which empties the file), so a resumed run never logs a step twice.

    Lines that are not a JSON object with an integer `step` (a line cut short by a kill) are
    dropped with a warning instead of stopping the resume. Only process 0 writes.
    """
    path = Path(path)
    if jax.process_index() != 0 or not path.exists():
        return
    lines = path.read_text().splitlines()
    kept, invalid = [], 0
    for number, line in enumerate(lines, start=1):
        step = _logged_step(line)
        if step is None:
            if line.strip():
                invalid += 1
                logging.warning(
                    "metrics: dropping invalid line %d of %s: %.80r", number, path, line
                )
            continue
        if step <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        logging.info(
            "metrics: kept %d lines up to step %d, dropped %d (%d invalid)",
            len(kept),
            last_step,
            len(lines) - len(kept),
            invalid,
        )
        path.write_text("".join(line + "\n" for line in kept))


def _logged_step(line: str) -> int | None:
    """The `step` of one metrics line, or None when the line is not a valid metrics row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class Throughput:
    """Examples per second between logging points (wall clock, includes input pipeline)."""

    def __init__(self):
        self._time = time.perf_counter()
        self._examples = 0

    def add(self, examples: int) -> None:
        self._examples += examples

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._examples / max(now - self._time, 1e-9)
        self._time, self._examples = now, 0
        return rate
