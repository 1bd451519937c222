"""The command line: `metaembed ...` (`main`) and the absl programs that train.py / eval.py /
`metaembed train|eval|data` run (`apps`).

Importing this package (before anything imports transformers) lets transformers' "PyTorch was
not found" advice through once per process: its `__init__` can run twice, printing it twice,
and nothing a command does needs PyTorch (`metaembed export`, which does, says so itself).
"""

import logging


class _OnceFilter(logging.Filter):
    """Passes the first record whose message starts with `prefix`, drops the later ones."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


logging.getLogger("transformers").addFilter(_OnceFilter("PyTorch was not found"))
