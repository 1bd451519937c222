"""load_trained on a tiny trained LoRA run: the parameters only (the optimizer state is never
read: the test deletes it), equal to the train state restored the training way, and a base
model that is not the run's refused with what differs."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from metaembed_jax import load_trained
from metaembed_jax.evaluation import runner
from metaembed_jax.retrieval.retriever import Retriever
from metaembed_jax.training import loop
from metaembed_jax.training.checkpointing import Checkpointer
from metaembed_jax.training.model import build_model
from metaembed_jax.training.run_identity import RunMismatchError, read_saved_config
from metaembed_jax.training.state import create_train_state, make_optimizer
from tests.helpers import RandomBatches
from tests.trained_run import copy_run, tiny_lora_config, trained_lora_run

TEXTS = ["a red cube left of a blue sphere", "two green cones"]


def _train_state_model(run):
    """Reference: the full train state (params + optimizer) restored as a resume does."""
    config = read_saved_config(run)
    tx, _ = make_optimizer(config.optimizer, int(config.train.steps))
    template = create_train_state(build_model(config), tx, lora=True)
    checkpointer = Checkpointer(run, read_only=True)
    state, _ = checkpointer.restore(template)
    checkpointer.close()
    return state.model(), template.model()


def _flat_params(model):
    return {
        ".".join(map(str, path)): np.asarray(v[...])
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_load_trained_restores_the_parameters_without_optimizer_state(tmp_path_factory, tmp_path):
    run = copy_run(trained_lora_run(tmp_path_factory), tmp_path / "run")
    reference, initial = _train_state_model(run)
    shutil.rmtree(run / "checkpoints" / "2" / "opt_state")  # load_trained must not need it
    model, processor = load_trained(run)

    got, want = _flat_params(model), _flat_params(reference)
    assert sorted(got) == sorted(want)  # the same tree: every variable of the trained model
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # Trained values, not the initial ones: the meta tokens moved in two steps.
    assert not np.array_equal(got["meta_tokens"], _flat_params(initial)["meta_tokens"])

    features = processor(TEXTS, [None, None], side="query")
    np.testing.assert_allclose(
        np.asarray(model.embed(side="query", **features)),
        np.asarray(reference.embed(side="query", **features)),
        atol=1e-6,
    )
    # eval.py without --config evaluates under the run's own saved config.
    assert runner.run_config(None, run).to_dict() == read_saved_config(run).to_dict()


def test_a_moved_run_directory_loads_without_the_data_directory(tmp_path_factory, tmp_path):
    """A from-scratch run keeps a copy of the built-in tokenizer: the run directory alone loads
    (here its config's data.dir names a folder that does not exist)."""
    trained = trained_lora_run(tmp_path_factory)
    run = copy_run(trained, tmp_path / "run")
    saved = json.loads((run / "config.json").read_text())
    original_tokenizer = Path(saved["data"]["dir"]) / "tokenizer"
    saved["data"]["dir"] = str(tmp_path / "no_such_data_dir")
    (run / "config.json").write_text(json.dumps(saved))
    _, processor = load_trained(run)
    reference = AutoTokenizer.from_pretrained(original_tokenizer, local_files_only=True)
    assert processor.tokenizer.get_vocab() == reference.get_vocab()
    features = processor(TEXTS, [None, None], side="query")
    assert np.asarray(features["input_ids"]).shape[0] == len(TEXTS)


def test_load_trained_refuses_a_base_that_is_not_the_runs(tmp_path_factory, tmp_path):
    run = copy_run(trained_lora_run(tmp_path_factory), tmp_path / "run")
    config = read_saved_config(run)
    config.seed = 1  # the random base of this LoRA run is derived from the seed
    with pytest.raises(RunMismatchError, match=r"weights' values differ: backbone\."):
        load_trained(run, config=config)

    path = run / "base_fingerprint.json"
    fingerprint = json.loads(path.read_text())
    fingerprint["config"]["text_config"]["num_hidden_layers"] = 3
    layer_norm = next(k for k in fingerprint["shapes"] if k.endswith("input_layernorm.scale"))
    fingerprint["shapes"][layer_norm][0][0] = 3
    path.write_text(json.dumps(fingerprint))
    with pytest.raises(RunMismatchError) as error:
        load_trained(run)
    message = str(error.value)
    assert "text_config.num_hidden_layers: run's base has 3, given base has 2" in message
    assert f"shapes {layer_norm}" in message
    jax.clear_caches()


def test_load_trained_of_a_full_fine_tuning_run_without_a_mesh(tmp_path):
    """Full fine-tuning: the model is built abstractly and every parameter comes from the
    checkpoint's params item (here: a state whose parameters were all changed)."""
    from tests.helpers import build_test_tokenizer, tiny_run_config

    tokenizer = build_test_tokenizer(tmp_path / "data" / "tokenizer", 320)
    config = tiny_run_config(r_q=4, r_c=8, vocab_size=len(tokenizer))
    config.data.dir = str(tmp_path / "data")
    tx, _ = make_optimizer(config.optimizer, int(config.train.steps))
    state = create_train_state(build_model(config), tx, lora=False)
    state = state.replace(params=jax.tree.map(lambda x: x + 0.5, state.params))
    checkpointer = Checkpointer(tmp_path / "run", async_save=False)
    checkpointer.save(state, data_state={})
    checkpointer.close()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "0" / "opt_state")

    model, _ = load_trained(tmp_path / "run", config=config)
    got, want = _flat_params(model), _flat_params(state.model())
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_every_inference_path_turns_lora_dropout_off(tmp_path_factory, tmp_path):
    """A LoRA run trained with dropout 0.5: load_trained and Retriever.load give identical
    vectors call after call; the same model in training mode does not (the dropout is there)."""
    config = tiny_lora_config(tmp_path / "data")
    config.lora.dropout = 0.5
    config.train.steps = 1
    loop.train(config, tmp_path / "run", train_iterator=RandomBatches(0))
    model, processor = load_trained(tmp_path / "run")
    features = processor(TEXTS, [None, None], side="query")
    first = np.asarray(model.embed("query", **features))
    np.testing.assert_array_equal(first, np.asarray(model.embed("query", **features)))
    retriever = Retriever.load(tmp_path / "run")
    vectors = [np.asarray(retriever.encode_queries(TEXTS)) for _ in range(2)]
    np.testing.assert_array_equal(vectors[0], vectors[1])
    model.train()
    assert np.abs(np.asarray(model.embed("query", **features)) - first).max() > 1e-4


def test_load_trained_says_in_one_line_that_a_run_has_not_finished(
    tmp_path_factory, tmp_path, caplog
):
    """A run stopped at step 1 of train.steps=2 loaded without a word (issue 36, case 4): one
    warning line says so; an older step of a finished run loads without one."""
    import logging

    trained = trained_lora_run(tmp_path_factory)
    run = copy_run(trained, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING):
        load_trained(run)
    notes = [r.getMessage() for r in caplog.records if "has not finished" in r.getMessage()]
    assert notes == [
        f"{run} has not finished training: its newest checkpoint is step 1 of train.steps=2 "
        f"(loading step 1; rerun train.py --workdir {run} to finish it)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_trained(trained, step=1)
    assert "has not finished" not in caplog.text
