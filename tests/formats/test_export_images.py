"""`metaembed export --format hf` read back in PyTorch with `formats/torch_embed.py`: for every
family (Qwen2.5-VL, PaliGemma, Llama-3.2-Vision) a tiny LoRA MetaEmbed whose zero-initialised
weights (LoRA B, biases, Mllama's cross-attention gates) are made random, exported, then embedded
by transformers through the helper with inputs from `load_exported_processor` (the way
docs/use.md tells a user): text, image, image + text and mixed rows, queries and candidates,
equal to `MetaEmbed.embed`. Also: dropping `mm_token_type_ids` changes Qwen image embeddings
(the check is sensitive to it), both image layouts convert, and `metaembed export` without torch
fails with one line naming the install command."""

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flax import nnx
from ml_collections import ConfigDict
from PIL import Image

from metaembed_jax import MetaEmbed
from metaembed_jax.data.tokenizer import train_tokenizer
from metaembed_jax.formats import files, torch_embed
from metaembed_jax.formats.files import METAEMBED_CONFIG
from metaembed_jax.formats.hf import export_hf, load_exported_processor
from metaembed_jax.formats.torch_embed import ExportedMetaEmbed
from metaembed_jax.models import mllama, paligemma
from metaembed_jax.models.family import family_for
from metaembed_jax.models.qwen2_vl.modeling import append_text_positions
from metaembed_jax.training.model import base_hf_config, build_model
from tests.helpers import TEST_CORPUS, tiny_run_config

TOLERANCE = 1e-4  # float32, both sides
R_Q, R_C = 3, 5


def family_run_config(name: str, data_dir) -> ConfigDict:
    """A tiny LoRA run config of family `name` (vocabulary: the tokenizer's)."""
    config = tiny_run_config(r_q=R_Q, r_c=R_C, vocab_size=0)
    config.lora.enabled = True
    config.data.dir = str(data_dir)
    config.data.length_buckets = (32, 64)
    config.data.max_images = 2
    if name == "qwen2_vl":
        config.data.min_pixels, config.data.max_pixels = 28 * 28, 56 * 56
    elif name == "paligemma":
        config.model.hf_config = ConfigDict(paligemma.tiny_config(0))
        config.data.max_pixels = 28 * 28  # PaliGemma's square image side: 28 px, 4 tokens
        config.model.projection_dim = 16  # the projection path, on one family
    else:
        config.model.hf_config = ConfigDict(mllama.tiny_config(0))
        config.data.mllama_tile_size, config.data.mllama_max_tiles = 28, 4
    return config


def randomise_zero_parameters(model, seed: int = 0) -> None:
    """Every all-zero parameter (LoRA B, biases, cross-attention gates) set to N(0, 0.2), so
    that every path (adapters, gated cross-attention) changes the embeddings."""
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(variable[...])
        if value.size and not value.any():
            variable[...] = (0.2 * rng.standard_normal(value.shape)).astype(value.dtype)


@dataclasses.dataclass
class Exported:
    name: str
    model: Any  # our MetaEmbed
    run_processor: Any  # the run's processor (family.make_processor(config.data))
    processor: Any  # load_exported_processor(export directory): what the docs use
    torch_model: ExportedMetaEmbed
    directory: Path
    both_sides: Any  # jitted features -> (MetaEmbed.embed("query"), MetaEmbed.embed("candidate"))


@pytest.fixture(scope="module", params=["qwen2_vl", "paligemma", "mllama"])
def exported(request, tmp_path_factory) -> Exported:
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    config = family_run_config(request.param, root / "data")
    family = family_for(request.param)
    tokenizer = train_tokenizer(
        TEST_CORPUS * 4, root / "data" / "tokenizer", family.special_tokens, vocab_size=300
    )
    model = build_model(config, vocab_size=len(tokenizer))
    randomise_zero_parameters(model)
    run_processor = family.make_processor(config.data)
    out = export_hf(
        model,
        run_processor,
        base_hf_config(config, len(tokenizer)),
        root / "exported",
        data_config=config.data,
    )
    # One compiled program per feature shape for both readouts (eager dispatch is slower here).
    both_sides = nnx.jit(lambda m, f: (m.embed("query", **f), m.embed("candidate", **f)))
    return Exported(
        request.param,
        model,
        run_processor,
        load_exported_processor(out),
        ExportedMetaEmbed.from_pretrained(out),
        out,
        both_sides,
    )


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


