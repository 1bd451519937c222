"""How every command ends on a user's mistake: one line on stderr, no traceback.

The package raises clear exceptions for what a user can get wrong (a missing file or run, a
bad value, a damaged checkpoint or index, an index of another model, a busy run directory):
`FileNotFoundError` and other `OSError`s, `ValueError` and its subclasses (`BadRowError`,
`RunMismatchError`, `CheckpointError`, `OtherModelError`, `CorpusFileError`), `ImportError` of
an optional dependency (`MissingTorchError`), `RunLockedError`. The commands catch exactly
these at the top (`reporting_errors`), print `<program>: error: <message>` (one line, or the
lines of a message that lists several differences) and exit 1;
mistakes in the command line itself (`UsageError`, argparse's own) exit 2. Any other exception
is a bug and keeps its traceback; `METAEMBED_TRACEBACK=1` shows the traceback of a reported
error too.
"""

from __future__ import annotations

import contextlib
import os
import sys

from metaembed_jax.training.run_lock import RunLockedError

USER_ERRORS = (OSError, ValueError, ImportError, RunLockedError)
USAGE_EXIT, ERROR_EXIT = 2, 1


class UsageError(Exception):
    """A command line that cannot work (conflicting or empty options): exit status 2."""


def show_tracebacks() -> bool:
    return os.environ.get("METAEMBED_TRACEBACK", "") not in ("", "0")


def message(error: BaseException) -> str:
    """The error's message (a KeyError's without the quotes repr adds), else its type."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return str(text).strip() or type(error).__name__


@contextlib.contextmanager
def reporting_errors(program: str):
    """Turn a user error raised in the block into `<program>: error: ...` and SystemExit(1)
    (`UsageError`: 2; KeyboardInterrupt: 130)."""
    try:
        yield
    except UsageError as error:
        print(f"{program}: error: {message(error)}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT) from None
    except USER_ERRORS as error:
        if show_tracebacks():
            raise
        print(f"{program}: error: {message(error)}", file=sys.stderr)
        raise SystemExit(ERROR_EXIT) from None
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
