"""MetaEmbed on PaliGemma: equal to transformers given the meta tokens as extra embedding rows
(appended after the content, positions continuing, plain causal), and a train step on a mesh of
8 CPU devices equal to one device (tiny Gemma and Gemma 2 PaliGemmas, R_q = 2, R_c = 3)."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from ml_collections import ConfigDict

from metaembed_jax import MetaEmbed, sharding
from metaembed_jax.models.paligemma import tiny_config
from tests import helpers
from tests.models.test_paligemma import IMAGE, TOKENS_PER_IMAGE, hf_suffix_states, make_batch
from tests.training.test_training import run_steps

VOCAB, R_Q, R_C = 300, 2, 3


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.PaliGemmaConfig(**tiny_config(VOCAB, text_model_type=request.param))
    hf_model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp(f"metaembed_{request.param}")
    hf_model.save_pretrained(path)
    return hf_model, MetaEmbed.from_pretrained(path, R_Q, R_C, rngs=nnx.Rngs(0))


def test_meta_embeddings_equal_hf_with_extra_embedding_rows(checkpoint):
    hf_model, model = checkpoint
    batch = make_batch()
    batch.pop("token_type_ids")
    meta = np.asarray(model.meta_tokens[...])
    reference = hf_suffix_states(hf_model, batch, np.repeat(meta[None], 3, axis=0))
    reference = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
    query, candidate = model.embed("query", **batch), model.embed("candidate", **batch)
    assert query.shape == (3, R_Q, 64) and candidate.shape == (3, R_C, 64)
    np.testing.assert_allclose(query, reference[:, :R_Q], atol=1e-4)
    np.testing.assert_allclose(candidate, reference[:, R_Q:], atol=1e-4)


def random_side(rng, batch, length=24, image_every=2):
    """Left-padded PaliGemma features: every `image_every`-th row has one 28 px image
    (4 `<image>` tokens) before its `<bos>` and text; pixel_values per example [B, 1, 3, 28, 28]."""
    input_ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    pixels = np.zeros((batch, 1, 3, 28, 28), np.float32)
    for b in range(batch):
        has_image = b % image_every == 0
        tokens = [2, *rng.integers(4, 96, int(rng.integers(3, 12)))]
        if has_image:
            tokens = [IMAGE] * TOKENS_PER_IMAGE + tokens
            pixels[b, 0] = rng.normal(size=(3, 28, 28))
        input_ids[b, length - len(tokens) :] = tokens
        mask[b, length - len(tokens) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}


def test_step_on_8_devices_equals_one_device():
    """Gemma 2 (its sliding / global layers, soft-cap and extra norms cover Gemma's code) on a
    (data 2, fsdp 2, tensor 2) mesh: loss, group losses, gradient norm and updated weights."""
    config = helpers.tiny_run_config(r_q=4, r_c=8)
    config.model.hf_config = ConfigDict(tiny_config(96, text_model_type="gemma2"))
    config.loss.groups = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0))
    rng = np.random.default_rng(0)
    batch = {side: random_side(rng, 8) for side in ("query", "positive", "negative")}
    want_history, want_params, _, _ = run_steps(config, None, [batch])
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    history, params, _, _ = run_steps(config, mesh, [batch])
    for key in ("loss", "group_losses", "grad_norm"):
        np.testing.assert_allclose(history[0][key], want_history[0][key], rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
