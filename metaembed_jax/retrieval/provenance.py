"""What built an index: the model and processor whose embeddings it holds, recorded in its
manifest (`MultiVectorIndex.metadata["model"]`) and checked before a search or an `--add`.

An index's vectors mean something only to the model that encoded them: searched with another
run, or the same run at another step, it still answers, with rankings that are noise. So an
index records

- `run` and `step`: where the model came from (for the message; a moved run still matches);
- `params_sha256`: a sha256 over a fixed sample of every trained parameter's values (the
  checkpoint's own values, exact whatever the mesh; a LoRA run adds its recorded base
  fingerprint, since its base is rebuilt from the seed and may differ by rounding);
- `processor_sha256`: a sha256 of the processor settings (the tokenizer's vocabulary, the
  processor type, the run's image and length settings): the same weights behind another
  processor embed other inputs;
- `trained_sizes` (R_q, R_c) and `pixel_budget`: the budget limits the index was built for.

`check_same_model` refuses a mismatch naming both models (`OtherModelError`), unless the caller
allows it; an index without a record (built before records existed) passes with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from metaembed_jax.training.run_identity import FINGERPRINT_FILE, sample_values
from metaembed_jax.training.state import trainable_filter

logger = logging.getLogger(__name__)
SAMPLES_PER_TENSOR = 1024
# The data settings that change what the processor makes of an item.
PROCESSOR_FIELDS = (
    "min_pixels",
    "max_pixels",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
    "length_buckets",
    "image_layout",
    "mllama_tile_size",
    "mllama_max_tiles",
)


class OtherModelError(ValueError):
    """An index searched (or extended) with a model other than the one that built it."""


def params_sha256(params: nnx.State) -> str:
    """sha256 over the names, shapes, dtypes and `SAMPLES_PER_TENSOR` evenly spaced values of
    every parameter in `params` (gathered in one compiled call; exact values, no reduction)."""
    flat = sorted(nnx.to_flat_state(params), key=lambda kv: kv[0])
    names = [".".join(map(str, path)) for path, _ in flat]
    arrays = [variable[...] for _, variable in flat]
    samples = sample_values(arrays, SAMPLES_PER_TENSOR)
    digest = hashlib.sha256()
    for name, array, sample in zip(names, arrays, samples, strict=True):
        digest.update(f"{name}{tuple(array.shape)}{array.dtype}".encode())
        digest.update(np.asarray(sample, np.float32).tobytes())
    return digest.hexdigest()


def processor_sha256(processor, data_config) -> str:
    """sha256 of what the processor makes of an item: its type, tokenizer vocabulary, pixel
    budget and the run's image / length settings (`PROCESSOR_FIELDS`)."""
    vocabulary = sorted(processor.tokenizer.get_vocab().items())
    settings = {
        "type": type(processor).__name__,
        "pixel_budget": int(getattr(processor, "pixel_budget", 0)),
        "data": {k: data_config.get(k) for k in PROCESSOR_FIELDS},
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode())
    digest.update(json.dumps(vocabulary, ensure_ascii=False).encode())
    return digest.hexdigest()


def model_record(model, processor, config, run_dir: Path | None, step: int | None) -> dict:
    """The `metadata["model"]` record of an index built by `model` / `processor` (see the
    module docstring)."""
    lora = bool(config.lora.enabled)
    digest = hashlib.sha256(params_sha256(nnx.state(model, trainable_filter(lora))).encode())
    base = None if run_dir is None else Path(run_dir) / FINGERPRINT_FILE
    if lora and base is not None and base.is_file():
        digest.update(json.loads(base.read_text())["sha256"].encode())
    return {
        "run": None if run_dir is None else str(Path(run_dir).resolve()),
        "step": step,
        "params_sha256": digest.hexdigest(),
        "processor_sha256": processor_sha256(processor, config.data),
        "trained_sizes": [model.num_vectors("query"), model.num_vectors("candidate")],
        "pixel_budget": int(getattr(processor, "pixel_budget", 0)),
    }


def describe(record: dict[str, Any]) -> str:
    """ "run R step S" of a record."""
    return f"run {record.get('run')} step {record.get('step')}"


def check_same_model(
    recorded: dict[str, Any] | None,
    current: dict[str, Any],
    *,
    what: str,
    action: str = "search it",
    allow_other_model: bool = False,
) -> None:
    """Refuse to `action` the index `what` (built by `recorded`) with the model `current`.

    Raises OtherModelError naming both models and what differs, unless `allow_other_model`
    (then one warning line). An index without a record passes with a warning.
    """
    if not recorded:
        logger.warning(
            "%s records no model (built before indexes recorded theirs): cannot check that "
            "%s is the model that built it",
            what,
            describe(current),
        )
        return
    keys = ("params_sha256", "processor_sha256", "trained_sizes")
    differing = [k for k in keys if recorded.get(k) != current.get(k)]
    if not differing:
        return
    named = {"params_sha256": "parameters", "processor_sha256": "processor settings"}
    message = (
        f"{what} was built by {describe(recorded)}, not by {describe(current)} (they differ "
        f"in: {', '.join(named.get(k, k) for k in differing)}): its vectors mean nothing to "
        "this model"
    )
    if allow_other_model:
        logger.warning("%s; going on as asked (--allow-other-model)", message)
        return
    raise OtherModelError(
        f"{message}. Use the run and step that built it, rebuild the index, or pass "
        f"--allow-other-model (allow_other_model=True) to {action} anyway"
    )
