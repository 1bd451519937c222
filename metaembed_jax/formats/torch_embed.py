"""Embed with an exported MetaEmbed in PyTorch: `metaembed export --format hf` read by transformers.

    from metaembed_jax.formats.hf import load_exported_processor
    from metaembed_jax.formats.torch_embed import ExportedMetaEmbed

    processor = load_exported_processor("exported/")   # our processor: numpy features
    model = ExportedMetaEmbed.from_pretrained("exported/")
    query = model.embed("query", **processor(["a red cube"], None, side="query"))

`ExportedMetaEmbed.embed(side, **features)` equals `MetaEmbed.embed` (the same `[B, R, D]`
L2-normalised float32 vectors) for text, image and image + text rows of every family. It runs
transformers' own model (`AutoModelForImageTextToText`) with the meta tokens appended after the
content of every left-padded row, as `MetaEmbed` and the reference do: as extra token ids past
the vocabulary whose input embeddings are the meta-token rows (`MetaRowsEmbedding`), attention
mask 1, and, per family:

- Qwen2-VL / Qwen2.5-VL: `mm_token_type_ids` 0 at the meta ids (1 at `<|image_pad|>`), so that
  transformers' `get_rope_index` numbers them as text after the content, which is what our
  `append_text_positions` gives (the largest position used so far + 1, 2, ...); without
  `mm_token_type_ids` transformers 5 falls back to plain 1-D positions for image rows and the
  embeddings differ (silently).
- PaliGemma: no `token_type_ids` (plain causal attention; positions 1 .. L + M); the meta rows
  are not scaled by sqrt(hidden) as Gemma scales looked-up token embeddings.
- Llama-3.2-Vision (Mllama): `cross_attention_mask` extended so that every meta row sees every
  tile its row's content sees; a row without an image runs without image inputs (our family's
  definition: a text row's embedding does not depend on the images batched beside it).

Inputs: the features of our own processor (`metaembed_jax.formats.hf.load_exported_processor`, or
`load_trained(run)[1]`), numpy arrays in either image layout, converted to what transformers 5
takes by one function per family (`qwen2_vl_inputs`, `paligemma_inputs`, `mllama_inputs`). Our
processor, not transformers', because it is the definition of the prompts (prefixes, image
instruction, truncation, image sizes) the model was trained with, and because transformers'
Qwen2.5-VL processor cannot be built without torchvision (its video processor).

This module imports torch, transformers and safetensors, and nothing of the JAX side: it can be
copied into a PyTorch-only project (the features then have to be built as our processor does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors.torch import load_file

# The file names `metaembed_jax.formats.export` writes (not imported from there: it imports JAX).
METAEMBED_WEIGHTS = "metaembed.safetensors"
METAEMBED_CONFIG = "metaembed_config.json"
FAMILIES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "paligemma": "paligemma",
    "mllama": "mllama",
}


def _tensor(array, dtype=None) -> torch.Tensor:
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    return tensor if dtype is None else tensor.to(dtype)


# ----------------------------------------------------------------------------- inputs


def qwen2_vl_inputs(features: Mapping[str, Any], image_token_id: int) -> dict[str, torch.Tensor]:
    """Our Qwen2-VL / Qwen2.5-VL features -> the keyword inputs of transformers 5's
    `Qwen2_5_VLModel` / `Qwen2VLModel`.

    Takes `input_ids` / `attention_mask` `[B, L]` and, for a batch with images, `pixel_values` /
    `image_grid_thw` in our packed layout (`[P, D]` with zero rows after the real patches,
    `[N, 3]` with zero rows after the real images) or per-example layout (`[B, P_ex, D]`,
    `[B, N_ex, 3]`). Returns int64 `input_ids` / `attention_mask`, int32 `mm_token_type_ids`
    (1 at `image_token_id`, the `<|image_pad|>` positions; transformers 5 builds the 3-D M-RoPE
    positions from it) and, when there are images, transformers' packed layout without
    padding: `pixel_values [sum of patches, D]` (every image of the batch, row then image
    order) and `image_grid_thw [N, 3]` int64.
    """
    input_ids = _tensor(features["input_ids"], torch.long)
    out = {
        "input_ids": input_ids,
        "attention_mask": _tensor(features["attention_mask"], torch.long),
        "mm_token_type_ids": (input_ids == image_token_id).to(torch.int32),
    }
    if features.get("pixel_values") is None or features.get("image_grid_thw") is None:
        return out
    pixels = np.asarray(features["pixel_values"], np.float32)
    grid = np.asarray(features["image_grid_thw"], np.int64)
    if grid.ndim == 2:  # packed: drop the padding rows after the real images / patches
        pixels, grid = pixels[None], grid[None]
    pieces, grids = [], []
    for example_pixels, example_grid in zip(pixels, grid, strict=True):
        real = example_grid[example_grid.prod(-1) > 0]
        pieces.append(example_pixels[: int(real.prod(-1).sum())])
        grids.append(real)
    grid = np.concatenate(grids)
    if len(grid):
        out["pixel_values"] = torch.from_numpy(np.concatenate(pieces))
        out["image_grid_thw"] = torch.from_numpy(grid)
    return out


def paligemma_inputs(
    features: Mapping[str, Any], image_token_id: int, image_seq_length: int
) -> dict[str, torch.Tensor]:
    """Our PaliGemma features -> the keyword inputs of transformers 5's `PaliGemmaModel`.

    Takes `input_ids` / `attention_mask` `[B, L]` and optional `pixel_values`, per example
    `[B, M, 3, S, S]` (row b's images, then all-zero padding images) or packed `[N, 3, S, S]`
    (the batch's images, then padding images). Returns int64 `input_ids` / `attention_mask` and,
    when a row has images, `pixel_values [N, 3, S, S]`: exactly the real images, in order (row b
    holds `count(<image>) / image_seq_length` of them), as transformers scatters one image's
    features per `image_seq_length` `<image>` tokens. No `token_type_ids`: MetaEmbed's PaliGemma
    is plain causal, as the reference runs it.
    """
    input_ids = _tensor(features["input_ids"], torch.long)
    out = {
        "input_ids": input_ids,
        "attention_mask": _tensor(features["attention_mask"], torch.long),
    }
    if features.get("pixel_values") is None:
        return out
    pixels = np.asarray(features["pixel_values"], np.float32)
    counts = ((input_ids == image_token_id).sum(-1) // image_seq_length).tolist()
    if pixels.ndim == 5:
        images = [pixels[b, :count] for b, count in enumerate(counts)]
        pixels = np.concatenate(images) if images else pixels[0, :0]
    else:
        pixels = pixels[: sum(counts)]
    if len(pixels):
        out["pixel_values"] = torch.from_numpy(np.ascontiguousarray(pixels))
    return out


def mllama_inputs(features: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our Mllama features -> the keyword inputs of transformers 5's `MllamaModel`.

    Our processor already builds transformers' layout (`pixel_values [B, images, tiles, 3, S, S]`,
    `aspect_ratio_ids [B, images]`, `aspect_ratio_mask [B, images, tiles]`, `cross_attention_mask
    [B, L, images, tiles]`, padding image slots as transformers pads them): this only makes them
    tensors (int64 ids and masks, float32 pixels), without the image arrays when no row has an
    image.
    """
    out = {
        "input_ids": _tensor(features["input_ids"], torch.long),
        "attention_mask": _tensor(features["attention_mask"], torch.long),
    }
    cross = features.get("cross_attention_mask")
    if features.get("pixel_values") is None or cross is None or not np.asarray(cross).any():
        return out
    out["pixel_values"] = _tensor(features["pixel_values"], torch.float32)
    for key in ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        out[key] = _tensor(features[key], torch.long)
    return out


# ----------------------------------------------------------------------------- meta tokens


class MetaRowsEmbedding(torch.nn.Module):
    """The model's input embedding with `M` extra ids `first_id .. first_id + M - 1` whose
    embeddings are the meta-token rows, as they are (not passed through the base embedding, so
    Gemma's sqrt(hidden) scaling of looked-up tokens does not touch them)."""

    def __init__(self, base: torch.nn.Module, meta_tokens: torch.Tensor, first_id: int):
        super().__init__()
        self.base = base
        self.meta_tokens = torch.nn.Parameter(meta_tokens, requires_grad=False)
        self.first_id = first_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_meta = input_ids >= self.first_id
        embeds = self.base(torch.where(is_meta, 0, input_ids))
        meta = self.meta_tokens[(input_ids - self.first_id).clamp(0, len(self.meta_tokens) - 1)]
        return torch.where(is_meta[..., None], meta.to(embeds.dtype), embeds)


def append_meta_ids(inputs: Mapping[str, torch.Tensor], first_id: int, count: int):
    """`inputs` (one of the `*_inputs` functions' results) with the ids `first_id ..
    first_id + count - 1` appended to every row, attention mask 1, `mm_token_type_ids` 0 (text),
    and, for Mllama, `cross_attention_mask` rows equal to the union of the tiles the row's
    content sees (every real tile of every image of the row)."""
    batch = inputs["input_ids"].shape[0]
    ids = torch.arange(first_id, first_id + count, dtype=torch.long).expand(batch, count)
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], ids], dim=1)
    out["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones(batch, count, dtype=torch.long)], dim=1
    )
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, types.new_zeros(batch, count)], dim=1)
    if "cross_attention_mask" in inputs:
        cross = inputs["cross_attention_mask"]
        tiles = cross.amax(dim=1, keepdim=True).expand(-1, count, -1, -1)
        out["cross_attention_mask"] = torch.cat([cross, tiles], dim=1)
    return out


