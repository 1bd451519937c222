"""Models trained with the reference PyTorch MetaEmbed load and embed equally.

Adapters are rebuilt the way the reference saves a trained model (`tests/reference_adapters.py`:
peft + transformers only): a tiny Qwen2.5-VL, `get_peft_model` with the reference's LoraConfig
(r 32, alpha 32, dropout 0.1, its regex, which also adapts the vision tower's MLP,
`modules_to_save = [prompt_embed_tokens, custom_text_proj]`), random non-zero weights. The
reference forward on the same inputs is the reference: `load_reference` must give its
embeddings on text, image and image + text rows, with and without the projection, on a plain and
a ColQwen2.5-style base; which modules LoRA adapts must equal PEFT's choice in every family.
"""

import json
import logging

import numpy as np
import peft
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors.torch import load_file, save_file

from metaembed_jax import MetaEmbed, load_reference, load_trained
from metaembed_jax.cli.main import main
from metaembed_jax.formats.peft import ADAPTER_WEIGHTS, META_KEY, AdapterError, export_peft
from metaembed_jax.models import from_config, layers
from metaembed_jax.models.family import family_for
from metaembed_jax.models.lora import adapted_module_names
from metaembed_jax.models.rules import CheckpointMismatchError, read_config
from metaembed_jax.training.loop import check_full_stacks
from tests.reference_adapters import (
    REFERENCE_REGEX,
    packed_processor,
    reference_adapter,
    reference_embed,
    tiny_qwen_base,
)

R_Q, R_C = 4, 8
TOLERANCE = 1e-4


