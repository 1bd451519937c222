"""metaembed export --format peft and load_reference(base, adapter): a tiny LoRA run
trained from a transformers checkpoint, exported as a PEFT adapter directory (keys and shapes as
PEFT writes them, on transformers' in-memory module names), imported back onto the same base,
gives the trained model's embeddings."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

from metaembed_jax import load_reference, load_trained
from metaembed_jax.cli.main import main
from metaembed_jax.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_KEY, AdapterError
from metaembed_jax.metaembed import MetaEmbed
from metaembed_jax.training import loop
from tests.helpers import RandomBatches
from tests.trained_run import tiny_lora_config

TEXTS = ["a red cube left of a blue sphere", "two green cones"]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(base checkpoint dir, run dir, adapter dir, transformers base model): 2 LoRA steps from a
    saved tiny transformers Qwen2.5-VL, exported with --format peft."""
    root = tmp_path_factory.mktemp("peft_run")
    config = tiny_lora_config(root / "data")
    torch.manual_seed(0)
    hf_model = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.AutoConfig.for_model(**config.model.hf_config.to_dict())
    ).eval()
    hf_model.save_pretrained(root / "base")
    shutil.copytree(root / "data" / "tokenizer", root / "base", dirs_exist_ok=True)
    config.init_from = str(root / "base")
    loop.train(config, root / "run", train_iterator=RandomBatches(0))
    out = root / "adapter"
    assert main(["export", "--run", str(root / "run"), "--out", str(out), "--format", "peft"]) == 0
    return root / "base", root / "run", out, hf_model


