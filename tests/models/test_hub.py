"""Hub ids where a checkpoint directory is accepted, resolved offline from a populated
temporary HF cache (HF_HUB_OFFLINE=1, as every test runs): the backbone loaded by id equals the
one loaded from the directory; an id not in the cache fails naming the `hf download` command."""

import shutil

import huggingface_hub.constants
import jax
import numpy as np
import pytest
from flax import nnx

from metaembed_jax.models import load_hf, qwen2_vl
from metaembed_jax.models.hub import is_hub_id, resolve_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A tiny Qwen2.5-VL saved by transformers, placed in an HF cache as repo tiny-org/tiny."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    local = tmp_path / "local"
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**qwen2_vl.tiny_config())).save_pretrained(
        local
    )
    repo = tmp_path / "cache" / "models--tiny-org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(local, repo / "snapshots" / COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # nothing may be downloaded
    return local


def test_hub_id_loads_from_the_cache_like_the_directory(hub_cache, monkeypatch, tmp_path):
    assert is_hub_id("tiny-org/tiny") and not is_hub_id(str(hub_cache))
    assert resolve_checkpoint(str(hub_cache)) == str(hub_cache)
    resolved = resolve_checkpoint("tiny-org/tiny")
    assert resolved.endswith(f"snapshots/{COMMIT}")
    by_id = jax.tree.leaves(nnx.state(load_hf("tiny-org/tiny"), nnx.Param))
    by_dir = jax.tree.leaves(nnx.state(load_hf(hub_cache), nnx.Param))
    assert len(by_id) == len(by_dir) > 10
    for got, want in zip(by_id, by_dir, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    monkeypatch.chdir(tmp_path)  # "tiny-org/absent" is no local path here either
    with pytest.raises(FileNotFoundError, match=r"hf download tiny-org/absent"):
        resolve_checkpoint("tiny-org/absent")
