"""Train step, LoRA, resume and config checks on the real MetaEmbed (tiny random Qwen2.5-VL).

References: the one-device step for every mesh; the initial weights for LoRA; the uninterrupted
run for resume. Tiny model: hidden 32, 2 layers, 1 vision block, R_q = 4, R_c = 8.
"""

import jax
import numpy as np
import pytest

from metaembed_jax import sharding
from metaembed_jax.training import loop
from metaembed_jax.training.config import loss_groups, validate_config
from metaembed_jax.training.model import build_model
from metaembed_jax.training.state import create_train_state, make_optimizer
from metaembed_jax.training.step import TrainStep
from tests import helpers

GROUPS = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0))


def small_config():
    config = helpers.tiny_run_config(r_q=4, r_c=8)
    config.loss.groups = GROUPS
    return config


def run_steps(config, mesh, batches, lora=False):
    """(metrics of each step, final params as numpy, initial frozen, final frozen)."""
    model = build_model(config, mesh=mesh)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    state = create_train_state(model, tx, lora=lora, mesh=mesh)
    frozen_before = jax.tree.map(np.asarray, state.frozen)
    step = TrainStep(
        state,
        groups=loss_groups(config),
        temperature=config.loss.temperature,
        schedule=schedule,
        mesh=mesh,
    )
    history = []
    for batch in batches:
        state, metrics = step(state, batch)
        history.append(jax.tree.map(np.asarray, metrics))
    params = jax.tree.map(np.asarray, state.params)
    return history, params, frozen_before, jax.tree.map(np.asarray, state.frozen)


@pytest.fixture(scope="module")
def one_device():
    config = small_config()
    batch = helpers.random_batch(0, image_every=2)
    return config, batch, run_steps(config, None, [batch])


# (data, fsdp, tensor): data + fsdp, and all three axes. Pure data parallelism (8, 1, 1) is the
# data axis of the first and is left out for the suite's time.
@pytest.mark.parametrize("shape", [(4, 2, 1), (2, 2, 2)])
def test_step_on_a_mesh_equals_one_device(one_device, shape):
    """Same loss, group losses, gradient norm and updated parameters (<= 1e-5)."""
    config, batch, (want_history, want_params, _, _) = one_device
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape, strict=True)))
    history, params, _, _ = run_steps(config, mesh, [batch])
    for key in ("loss", "group_losses", "grad_norm", "lr"):
        np.testing.assert_allclose(history[0][key], want_history[0][key], rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lora_trains_adapters_and_meta_tokens_only():
    """The reference recipe's setting (LoRA with dropout, bf16 compute over f32 master weights,
    full remat): base weights stay bit-identical; adapters (the vision MLP's too: the
    candidates carry images) and meta tokens move; loss finite."""
    config = small_config()
    config.lora.enabled = True
    config.lora.dropout = 0.1
    config.model.dtype = "bfloat16"
    config.model.remat = "full"
    batches = [helpers.random_batch(i, image_every=2) for i in range(2)]
    history, params, frozen_before, frozen_after = run_steps(config, None, batches, lora=True)
    assert all(np.isfinite(h["loss"]) for h in history)
    for before, after in zip(
        jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after), strict=True
    ):
        np.testing.assert_array_equal(before, after)
    names = {
        "/".join(map(str, path)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert any("meta_tokens" in n for n in names)
    assert all("lora_" in n or "meta_tokens" in n for n in names), names
    # The adapters' B matrices start at zero and must have been trained.
    lora_b = [
        v
        for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
        if "lora_b" in jax.tree_util.keystr(path)
    ]
    assert lora_b and all(np.abs(v).max() > 0 for v in lora_b)
    assert len(jax.tree.leaves(frozen_before)) > 10
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))  # master weights


def test_gradient_accumulation_averages_micro_batches(one_device):
    """A step over (b0, b1) reports the mean of the losses each micro-batch gives on its own."""
    config, batch, (want_history, _, _, _) = one_device
    other = helpers.random_batch(1, image_every=2)
    other_history, _, _, _ = run_steps(config, None, [other])
    history, _, _, _ = run_steps(config, None, [(batch, other)])
    want = (want_history[0]["group_losses"] + other_history[0]["group_losses"]) / 2
    np.testing.assert_allclose(history[0]["group_losses"], want, rtol=1e-5)
    np.testing.assert_allclose(history[0]["loss"], want.mean(), rtol=1e-5)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """A run stopped after 2 of 4 steps and restarted logs exactly the uninterrupted metrics."""
    config = small_config()
    config.mesh.data = 8  # the batch over all 8 devices
    full = loop.train(
        config, tmp_path / "full", train_iterator=helpers.RandomBatches(0, image_every=2)
    )
    config.train.stop_after = 2
    first = loop.train(
        config, tmp_path / "resumed", train_iterator=helpers.RandomBatches(0, image_every=2)
    )
    assert [row["step"] for row in first] == [1, 2]
    config.train.stop_after = 0
    second = loop.train(
        config, tmp_path / "resumed", train_iterator=helpers.RandomBatches(0, image_every=2)
    )
    assert [row["step"] for row in second] == [3, 4]
    drop = lambda row: {k: v for k, v in row.items() if k != "examples_per_s"}  # noqa: E731
    assert [drop(r) for r in first + second] == [drop(r) for r in full]
    logged = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 4


def test_invalid_configs_fail_at_start_with_a_clear_message(tmp_path):
    config = small_config()
    config.loss.groups = ((1, 1, 1.0), (16, 64, 1.0))
    with pytest.raises(ValueError, match=r"\(16, 64, 1.0\).*4 query and 8 candidate"):
        validate_config(config)
    config = small_config()
    config.train.batch_size = 12
    with pytest.raises(ValueError, match="batch_size=12.*not divisible by the 8 batch shards"):
        loop.train(config, tmp_path / "run", train_iterator=helpers.RandomBatches(0, image_every=2))
    # A pod's shards: the message names the accumulation that splits (384 / 6 = 64 a shard).
    config.train.batch_size, config.train.grad_accum_steps = 384, 8
    with pytest.raises(ValueError, match=r"micro-batch 48\).*grad_accum_steps=6 \(micro-batch 64"):
        validate_config(config, 64)
    config = small_config()
    config.init_from = str(tmp_path / "missing_checkpoint")
    with pytest.raises(FileNotFoundError, match="missing_checkpoint"):
        loop.train(config, tmp_path / "run", train_iterator=helpers.RandomBatches(0, image_every=2))
    config = small_config()
    config.loss.variant = "single"
    with pytest.raises(ValueError, match="readout 'last_token'"):
        validate_config(config)
    config = small_config()
    with pytest.raises(ValueError, match="tokenizer has 100000 tokens"):
        build_model(config, vocab_size=100_000)


def test_vision_per_example_reaches_the_built_backbone():
    """`config.model.vision_per_example` is applied wherever a model is built (default: the
    packed tower, as the demo trains); the reference recipes set it."""
    from metaembed_jax.training.recipes import reference_recipe

    config = small_config()
    assert build_model(config).backbone.vision_per_example is False
    config.model.vision_per_example = True
    assert build_model(config).backbone.vision_per_example is True
    assert reference_recipe("checkpoints/x").model.vision_per_example is True
