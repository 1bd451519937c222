"""One training process per run directory: `DIR/train.lock`, held with `fcntl.flock`.

Two `train.py` on one `--workdir` would both write `metrics.jsonl` and the checkpoints, each
step logged twice and each save racing the other's. The first process holds an exclusive lock
on `DIR/train.lock` for as long as it trains (the kernel drops it when the process ends, however
it ends: no stale lock after a kill) and writes its pid and host there; a second one is refused
at once, naming that holder. With several JAX processes only process 0 takes the lock (the
others share its run directory by design).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = "train.lock"


class RunLockedError(RuntimeError):
    """Another training process holds the run directory."""


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that recorded no pid"


@contextlib.contextmanager
def run_lock(workdir: str | os.PathLike, *, take: bool = True):
    """Hold `workdir`'s training lock for the duration of the block (`take=False`: a no-op,
    for JAX processes other than 0).

    Raises RunLockedError naming the holder when another process holds it.
    """
    if not take:
        yield
        return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{workdir} is being trained by another process ({_holder(path)}): wait for it "
                "to finish or stop it, or train in another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)