# ----------------------------------------------------------------------------- the model


class ExportedMetaEmbed:
    """An exported MetaEmbed (`metaembed export --format hf`) in PyTorch.

    Attributes: `model` (transformers' model, eval mode), `family` ("qwen2_vl", "paligemma" or
    "mllama"), `num_query_tokens` / `num_candidate_tokens` (R_q, R_c), `readout`, `settings`
    (the `metaembed_config.json` dict), `first_meta_id` (the id of the first meta token).
    """

    def __init__(self, model, meta_tokens: torch.Tensor, settings: Mapping[str, Any], projection):
        config = model.config
        if config.model_type not in FAMILIES:
            raise ValueError(
                f"model_type {config.model_type!r} is not an exported MetaEmbed family; "
                f"expected one of {sorted(FAMILIES)}"
            )
        self.model = model.eval()
        self.family = FAMILIES[config.model_type]
        self.settings = dict(settings)
        self.num_query_tokens = int(settings["num_query_tokens"])
        self.num_candidate_tokens = int(settings["num_candidate_tokens"])
        self.readout = settings.get("readout", "meta")
        self.projection = projection  # (weight [D, H], bias [D]) or None
        embedding = model.get_input_embeddings()
        rows = embedding.weight.shape[0]
        # Past the table and past an out-of-vocabulary image token id (PaliGemma maps it to 0).
        self.first_meta_id = max(rows, self.image_token_id + 1)
        model.set_input_embeddings(MetaRowsEmbedding(embedding, meta_tokens, self.first_meta_id))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype=torch.float32):
        """Loads `directory` (written by `metaembed export --format hf`): the transformers model
        (`AutoModelForImageTextToText`, in `dtype`), `metaembed.safetensors` and
        `metaembed_config.json`. Raises FileNotFoundError naming a missing file."""
        directory = Path(directory)
        for name in ("config.json", METAEMBED_WEIGHTS, METAEMBED_CONFIG):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found: {directory} is not a directory written by "
                    "`metaembed export --format hf`"
                )
        model = transformers.AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype)
        own = load_file(str(directory / METAEMBED_WEIGHTS))
        settings = json.loads((directory / METAEMBED_CONFIG).read_text())
        projection = None
        if "projection.weight" in own:
            projection = (own["projection.weight"].float(), own["projection.bias"].float())
        return cls(model, own["meta_tokens"].to(dtype), settings, projection)

    @property
    def image_token_id(self) -> int:
        config = self.model.config
        token = getattr(config, "image_token_id", None)
        return int(token if token is not None else config.image_token_index)

    def transformers_inputs(self, features: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Our processor's `features` in transformers' layout (the family's `*_inputs`)."""
        if self.family == "qwen2_vl":
            return qwen2_vl_inputs(features, self.image_token_id)
        if self.family == "paligemma":
            vision = self.model.config.vision_config
            seq_length = (vision.image_size // vision.patch_size) ** 2
            return paligemma_inputs(features, self.image_token_id, seq_length)
        return mllama_inputs(features)

    @torch.no_grad()
    def meta_states(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states `[B, R_q + R_c, H]` of the meta tokens appended to `inputs`
        (transformers' layout); Mllama rows without an image run alone without image inputs."""
        count = self.num_query_tokens + self.num_candidate_tokens
        if self.family == "mllama" and "cross_attention_mask" in inputs:
            has_image = inputs["cross_attention_mask"].flatten(1).any(-1)
            if not has_image.all():
                return self._mllama_split(inputs, has_image)
        extended = append_meta_ids(inputs, self.first_meta_id, count)
        return self.model.model(**extended).last_hidden_state[:, -count:]

    def _mllama_split(self, inputs, has_image: torch.Tensor) -> torch.Tensor:
        text_keys = ("input_ids", "attention_mask")
        rows = {True: has_image.nonzero()[:, 0], False: (~has_image).nonzero()[:, 0]}
        out = None
        for with_image, index in rows.items():
            if len(index) == 0:
                continue
            keys = inputs if with_image else text_keys
            states = self.meta_states({k: inputs[k][index] for k in keys})
            if out is None:
                out = states.new_zeros(len(has_image), *states.shape[1:])
            out[index] = states
        return out

    @torch.no_grad()
    def embed(self, side: str, **features: Any) -> torch.Tensor:
        """Multi-vector embeddings of one side's features (our processor's output, numpy or
        torch): `[B, R_q, D]` for "query", `[B, R_c, D]` for "candidate" (`[B, 1, D]` with
        readout "last_token"), L2-normalised float32, as `MetaEmbed.embed`.

        Raises ValueError for another side."""
        if side not in ("query", "candidate"):
            raise ValueError(f"side={side!r}; expected 'query' or 'candidate'")
        inputs = self.transformers_inputs(features)
        if self.readout == "last_token":
            hidden = self.model.model(**inputs).last_hidden_state[:, -1:]
        else:
            states = self.meta_states(inputs)
            r_q = self.num_query_tokens
            hidden = states[:, :r_q] if side == "query" else states[:, r_q:]
        hidden = hidden.float()
        if self.projection is not None:
            weight, bias = self.projection
            hidden = hidden @ weight.T + bias
        return hidden / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def maxsim(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """MaxSim scores `[Q, C]` of query vectors `[Q, r_q, D]` and candidate vectors `[C, r_c, D]`:
    the sum over query vectors of their best dot product with a candidate's vectors. Take the
    first r_q / r_c vectors of each side for a smaller budget (Matryoshka prefixes)."""
    similarity = torch.einsum("qid,cjd->qcij", queries.float(), candidates.float())
    return similarity.amax(dim=-1).sum(dim=-1)
