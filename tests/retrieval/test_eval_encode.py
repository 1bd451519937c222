"""ModelEncoder on a tiny random MetaEmbed: equals `model.embed` item by item (order restored,
last batch padded, text and image batches, batch sharded over 8 CPU devices)."""

import io

import numpy as np
import pytest
from PIL import Image

from metaembed_jax import sharding
from metaembed_jax.models import qwen2_vl
from metaembed_jax.retrieval.encode import ModelEncoder
from metaembed_jax.training.model import build_model
from tests.helpers import build_test_tokenizer, tiny_run_config


def _png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = build_test_tokenizer(directory, 320)
    config = tiny_run_config(r_q=4, r_c=8, vocab_size=len(tokenizer))
    config.data.min_pixels, config.data.max_pixels = 28 * 28, 56 * 56
    config.data.length_buckets = (32, 64)
    mesh = sharding.make_mesh(config.mesh)  # data = all 8 virtual devices
    model = build_model(config, mesh=mesh)
    processor = qwen2_vl.make_processor(config.data, directory)
    return config, mesh, model, processor


ITEMS = [
    {"text": "the red cat", "image": None},
    {"text": "", "image": _png((200, 0, 0))},
    {"text": "make it blue", "image": _png((0, 0, 200))},
    {"text": "What was the revenue of Valoria in 2019?", "image": None},
    {"text": "dog", "image": None},
]


def test_model_encoder_equals_model_embed(setup):
    config, mesh, model, processor = setup
    encoder = ModelEncoder(
        model,
        processor,
        batch_size=8,
        mesh=mesh,
        pad_features=qwen2_vl.FAMILY.static_shapes(config.data, 8),
        progress=False,
    )
    for side, num_vectors in (("query", 4), ("candidate", 8)):
        got = encoder(ITEMS, side)
        assert got.shape == (len(ITEMS), num_vectors, model.embedding_dim)
        # Reference: one unpadded, unsharded batch of all items in their original order.
        features = processor(
            [item["text"] for item in ITEMS], [item["image"] for item in ITEMS], side=side
        )
        expected = np.asarray(model.embed(side=side, **features))
        np.testing.assert_allclose(got, expected, atol=2e-5)
    assert encoder.num_calls == 2  # one batch (items sorted by modality inside it) per side


def test_model_encoder_rejects_indivisible_batch(setup):
    _, mesh, model, processor = setup
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        ModelEncoder(model, processor, batch_size=6, mesh=mesh)