ONE, TWO, THREE = images([(56, 56), (40, 70), (30, 50)])
# (texts, images, the kind of each row)
BATCHES = {
    "text": (
        ["a red circle", "the quick brown fox jumps over the lazy dog"],
        None,
        ("text", "text"),
    ),
    "mixed": (
        ["", "a small blue square", "a red circle in the center"],
        [[ONE], [THREE, TWO], []],
        ("image", "image_text (2 images)", "text beside images"),
    ),
}


def max_difference(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs.numpy()).max())


def reference(exported: Exported, side: str, features) -> np.ndarray:
    query, candidate = exported.both_sides(exported.model, features)
    return np.asarray(query if side == "query" else candidate)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("side", ["query", "candidate"])
def test_helper_embeds_as_metaembed(exported, batch, side):
    """ExportedMetaEmbed.embed == MetaEmbed.embed on the exported processor's features, row by
    row (<= 1e-4): image queries / candidates, image + text rows, text rows beside images."""
    texts, row_images, kinds = BATCHES[batch]
    features = exported.processor(texts, row_images, side=side)
    ours = reference(exported, side, features)
    theirs = exported.torch_model.embed(side, **features)
    vectors = R_Q if side == "query" else R_C
    assert tuple(theirs.shape) == ours.shape == (len(texts), vectors, exported.model.embedding_dim)
    differences = {kind: max_difference(ours[row], theirs[row]) for row, kind in enumerate(kinds)}
    assert max(differences.values()) <= TOLERANCE, differences


def test_projection_is_exported_and_applied(exported):
    """PaliGemma's run has a 16-wide projection: the helper's vectors are 16 wide too."""
    has_projection = exported.name == "paligemma"
    assert (exported.torch_model.projection is not None) == has_projection
    features = exported.processor(["a red circle"], None, side="query")
    width = 16 if has_projection else exported.model.backbone.hidden_size
    assert exported.torch_model.embed("query", **features).shape[-1] == width


def test_exported_processor_is_the_runs(exported):
    """The export holds the tokenizer, `preprocessor_config.json` and the data settings: the
    processor rebuilt from it gives the run's processor's features, key by key."""
    assert (exported.directory / "preprocessor_config.json").is_file()
    texts, row_images, _ = BATCHES["mixed"]
    for side in ("query", "candidate"):
        want = exported.run_processor(texts, row_images, side=side)
        got = exported.processor(texts, row_images, side=side)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("exported", ["qwen2_vl", "paligemma"], indirect=True)
def test_packed_layout_converts_as_per_example(exported):
    """Our packed image layout (padding patch / image rows after the real ones) gives the
    per-example layout's embeddings (Mllama has transformers' one layout only)."""
    packed = copy.copy(exported.processor)
    packed.image_layout = "packed"
    if exported.name == "qwen2_vl":
        packed.max_images, packed.patch_buckets = 4, (96,)
    texts, row_images, _ = BATCHES["mixed"]
    features = packed(texts, row_images, side="candidate")
    assert np.ndim(features["pixel_values"]) == (2 if exported.name == "qwen2_vl" else 4)
    want = reference(exported, "candidate", exported.processor(texts, row_images, side="candidate"))
    assert max_difference(want, exported.torch_model.embed("candidate", **features)) <= TOLERANCE


@pytest.mark.parametrize("exported", ["qwen2_vl"], indirect=True)
def test_dropping_mm_token_type_ids_changes_qwen_image_embeddings(exported):
    """Without `mm_token_type_ids` transformers 5 gives image rows 1-D positions: the embeddings
    move far past the tolerance, so the checks above do see it."""
    texts, row_images, _ = BATCHES["mixed"]
    features = exported.processor(texts, row_images, side="candidate")
    inputs = exported.torch_model.transformers_inputs(features)
    del inputs["mm_token_type_ids"]
    states = exported.torch_model.meta_states(inputs)[:, R_Q:]
    states = states / states.norm(dim=-1, keepdim=True)
    assert max_difference(reference(exported, "candidate", features), states) > 10 * TOLERANCE