def _image(seed: int, size=(56, 56)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# (texts, images or None): text rows, image rows (the candidate prompt), image + text rows.
INPUTS = {
    "text": (["a red cube left of a blue sphere", "two green cones"], None),
    "image": (["", ""], [[_image(1)], [_image(2)]]),
    "image_text": (["a photo of", "make it red"], [[_image(3)], [_image(4)]]),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("reference")


@pytest.fixture(scope="module")
def base(root):
    return tiny_qwen_base(root)


@pytest.fixture(scope="module")
def colqwen_base(root):
    return tiny_qwen_base(root, colqwen_dim=16)


def _check_equal(model, wrapped, base, r_q=R_Q, r_c=R_C):
    processor = packed_processor(base)
    for kind, (texts, images) in INPUTS.items():
        for side in ("query", "candidate"):
            features = processor(texts, images, side=side)
            ours = np.asarray(model.embed(side, **features))
            reference = reference_embed(wrapped, features, r_q, r_c, side)
            assert ours.shape == reference.shape, (kind, side)
            np.testing.assert_allclose(ours, reference, atol=TOLERANCE, err_msg=f"{kind} {side}")


def test_reference_adapter_embeds_as_the_reference(base, root):
    """The reference recipe's adapter (vision-tower MLP LoRA included) on a plain base."""
    wrapped = reference_adapter(base, root / "plain", R_Q + R_C)
    model = load_reference(base, root / "plain", R_Q)
    assert (model.num_query_tokens, model.num_candidate_tokens) == (R_Q, R_C)
    assert "visual.blocks.mlp.gate_proj" in adapted_module_names(
        model.backbone, family_for(read_config(base)), read_config(base)
    )
    _check_equal(model, wrapped, base)


def test_reference_projection_is_applied(base, root):
    """An adapter carrying custom_text_proj (the reference's dim > 0) embeds at `dim`."""
    wrapped = reference_adapter(base, root / "projected", R_Q + R_C, projection_dim=16, seed=1)
    model = load_reference(base, root / "projected", R_Q)
    assert model.embedding_dim == 16
    _check_equal(model, wrapped, base)


def test_colqwen_base_loads_and_its_head_is_kept_or_reported(colqwen_base, root, caplog):
    """A ColQwen2.5-style base (architectures ColQwen2_5, custom_text_proj tensors) loads; the
    adapter's own projection is applied; without one, the base's head is applied when asked for
    and otherwise reported in one line."""
    wrapped = reference_adapter(colqwen_base, root / "colqwen", R_Q + R_C, projection_dim=16)
    _check_equal(load_reference(colqwen_base, root / "colqwen", R_Q), wrapped, colqwen_base)

    bare = reference_adapter(colqwen_base, root / "colqwen_bare", R_Q + R_C, seed=2)
    with caplog.at_level(logging.WARNING):
        unprojected = load_reference(colqwen_base, root / "colqwen_bare", R_Q)
    assert unprojected.projection is None
    assert any("custom_text_proj" in r.message and "not used" in r.message for r in caplog.records)
    _check_equal(unprojected, bare, colqwen_base)

    projected = load_reference(colqwen_base, root / "colqwen_bare", R_Q, projection_dim=16)
    head = load_file(str(colqwen_base / "model.safetensors"))
    inner = bare.base_model.model
    inner.custom_text_proj = torch.nn.Linear(*head["custom_text_proj.weight"].shape[::-1])
    with torch.no_grad():
        inner.custom_text_proj.weight.copy_(head["custom_text_proj.weight"])
        inner.custom_text_proj.bias.copy_(head["custom_text_proj.bias"])
    _check_equal(projected, bare, colqwen_base)


def test_a_projection_that_cannot_be_applied_is_an_error(base, root):
    reference_adapter(base, root / "no_projection", R_Q + R_C, seed=3)
    with pytest.raises(AdapterError, match="projection_dim=7: neither the adapter nor the base"):
        load_reference(base, root / "no_projection", R_Q, projection_dim=7)


def test_unknown_base_tensor_is_still_an_error(colqwen_base, root, tmp_path):
    import shutil

    broken = tmp_path / "broken_base"
    shutil.copytree(colqwen_base, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["retrieval_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="unexpected tensor retrieval_head.weight"):
        MetaEmbed.from_pretrained(broken, R_Q, R_C, rngs=nnx.Rngs(0))


def test_rslora_and_a_partial_layer_selection_embed_as_the_reference(base, root):
    """use_rslora scales by alpha / sqrt(r); a regex adapting layer 0 of the decoder only loads
    with zero adapters on layer 1 (and such a selection is refused for training)."""
    only_first = r"model\.language_model\.layers\.0\..*(q_proj|v_proj)"
    wrapped = reference_adapter(
        base, root / "rslora", R_Q + R_C, seed=4, use_rslora=True, target_modules=only_first
    )
    model = load_reference(base, root / "rslora", R_Q)
    assert model.backbone.layers.self_attn.q_proj.lora_layers == (0,)
    np.testing.assert_array_equal(model.backbone.layers.self_attn.q_proj.lora_b[...][1], 0.0)
    _check_equal(model, wrapped, base)
    with pytest.raises(ValueError, match="only some layers of a stacked module"):
        check_full_stacks(model)


def test_inference_mode_gives_identical_vectors(base, root):
    """The adapter's LoRA dropout (0.1) is off after loading; model.train() turns it on."""
    reference_adapter(base, root / "dropout", R_Q + R_C, seed=5)
    model = load_reference(base, root / "dropout", R_Q)
    features = packed_processor(base)(*INPUTS["image_text"], side="query")
    first, second = (np.asarray(model.embed("query", **features)) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    model.train()
    assert np.abs(np.asarray(model.embed("query", **features)) - first).max() > 1e-3


def test_the_split_of_the_meta_table_is_asked_for(base, root):
    """The reference stores neither R_q nor R_c: 16 / 64 only for an 80-row table, else an
    error naming what to pass; a split that does not add up is refused."""
    reference_adapter(base, root / "paper_split", 80, seed=6)
    model = load_reference(base, root / "paper_split")
    assert (model.num_query_tokens, model.num_candidate_tokens) == (16, 64)
    reference_adapter(base, root / "twelve", R_Q + R_C, seed=7)
    with pytest.raises(AdapterError, match="pass num_query_tokens"):
        load_reference(base, root / "twelve")
    with pytest.raises(AdapterError, match="R_q=4 \\+ R_c=64 != the adapter's 12"):
        load_reference(base, root / "twelve", R_Q, 64)


def test_import_reference_makes_a_run_the_toolchain_uses(base, root, tmp_path):
    """`metaembed import-reference` writes a run directory: load_trained gives the reference's
    embeddings, and `metaembed export --format peft` writes an adapter (vision LoRA and
    projection included) that imports back to the same model."""
    wrapped = reference_adapter(base, root / "for_run", R_Q + R_C, projection_dim=16, seed=8)
    run = tmp_path / "run"
    command = ["import-reference", "--base", str(base), "--adapter", str(root / "for_run")]
    assert main([*command, "--out", str(run), "--r_q", str(R_Q)]) == 0
    trained, processor = load_trained(run)
    _check_equal(trained, wrapped, base)
    features = processor(*INPUTS["image_text"], side="candidate")
    assert "pixel_values" in features  # the run's processor reads images as the recipe says

    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(out), "--format", "peft"]) == 0
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["modules_to_save"] == ["prompt_embed_tokens", "custom_text_proj"]
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    assert any(".visual.blocks.0.mlp.gate_proj.lora_A" in key for key in tensors)
    back = load_reference(base, out)
    _check_equal(back, wrapped, base)


def _peft_adapted(hf_model, **config) -> set[str]:
    wrapped = peft.get_peft_model(hf_model, peft.LoraConfig(r=2, lora_alpha=4, **config))
    return {
        name.removeprefix("base_model.model.")
        for name, module in wrapped.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def _ours_adapted(hf_config: dict, **config) -> set[str]:
    targets = config["target_modules"]
    spec = layers.LoRASpec(
        2,
        4.0,
        targets=targets if isinstance(targets, str) else tuple(targets),
        exclude=config.get("exclude_modules") or (),
    )
    backbone = nnx.eval_shape(lambda: from_config(hf_config, lora=spec, rngs=nnx.Rngs(0)))
    names = adapted_module_names(backbone, family_for(hf_config), hf_config).values()
    return {name for per_layer in names for name in per_layer if name is not None}


def _family_models():
    import transformers

    from metaembed_jax.models import qwen2_vl
    from tests.models.test_mllama import build_hf_model as build_mllama
    from tests.models.test_paligemma import build_hf_model as build_paligemma

    qwen = qwen2_vl.tiny_config(96)
    return {
        "qwen2_5_vl": lambda: transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.AutoConfig.for_model(**qwen)
        ),
        "paligemma": lambda: build_paligemma("gemma"),
        "mllama": build_mllama,
    }


SELECTIONS = {
    "reference_regex": dict(target_modules=REFERENCE_REGEX),
    "names": dict(target_modules=["q_proj", "v_proj", "fc1", "qkv", "linear"]),
    "names_excluding_vision": dict(
        target_modules=["q_proj", "up_proj", "o_proj", "out_proj", "fc2"],
        exclude_modules=r".*(visual|vision).*",
    ),
    # The projector's linear layers: Qwen's merger MLP, PaliGemma's projector.linear (its
    # multi_modal_projector is a container PEFT refuses), Mllama's projector itself.
    "projector": {
        "qwen2_5_vl": dict(target_modules=["merger.mlp.0", "merger.mlp.2"]),
        "paligemma": dict(target_modules=["linear"]),
        "mllama": dict(target_modules=["multi_modal_projector"]),
    },
}


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
@pytest.mark.parametrize("family", ["qwen2_5_vl", "paligemma", "mllama"])
def test_adapted_modules_are_the_ones_peft_adapts(family, selection):
    """Every family, vision tower and projector included: our LoRA layers are exactly the
    modules PEFT wraps for the same target_modules / exclude_modules."""
    hf_model = _family_models()[family]()
    chosen = SELECTIONS[selection]
    chosen = chosen.get(family, chosen) if selection == "projector" else chosen
    expected = _peft_adapted(hf_model, **chosen)
    ours = _ours_adapted(hf_model.config.to_dict(), **chosen)
    assert expected, "the selection adapts something"
    assert ours == expected


def test_a_convolution_target_is_refused():
    from metaembed_jax.models import qwen2_vl

    spec = layers.LoRASpec(2, 4.0, targets=("proj",))  # also model.visual.patch_embed.proj
    with pytest.raises(ValueError, match="patch_embed.proj: its weight is loaded by"):
        from_config(qwen2_vl.tiny_config(96), lora=spec, rngs=nnx.Rngs(0))


def _randomise_adapters(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        variable[...] = rng.normal(0, 0.1, variable.shape).astype(np.float32)
    model.meta_tokens[...] = rng.normal(0, 0.1, model.meta_tokens.shape).astype(np.float32)


@pytest.mark.parametrize("family", ["paligemma", "mllama"])
def test_vision_lora_adapters_of_other_families_round_trip(family, tmp_path):
    """PaliGemma and Llama-3.2-Vision with LoRA on the text decoder, the vision tower and the
    projector: our PEFT export imports back to the same embeddings of image rows, and PEFT
    loads it onto transformers' model with those modules adapted and the same weights."""
    if family == "paligemma":
        from tests.models.test_paligemma import build_hf_model, make_batch

        hf_model = build_hf_model("gemma")
        features = make_batch()
        features.pop("token_type_ids")
    else:
        from tests.models.test_mllama import build_hf_model, make_batch

        hf_model = build_hf_model()
        features = make_batch()[0]
    base = tmp_path / "base"
    hf_model.save_pretrained(base)
    targets = ["q_proj", "v_proj", "fc1", "multi_modal_projector", "linear"]
    spec = layers.LoRASpec(2, 4.0, 0.1, tuple(targets))
    model = MetaEmbed.from_pretrained(base, R_Q, R_C, lora=spec, rngs=nnx.Rngs(0))
    _randomise_adapters(model, seed=9)
    hf_config = read_config(base)
    export_peft(model, None, hf_config, tmp_path / "adapter", spec, str(base))
    back = load_reference(base, tmp_path / "adapter", R_Q)
    for side in ("query", "candidate"):
        np.testing.assert_allclose(
            np.asarray(back.embed(side, **features)),
            np.asarray(model.embed(side, **features)),
            atol=1e-5,
        )

    hf_model.prompt_embed_tokens = torch.nn.Embedding(R_Q + R_C, model.backbone.hidden_size)
    loaded = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter")
    adapted = {
        name.removeprefix("base_model.model."): module
        for name, module in loaded.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    ours = adapted_module_names(model.backbone, family_for(hf_config), hf_config)
    assert set(adapted) == {n for names in ours.values() for n in names}
    assert any("vision" in name for name in adapted)
    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    for name, module in adapted.items():
        np.testing.assert_array_equal(
            module.lora_B["default"].weight.detach().numpy(),
            tensors[f"base_model.model.{name}.lora_B.weight"].numpy(),
        )
    np.testing.assert_array_equal(
        loaded.base_model.model.prompt_embed_tokens.modules_to_save["default"].weight.detach(),
        tensors[META_KEY],
    )
