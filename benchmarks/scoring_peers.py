"""bench_scoring.py's peers, colpali-engine's and PyLate's MaxSim scorers (requirements-bench.txt),
and the table cells that show them: their times, or "peer not installed" where one is absent.

No torch or jax import here, so that bench_index_processes.py can parse the rows too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

PEERS = ("colpali", "pylate")
NOT_INSTALLED = "peer not installed"


def _stub_packages(*names: str) -> None:
    """Register empty parent packages with the installed __path__, so that their submodules
    import without running the package __init__ (which pulls optional heavy dependencies)."""
    for name in names:
        if name in sys.modules:
            continue
        parent, _, child = name.rpartition(".")
        if parent:
            path = [os.path.join(sys.modules[parent].__path__[0], child)]
        else:
            path = list(importlib.util.find_spec(name).submodule_search_locations)
        module = types.ModuleType(name)
        module.__path__ = path
        sys.modules[name] = module


def load_peers(required: bool = True) -> dict:
    """-> {"colpali": fn(q, c) -> scores, "pylate": fn(q, c) -> scores} on torch tensors, of
    the installed peers. Raises SystemExit naming the missing ones if `required`."""
    peers = {}
    if importlib.util.find_spec("colpali_engine"):
        _stub_packages("colpali_engine", "colpali_engine.utils")
        processing = importlib.import_module("colpali_engine.utils.processing_utils")
        processor = processing.BaseVisualRetrieverProcessor
        peers["colpali"] = lambda q, c: processor.score_multi_vector(q, c, device="cpu")
    if importlib.util.find_spec("pylate"):
        _stub_packages("pylate", "pylate.utils", "pylate.scores")
        colbert = importlib.import_module("pylate.scores.colbert")
        peers["pylate"] = lambda q, c: colbert.colbert_scores(q, c)
    missing = [name for name in PEERS if name not in peers]
    if missing and required:
        raise SystemExit(
            f"peers not installed: {', '.join(missing)}; install requirements-bench.txt "
            "(make .venv/.bench), or pass --smoke to run our side without them"
        )
    return peers


def peer_cells(peer_seconds: dict[str, float], ours_seconds: float, scale: float, digits: int):
    """Table cells: each peer's time x `scale` (or "peer not installed"), then the speed-up
    against the faster installed peer ("-" without one)."""
    cells = [f"{peer_seconds[n] * scale:.{digits}f}" if n in peer_seconds else NOT_INSTALLED
             for n in PEERS]  # fmt: skip
    if not peer_seconds:
        return [*cells, "-"]
    faster = min(peer_seconds, key=peer_seconds.get)
    return [*cells, f"{peer_seconds[faster] / ours_seconds:.2f}x ({faster})"]


def peer_progress(peer_seconds: dict[str, float], digits: int) -> str:
    """ "colpali 0.123s, pylate 0.456s" (or "colpali peer not installed") for progress lines."""
    return ", ".join(
        f"{n} {peer_seconds[n]:.{digits}f}s" if n in peer_seconds else f"{n} {NOT_INSTALLED}"
        for n in PEERS
    )