def test_adapter_layout_is_peft_s(exported):
    base, run, out, hf_model = exported
    model, _ = load_trained(run)
    settings = json.loads((out / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    rank = settings["r"]
    assert (settings["peft_type"], settings["modules_to_save"]) == ("LORA", ["prompt_embed_tokens"])
    assert (rank, settings["lora_alpha"], settings["base_model_name_or_path"]) == (
        4,
        8.0,
        str(base),
    )

    # PEFT adapts the modules whose in-memory name full-matches target_modules: exactly ours,
    # every adapted layer of the language model and the vision tower's MLPs (the default
    # targets name gate / up / down_proj, which Qwen2.5-VL's vision blocks have too).
    names = {
        name for name, module in hf_model.named_modules() if isinstance(module, torch.nn.Linear)
    }
    targeted = {name for name in names if re.fullmatch(settings["target_modules"], name)}
    expected = {
        f"model.language_model.layers.{i}.{block}.{name}"
        for i in range(hf_model.config.text_config.num_hidden_layers)
        for block, names_ in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for name in names_
    } | {
        f"model.visual.blocks.{i}.mlp.{name}_proj"
        for i in range(hf_model.config.vision_config.depth)
        for name in ("gate", "up", "down")
    }
    assert targeted == expected
    assert set(tensors) == {META_KEY} | {
        f"{PREFIX}{m}.lora_{ab}.weight" for m in expected for ab in "AB"
    }
    for module in expected:
        out_features, in_features = hf_model.get_submodule(module).weight.shape
        assert tuple(tensors[f"{PREFIX}{module}.lora_A.weight"].shape) == (rank, in_features)
        assert tuple(tensors[f"{PREFIX}{module}.lora_B.weight"].shape) == (out_features, rank)
    # Values: layer 1's q_proj is our stacked [L, in, r] / [r, out] transposed.
    q_proj = model.backbone.layers.self_attn.q_proj
    np.testing.assert_array_equal(
        tensors[f"{PREFIX}model.language_model.layers.1.self_attn.q_proj.lora_A.weight"].numpy(),
        np.asarray(q_proj.lora_a[...])[1].T,
    )
    np.testing.assert_array_equal(
        tensors[f"{PREFIX}model.language_model.layers.1.self_attn.q_proj.lora_B.weight"].numpy(),
        np.asarray(q_proj.lora_b[...])[1].T,
    )
    np.testing.assert_array_equal(tensors[META_KEY].numpy(), np.asarray(model.meta_tokens[...]))


def test_import_gives_the_trained_embeddings(exported):
    base, run, out, _ = exported
    trained, processor = load_trained(run)
    imported = load_reference(base, out, rngs=nnx.Rngs(7))
    assert (imported.num_query_tokens, imported.num_candidate_tokens) == (4, 8)
    features = processor(TEXTS, [None, None], side="query")
    for side in ("query", "candidate"):
        np.testing.assert_allclose(
            np.asarray(imported.embed(side, **features)),
            np.asarray(trained.embed(side, **features)),
            atol=1e-5,
        )
    # The adapter matters: the bare base with the same meta table embeds differently.
    bare = MetaEmbed.from_pretrained(base, 4, 8, rngs=nnx.Rngs(7))
    bare.meta_tokens[...] = imported.meta_tokens[...]
    assert not np.allclose(
        np.asarray(bare.embed("query", **features)),
        np.asarray(imported.embed("query", **features)),
        atol=1e-5,
    )


def test_import_refuses_an_adapter_that_does_not_fit(exported, tmp_path):
    base, _, out, _ = exported
    with pytest.raises(AdapterError, match="R_q=4 \\+ R_c=64 != the adapter's 12"):
        load_reference(base, out, 4, 64)

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tensors = load_file(str(broken / ADAPTER_WEIGHTS))
    dropped = f"{PREFIX}model.language_model.layers.1.mlp.up_proj.lora_A.weight"
    del tensors[dropped]
    tensors[dropped.replace("layers.1", "layers.5")] = torch.zeros(4, 32)
    save_file(tensors, str(broken / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(AdapterError) as error:
        load_reference(base, broken)
    assert "LoRA layer model.language_model.layers.1.mlp.up_proj: the adapter has no" in str(
        error.value
    )
    assert "layers.5.mlp.up_proj: the model has no such LoRA layer" in str(error.value)


def test_peft_loads_the_adapter_onto_transformers_and_gives_our_embeddings(exported):
    """transformers' base + `PeftModel.from_pretrained(model, adapter)`, the meta rows given the
    reference way (a `prompt_embed_tokens` table saved through modules_to_save, its rows as
    extra embedding rows at the last R_q + R_c positions), gives our embeddings."""
    peft = pytest.importorskip("peft")
    base, run, out, _ = exported
    trained, processor = load_trained(run)
    count = trained.num_query_tokens + trained.num_candidate_tokens
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    hf.prompt_embed_tokens = torch.nn.Embedding(count, hf.config.text_config.hidden_size)
    wrapped = peft.PeftModel.from_pretrained(hf, out).eval()
    inner = wrapped.base_model.model
    adapted = [name for name, m in inner.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(adapted) == 7 * hf.config.text_config.num_hidden_layers + 3 * (
        hf.config.vision_config.depth
    )

    features = processor(TEXTS, [None, None], side="query")
    with torch.no_grad():
        table = inner.prompt_embed_tokens(torch.arange(count))
        # Both reached PEFT's modules (not left at their fresh initialisation):
        np.testing.assert_array_equal(table.numpy(), np.asarray(trained.meta_tokens[...]))
        q_proj = inner.model.language_model.layers[1].self_attn.q_proj
        np.testing.assert_array_equal(
            q_proj.lora_B["default"].weight.numpy(),
            np.asarray(trained.backbone.layers.self_attn.q_proj.lora_b[...])[1].T,
        )
        vocab = inner.get_input_embeddings().weight.shape[0]
        inner.resize_token_embeddings(vocab + count)
        inner.get_input_embeddings().weight[vocab:] = table
        batch = len(TEXTS)
        ids = torch.cat(
            [
                torch.as_tensor(features["input_ids"]),
                torch.arange(vocab, vocab + count).repeat(batch, 1),
            ],
            1,
        )
        mask = torch.cat(
            [
                torch.as_tensor(features["attention_mask"]),
                torch.ones(batch, count, dtype=torch.long),
            ],
            1,
        )
        states = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -count:]
    states = states.numpy() / np.linalg.norm(states.numpy(), axis=-1, keepdims=True)
    r_q = trained.num_query_tokens
    np.testing.assert_allclose(
        np.asarray(trained.embed("query", **features)), states[:, :r_q], atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(trained.embed("candidate", **features)), states[:, r_q:], atol=1e-4
    )
