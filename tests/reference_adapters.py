"""Reference-style MetaEmbed adapters, rebuilt with peft and transformers only (the reference
code is CC-BY-NC and is not copied): what the reference PyTorch MetaEmbed saves after training,
and the forward it embeds with.

The reference (`LastQwen2_5` over `Qwen2_5_VLForConditionalGeneration`) keeps the meta tokens in
an embedding table `prompt_embed_tokens [R_q + R_c, H]`, appends R_q + R_c placeholder ids (1)
and ones in the attention mask after every left-padded input, replaces the embeddings of those
last positions by the table's rows, lets transformers compute the positions over the extended
ids (`get_rope_index`), reads `hidden[:, -(R_q + R_c):-R_c]` (query) or `hidden[:, -R_c:]`
(candidate), applies `custom_text_proj` when it has one, and divides by the norm.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from ml_collections import ConfigDict
from safetensors.torch import load_file, save_file

from metaembed_jax.data.config import get_data_config
from metaembed_jax.models import qwen2_vl
from tests.helpers import build_test_tokenizer

# The reference README's LoraConfig (its regex also matches the vision tower's MLP).
REFERENCE_REGEX = r"(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$)"
REFERENCE_LORA = dict(
    r=32,
    lora_alpha=32,
    lora_dropout=0.1,
    target_modules=REFERENCE_REGEX,
    modules_to_save=["prompt_embed_tokens", "custom_text_proj"],
)
PLACEHOLDER_ID = 1  # the id the reference appends for every meta position


def tiny_qwen_base(root: Path, *, colqwen_dim: int | None = None, seed: int = 0) -> Path:
    """A saved tiny random Qwen2.5-VL (with the built-in test tokenizer) under `root/base`; with
    `colqwen_dim`, ColQwen2.5-style: `architectures: ColQwen2_5` and extra
    `custom_text_proj.{weight,bias}` tensors, as vidore/colqwen2.5-base is published."""
    tokenizer = build_test_tokenizer(root / "tokenizer", 320)
    config = transformers.AutoConfig.for_model(**qwen2_vl.tiny_config(vocab_size=len(tokenizer)))
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    base = root / ("colqwen_base" if colqwen_dim else "base")
    model.save_pretrained(base)
    shutil.copytree(root / "tokenizer", base, dirs_exist_ok=True)
    if colqwen_dim:
        tensors = load_file(str(base / "model.safetensors"))
        hidden = config.text_config.hidden_size
        generator = torch.Generator().manual_seed(seed + 1)
        tensors["custom_text_proj.weight"] = torch.randn(colqwen_dim, hidden, generator=generator)
        tensors["custom_text_proj.bias"] = torch.randn(colqwen_dim, generator=generator)
        save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
        settings = json.loads((base / "config.json").read_text())
        settings["architectures"] = ["ColQwen2_5"]
        (base / "config.json").write_text(json.dumps(settings, indent=2))
    return base


def reference_adapter(
    base: Path,
    out: Path,
    num_meta: int,
    *,
    projection_dim: int | None = None,
    seed: int = 0,
    **lora_overrides,
):
    """Train-like reference adapter on `base` saved to `out`: the reference's LoraConfig
    (overrides allowed), random non-zero LoRA A / B, meta table and projection. Returns the
    PeftModel (eval mode) whose forward is the reference (`reference_embed`)."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        base, dtype=torch.float32
    )
    hidden = model.config.text_config.hidden_size
    model.prompt_embed_tokens = torch.nn.Embedding(num_meta, hidden)
    if projection_dim:
        model.custom_text_proj = torch.nn.Linear(hidden, projection_dim)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**{**REFERENCE_LORA, **lora_overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    wrapped.save_pretrained(out)
    return wrapped.eval()


def reference_embed(wrapped, features: dict, r_q: int, r_c: int, side: str) -> np.ndarray:
    """The reference forward on our processor's features (HF's packed image layout)."""
    inner = wrapped.base_model.model
    count = r_q + r_c
    ids = torch.as_tensor(np.asarray(features["input_ids"]), dtype=torch.long)
    batch = ids.shape[0]
    ids = torch.cat([ids, torch.full((batch, count), PLACEHOLDER_ID)], 1)
    mask = torch.as_tensor(np.asarray(features["attention_mask"]), dtype=torch.long)
    mask = torch.cat([mask, torch.ones(batch, count, dtype=torch.long)], 1)
    kwargs = hf_image_inputs(features, ids, inner.config.image_token_id)
    embedding = inner.get_input_embeddings()
    plain = embedding.forward
    with torch.no_grad():
        table = inner.prompt_embed_tokens(torch.arange(count))
        embedding.forward = lambda x: torch.cat(
            [plain(x)[:, :-count], table.expand(x.shape[0], -1, -1)], 1
        )
        try:
            hidden = inner.model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
        finally:
            del embedding.forward
        meta = hidden[:, -count:]
        vectors = meta[:, :r_q] if side == "query" else meta[:, r_q:]
        if hasattr(inner, "custom_text_proj"):
            vectors = inner.custom_text_proj(vectors)
        vectors = vectors / vectors.norm(dim=-1, keepdim=True)
    return vectors.numpy()


def hf_image_inputs(features: dict, ids: torch.Tensor, image_token_id: int) -> dict:
    """transformers 5's image inputs from our packed features: real grid rows only, their
    patches only, and `mm_token_type_ids` (1 at `<|image_pad|>`) for the 3-D positions."""
    grid = np.asarray(features.get("image_grid_thw", np.zeros((0, 3))), np.int64).reshape(-1, 3)
    grid = grid[grid.prod(-1) > 0]
    if not len(grid):
        return {}
    patches = int(grid.prod(-1).sum())
    return {
        "pixel_values": torch.as_tensor(np.asarray(features["pixel_values"])[:patches]),
        "image_grid_thw": torch.as_tensor(grid),
        "mm_token_type_ids": (ids == image_token_id).long(),
    }


def packed_processor(base: Path):
    """Our Qwen2.5-VL processor on `base`'s tokenizer, in HF's packed image layout, small
    images (2 x 2 merged tokens)."""
    data = get_data_config()
    data.image_layout = "packed"
    data.min_pixels = data.max_pixels = 56 * 56
    data.length_buckets = (64, 128)
    data.patch_buckets = ()
    return qwen2_vl.FAMILY.make_processor(ConfigDict(data), str(base))