@pytest.mark.parametrize("exported", ["qwen2_vl"], indirect=True)
def test_transformers_numbers_the_meta_ids_as_append_text_positions(exported):
    """transformers' `get_rope_index` over the extended ids (meta ids typed 0) gives, at every
    attended position, our M-RoPE positions: the content's and `append_text_positions`."""
    texts, row_images, _ = BATCHES["mixed"]
    features = exported.processor(texts, row_images, side="query")
    count = R_Q + R_C
    inputs = exported.torch_model.transformers_inputs(features)
    extended = torch_embed.append_meta_ids(inputs, exported.torch_model.first_meta_id, count)
    theirs, _ = exported.torch_model.model.model.get_rope_index(
        extended["input_ids"],
        extended["mm_token_type_ids"],
        image_grid_thw=extended["image_grid_thw"],
        attention_mask=extended["attention_mask"],
    )
    backbone = exported.model.backbone
    content = backbone.position_ids(
        features["input_ids"], features["attention_mask"], features["image_grid_thw"]
    )
    ours = np.concatenate([content, append_text_positions(content, count)], axis=-1)
    attended = extended["attention_mask"].numpy().astype(bool)
    np.testing.assert_array_equal(theirs.numpy()[:, attended], ours[:, attended])


@pytest.mark.parametrize("exported", ["mllama"], indirect=True)
def test_last_token_readout(exported, tmp_path):
    """readout "last_token" (the single-vector baseline): the last content state, as
    `MetaEmbed.embed` reads it, on a mixed Mllama batch (no row split for it)."""
    single = MetaEmbed(exported.model.backbone, R_Q, R_C, readout="last_token", rngs=nnx.Rngs(0))
    directory = shutil.copytree(exported.directory, tmp_path / "last_token")
    settings = json.loads((directory / METAEMBED_CONFIG).read_text())
    (directory / METAEMBED_CONFIG).write_text(json.dumps({**settings, "readout": "last_token"}))
    torch_model = ExportedMetaEmbed.from_pretrained(directory)
    texts, row_images, _ = BATCHES["mixed"]
    features = exported.processor(texts, row_images, side="query")
    ours = np.asarray(single.embed("query", **features))
    theirs = torch_model.embed("query", **features)
    assert tuple(theirs.shape) == ours.shape == (3, 1, exported.model.backbone.hidden_size)
    assert max_difference(ours, theirs) <= TOLERANCE


def test_maxsim_is_the_sum_of_best_dot_products():
    rng = np.random.default_rng(0)
    queries, candidates = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 6, 4))
    want = [[(q @ c.T).max(-1).sum() for c in candidates] for q in queries]
    got = torch_embed.maxsim(torch.from_numpy(queries), torch.from_numpy(candidates))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_torch_embed_is_self_contained():
    """Loaded from its file alone (as a copy in a PyTorch-only project would be), the helper
    imports neither JAX nor the rest of the package."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('torch_embed', {torch_embed.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('metaembed_jax')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # The file names it reads are the ones export writes (kept apart: export imports JAX).
    assert (torch_embed.METAEMBED_WEIGHTS, torch_embed.METAEMBED_CONFIG) == (
        files.METAEMBED_WEIGHTS,
        METAEMBED_CONFIG,
    )


def test_export_without_torch_is_one_line_naming_the_extra(tmp_path):
    """torch not importable (sys.modules['torch'] = None): exit 1, one line on stderr naming
    `pip install "metaembed-jax[export]"` and the CPU build, no traceback."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from metaembed_jax.cli.main import main\n"
        f"raise SystemExit(main(['export', '--run', {str(tmp_path / 'run')!r}, "
        f"'--out', {str(tmp_path / 'out')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert 'pip install "metaembed-jax[export]"' in lines[0]
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in lines[0]
    assert files.TORCH_INSTALL in lines[0]
