"""`metaembed export --run DIR --out OUT [--format hf|peft]`: a trained run for PyTorch /
transformers users, as a transformers checkpoint (`hf.py`) or a PEFT adapter (`peft.py`)."""

from __future__ import annotations

import os
from pathlib import Path

from metaembed_jax.formats.hf import export_hf
from metaembed_jax.formats.output_dir import check_output_directory
from metaembed_jax.formats.peft import export_peft
from metaembed_jax.formats.trained import load_trained
from metaembed_jax.models.hub import resolve_checkpoint
from metaembed_jax.training.model import base_hf_config, lora_spec
from metaembed_jax.training.run_identity import read_saved_config

FORMATS = ("hf", "peft")


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "hf",
    step=None,
    *,
    force: bool = False,
):
    """`metaembed export`: the run's checkpoint `step` (default latest) written to `out` in
    format `fmt`; returns `out`. Raises ValueError for an unknown format or an `out` inside a
    run / index directory, FileExistsError for a non-empty `out` without `force`
    (`check_output_directory`), and as `load_trained` / `export_hf` do."""

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; expected one of {FORMATS}")
    check_output_directory(out, force=force)
    config = read_saved_config(run_dir)
    model, processor = load_trained(run_dir, step)
    hf_config = base_hf_config(config, len(processor.tokenizer))
    if fmt == "peft":
        lora = lora_spec(config)
        return export_peft(model, processor, hf_config, Path(out), lora, config.init_from or None)
    base = resolve_checkpoint(config.init_from) if config.init_from else None
    return export_hf(model, processor, hf_config, Path(out), base, data_config=config.data)
