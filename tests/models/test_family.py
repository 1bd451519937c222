"""A backbone family is a plug-in: a toy text-only family registered here (its own feature names,
its own processor and special tokens) trains a MetaEmbed through the normal data collation and
train step, with nothing in metaembed.py or training/ knowing it.

References: the toy decoder written out in numpy (the meta states), and `mmr_loss` on the
untrained model's embeddings (the first logged loss).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from metaembed_jax import MetaEmbed
from metaembed_jax.data.pipeline import Collate
from metaembed_jax.data.tokenizer import train_tokenizer
from metaembed_jax.losses import mmr_loss
from metaembed_jax.models import family, layers
from metaembed_jax.training import loop
from metaembed_jax.training.model import build_model
from tests.helpers import tiny_run_config

VOCAB, HIDDEN, LENGTH = 40, 16, 12
GROUPS = ((1, 1, 1.0), (2, 4, 1.0))


class ToyDecoder(nnx.Module):
    """Embedding, one causal "mean of the prefix so far" mixing layer, RMSNorm. Features are
    named `token_ids` / `keep` on purpose: nothing outside the family may expect Qwen's."""

    def __init__(self, config, *, dtype, param_dtype, lora, remat, rngs):
        init = nnx.initializers.normal(0.5)
        shape = (config["vocab_size"], config["hidden_size"])
        self.table = layers.make_param(rngs, init, shape, ("vocab", "embed"), param_dtype)
        width = config["hidden_size"]
        self.mix = layers.Dense(width, width, ("embed", "mlp"), use_bias=False, rngs=rngs)
        self.norm = layers.RMSNorm(width, 1e-6, rngs=rngs)

    @property
    def hidden_size(self):
        return self.table.shape[-1]

    def _run(self, embeds, keep):
        keep = keep.astype(embeds.dtype)[..., None]  # [B, L, 1]
        prefix_mean = jnp.cumsum(embeds * keep, 1) / jnp.maximum(jnp.cumsum(keep, 1), 1.0)
        return self.norm(embeds + self.mix(prefix_mean))

    def __call__(self, token_ids, keep):
        return self._run(self.table[...][jnp.asarray(token_ids)], jnp.asarray(keep))

    def encode_with_suffix(self, suffix, token_ids, keep):
        embeds = self.table[...][jnp.asarray(token_ids)]
        batch, count = embeds.shape[0], suffix.shape[1]
        suffix = jnp.broadcast_to(suffix.astype(embeds.dtype), (batch, count, embeds.shape[-1]))
        keep = jnp.concatenate([jnp.asarray(keep), jnp.ones((batch, count), jnp.int32)], 1)
        return self._run(jnp.concatenate([embeds, suffix], 1), keep)[:, -count:]


class ToyProcessor:
    """Characters -> ids (3 + ord % (VOCAB - 3)), `<q>` before query texts, left-padded."""

    pad_token_id = 0

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer or list(range(VOCAB))  # len() = the vocabulary size

    def __call__(self, texts, images, *, side, row_ids=None):
        rows = [[1] * (side == "query") + [3 + ord(c) % (VOCAB - 3) for c in t] for t in texts]
        token_ids = np.zeros((len(rows), LENGTH), np.int32)
        keep = np.zeros((len(rows), LENGTH), np.int32)
        for i, row in enumerate(rows):
            token_ids[i, LENGTH - len(row) :], keep[i, LENGTH - len(row) :] = row, 1
        return {"token_ids": token_ids, "keep": keep, "ignored": np.zeros(len(rows))}

    def save_pretrained(self, path):
        raise NotImplementedError


TOY = family.register_family(
    family.BackboneFamily(
        name="toy_text",
        model_types=("toy_text",),
        build=ToyDecoder,
        rules=lambda config: [],
        feature_keys=("token_ids", "keep"),
        make_processor=lambda data_config, path=None: ToyProcessor(),
        static_shapes=lambda data_config, batch_size, **kwargs: lambda features: features,
        tiny_config=lambda vocab_size=VOCAB, **overrides: {
            "model_type": "toy_text",
            "vocab_size": vocab_size,
            "hidden_size": HIDDEN,
            **overrides,
        },
        special_tokens=("<pad>", "<q>", "<sep>"),
    )
)


