"""metaembed export --format hf: the tiny LoRA-trained run, loaded by transformers in PyTorch with
the meta tokens given the reference way (extra embedding rows at the last R_q + R_c positions of
every left-padded input), gives our embeddings; the rule inversion gives back the loader's keys."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from metaembed_jax import load_trained
from metaembed_jax.cli.main import main
from metaembed_jax.formats.files import METAEMBED_CONFIG, METAEMBED_WEIGHTS
from metaembed_jax.models.rules import checkpoint_key
from tests.trained_run import trained_lora_run

TEXTS = ["a red cube left of a blue sphere", "two green cones"]


def test_checkpoint_key_inverts_a_rule_pattern():
    pattern = r"model\.layers\.(?P<layer>\d+)\.self_attn\.(?P<p>q|k|v)_proj\.weight"
    assert (
        checkpoint_key(pattern, {"layer": 3, "p": "k"}) == "model.layers.3.self_attn.k_proj.weight"
    )
    with pytest.raises(ValueError, match="do not fit"):
        checkpoint_key(pattern, {"layer": 3, "p": "o"})
    with pytest.raises(ValueError, match="cannot be inverted"):
        checkpoint_key(r"model\.(a|b)\.weight", {})


def _reference_states(out, input_ids, attention_mask, count):
    """transformers' last hidden states at the appended meta positions (the reference way)."""
    hf = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    hf.eval()
    meta = load_file(str(out / METAEMBED_WEIGHTS))["meta_tokens"]
    vocab = hf.get_input_embeddings().weight.shape[0]
    hf.resize_token_embeddings(vocab + count)
    with torch.no_grad():
        hf.get_input_embeddings().weight[vocab:] = meta
        batch = input_ids.shape[0]
        ids = torch.cat(
            [torch.as_tensor(input_ids), torch.arange(vocab, vocab + count).repeat(batch, 1)], 1
        )
        mask = torch.cat(
            [torch.as_tensor(attention_mask), torch.ones(batch, count, dtype=torch.long)], 1
        )
        states = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -count:]
    return states.numpy()


def test_hf_export_loaded_by_transformers_gives_our_embeddings(tmp_path_factory, tmp_path):
    run = trained_lora_run(tmp_path_factory)
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(out), "--format", "hf"]) == 0
    model, processor = load_trained(run)
    settings = json.loads((out / METAEMBED_CONFIG).read_text())
    r_q, r_c = settings["num_query_tokens"], settings["num_candidate_tokens"]
    assert (r_q, r_c) == (4, 8)

    features = processor(TEXTS, [None, None], side="query")
    states = _reference_states(out, features["input_ids"], features["attention_mask"], r_q + r_c)
    states /= np.linalg.norm(states, axis=-1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(model.embed("query", **features)), states[:, :r_q], atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(model.embed("candidate", **features)), states[:, r_q:], atol=1e-4
    )


def test_lora_merge_changes_the_adapted_kernels(tmp_path_factory):
    """The exported weights carry the trained adapters: merged != base kernel where LoRA is."""
    from flax import nnx

    from metaembed_jax.formats.hf import merged_backbone_params
    from metaembed_jax.models.rules import path_string

    model, _ = load_trained(trained_lora_run(tmp_path_factory))
    merged = merged_backbone_params(model.backbone)
    base = {
        path_string(p): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(model.backbone, nnx.Param))
    }
    # The decoder's adapters (the run trains on text only: the vision MLP's stay at B = 0).
    adapted = [
        n[: -len("lora_a")] + "kernel"
        for n in base
        if n.endswith("lora_a") and n.startswith("layers.")
    ]
    assert adapted and not any(n.endswith(("lora_a", "lora_b")) for n in merged)
    assert all(not np.allclose(merged[n], base[n], atol=1e-7) for n in adapted)
