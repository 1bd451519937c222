"""A tiny trained LoRA run shared by the load_trained / checkpoint-fault tests (trained once per
test session): 2 steps of a tiny random Qwen2.5-VL MetaEmbed (R_q = 4, R_c = 8) with LoRA,
checkpoints at steps 1 and 2, the built-in test tokenizer under its data dir."""

from __future__ import annotations

import shutil
from pathlib import Path

from metaembed_jax.training import loop
from tests.helpers import RandomBatches, build_test_tokenizer, tiny_run_config

_RUN: dict[str, Path] = {}


def tiny_lora_config(data_dir: Path):
    tokenizer_dir = data_dir / "tokenizer"
    tokenizer = build_test_tokenizer(tokenizer_dir, 320)
    config = tiny_run_config(r_q=4, r_c=8, vocab_size=len(tokenizer))
    config.loss.groups = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0))
    config.lora.enabled = True
    config.train.steps = 2
    config.checkpoint.every = 1
    config.data.dir = str(data_dir)
    config.data.min_pixels, config.data.max_pixels = 28 * 28, 56 * 56
    config.data.length_buckets = (32, 64)
    return config


def trained_lora_run(tmp_path_factory) -> Path:
    """The run directory (train once, reuse); copy it before damaging anything."""
    if "run" not in _RUN:
        root = tmp_path_factory.mktemp("trained_lora_run")
        config = tiny_lora_config(root / "data")
        loop.train(config, root / "run", train_iterator=RandomBatches(0))
        _RUN["run"] = root / "run"
    return _RUN["run"]


def copy_run(run: Path, destination: Path) -> Path:
    shutil.copytree(run, destination)
    return destination
