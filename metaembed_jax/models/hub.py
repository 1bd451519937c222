"""Hugging Face Hub ids wherever a local checkpoint directory is accepted.

`resolve_checkpoint("Qwen/Qwen2.5-VL-3B-Instruct")` returns the local snapshot directory of that
repository, downloaded by `huggingface_hub.snapshot_download` into the HF cache (`HF_HOME` /
`HF_HUB_CACHE`) on first use; with `HF_HUB_OFFLINE=1` only the cache is read. A path that exists
is returned unchanged, so local directories keep working as before.
"""

from __future__ import annotations

import os
import re

# What loading a backbone and its processor reads (not the .bin / .pth duplicates).
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(value: str) -> bool:
    """True for "owner/name" strings that are not an existing local path."""
    return bool(_REPO_ID.match(str(value))) and not os.path.exists(value)


def resolve_checkpoint(path_or_id: str | os.PathLike, revision: str | None = None) -> str:
    """A local checkpoint directory for a local path or a Hub repository id.

    Raises FileNotFoundError when an id is neither in the cache (offline) nor downloadable,
    naming the id and the `hf download` command that fetches it.
    """
    path = os.fspath(path_or_id)
    if not path or not is_hub_id(path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(path, revision=revision, allow_patterns=list(CHECKPOINT_FILES))
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{path!r} is neither a local directory nor a Hub repository in the cache, and it "
            f"could not be downloaded ({error.__class__.__name__}; HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', '0')}): fetch it with `hf download {path}`"
        ) from None