def toy_batch(seed):
    """One collated batch of 8 (query, positive) pairs, as the input pipeline builds it."""
    words = ["red", "blue", "green", "gold", "grey", "pink", "teal", "plum"]
    picked = np.random.default_rng(seed).permutation(len(words))
    examples = [  # as the pipeline's DecodeRecord gives them: record index, (text, images)
        {"index": int(i), "query": (f"{words[i]} one", []), "positive": (words[i], [])}
        for i in picked
    ]
    collate = Collate(ToyProcessor(), lambda f: f, TOY.feature_keys, hard_negatives=False)
    return collate(examples)


class ToyBatches:
    def __init__(self):
        self.index = 0

    def __next__(self):
        self.index += 1
        return toy_batch(self.index - 1)

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def toy_meta_states(model, features):
    """numpy transcription of the toy decoder on [content; all meta tokens]."""
    table = np.asarray(model.backbone.table[...], np.float64)
    kernel = np.asarray(model.backbone.mix.kernel[...], np.float64)
    scale = np.asarray(model.backbone.norm.scale[...], np.float64)
    meta = np.asarray(model.meta_tokens[...], np.float64)
    embeds = table[features["token_ids"]]
    batch, count = embeds.shape[0], meta.shape[0]
    x = np.concatenate([embeds, np.broadcast_to(meta, (batch, count, HIDDEN))], 1)
    keep = np.concatenate([features["keep"], np.ones((batch, count))], 1)[..., None]
    mean = np.cumsum(x * keep, 1) / np.maximum(np.cumsum(keep, 1), 1.0)
    y = x + mean @ kernel
    y = y / np.sqrt(np.mean(y**2, -1, keepdims=True) + 1e-6) * scale
    return y[:, -count:]


def toy_config():
    config = tiny_run_config(r_q=2, r_c=4)
    config.model.hf_config = ConfigDict(TOY.tiny_config())
    config.loss.groups = GROUPS
    config.train.steps = 2
    config.train.batch_size = 8  # one example per test device
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.lora.enabled = False
    return config


def test_metaembed_on_a_toy_family_reads_its_meta_positions():
    """embed() on the toy family = the numpy decoder's meta states, sliced per side, normalised."""
    model = MetaEmbed.from_config(TOY.tiny_config(), 2, 4, rngs=nnx.Rngs(0))
    features = toy_batch(0)["query"]
    assert set(features) == {"token_ids", "keep"}  # Collate kept only the family's keys
    states = toy_meta_states(model, features)
    states /= np.linalg.norm(states, axis=-1, keepdims=True)
    np.testing.assert_allclose(model.embed("query", **features), states[:, :2], atol=1e-5)
    np.testing.assert_allclose(model.embed("candidate", **features), states[:, 2:], atol=1e-5)


def test_toy_family_trains_two_steps_through_the_normal_train_step(tmp_path):
    """loop.train on the toy family: two logged steps, the first loss equal to `mmr_loss` on
    the untrained model's embeddings of the first batch, and a lower loss after one update."""
    config = toy_config()
    rows = loop.train(config, tmp_path, train_iterator=ToyBatches())
    assert [row["step"] for row in rows] == [1, 2]
    model = build_model(config)  # the same seeded initial model
    batch = toy_batch(0)
    queries = model.embed("query", **batch["query"])
    positives = model.embed("candidate", **batch["positive"])
    expected, _ = mmr_loss(queries, positives, None, groups=GROUPS, temperature=0.03)
    assert rows[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    again = loop.train(toy_config(), tmp_path / "again", train_iterator=_Repeat(batch))
    assert again[1]["loss"] < again[0]["loss"]  # the same batch, after one optimizer step


class _Repeat(ToyBatches):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def __next__(self):
        self.index += 1
        return self.batch


def test_built_in_tokenizer_carries_the_family_special_tokens(tmp_path):
    """The built-in tokenizer of a family gets that family's tokens, first and unsplit."""
    tokenizer = train_tokenizer(["red one", "blue"] * 20, tmp_path, TOY.special_tokens, 300)
    assert tokenizer.convert_tokens_to_ids(list(TOY.special_tokens)) == [0, 1, 2]
    assert tokenizer.encode("<q>red", add_special_tokens=False)[0] == 1
    assert tokenizer.pad_token == "<pad>"
    assert family.family_for("toy_text") is TOY and family.family_for({"model_type": "toy_text"})
