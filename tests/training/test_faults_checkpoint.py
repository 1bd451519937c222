"""Checkpoint faults and run identity (the checkpoint cases of the fault report): a config that
is not the run's is refused by eval and by resume, naming each difference; a damaged newest
checkpoint names the step, the parameter and the intact earlier step, which `--checkpoint` /
`load_trained(step=)` then reads; an emptied metadata file is a clear error; a failed
background save stops the run at the next step."""

import json
import time

import numpy as np
import pytest

from metaembed_jax import load_trained
from metaembed_jax.evaluation import runner
from metaembed_jax.training import loop
from metaembed_jax.training.checkpointing import CheckpointError
from metaembed_jax.training.recipes import apply_variant
from metaembed_jax.training.run_identity import RunMismatchError, read_saved_config
from tests.helpers import RandomBatches, tiny_run_config
from tests.trained_run import copy_run, trained_lora_run


@pytest.mark.parametrize(
    "variant, change, named",
    [
        ("nommr", None, ['loss.variant: run has "mmr", config has "nommr"']),
        ("single", None, ["model.readout", "loss.variant"]),
        (None, ("num_query_tokens", 2), ["model.num_query_tokens: run has 4, config has 2"]),
    ],
)
def test_eval_refuses_a_config_that_is_not_the_runs(tmp_path_factory, variant, change, named):
    run = trained_lora_run(tmp_path_factory)
    config = apply_variant(read_saved_config(run), variant)
    if change:
        config.model[change[0]] = change[1]
    with pytest.raises(RunMismatchError, match="cannot evaluate") as error:
        runner.run(config, run)
    for text in named:
        assert text in str(error.value)


def test_resume_refuses_a_config_that_is_not_the_runs(tmp_path_factory, tmp_path):
    run = copy_run(trained_lora_run(tmp_path_factory), tmp_path / "run")
    saved = (run / "config.json").read_text()
    config = read_saved_config(run)
    config.train.steps = 4  # training length may change on resume; the model may not
    config.lora.rank = 2
    with pytest.raises(RunMismatchError, match=r"lora.rank: run has 4, config has 2"):
        loop.train(config, run, train_iterator=RandomBatches(0))
    assert (run / "config.json").read_text() == saved  # the run's record is left as it was


def _truncate_params(step_dir):
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no orbax data files under {step_dir}"
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_newest_checkpoint_names_step_parameter_and_the_intact_step(
    tmp_path_factory, tmp_path
):
    run = copy_run(trained_lora_run(tmp_path_factory), tmp_path / "run")
    _truncate_params(run / "checkpoints" / "2")
    with pytest.raises(CheckpointError) as error:
        load_trained(run)
    message = str(error.value)
    assert "checkpoint step 2" in message
    assert "parameter " in message and " is damaged" in message
    assert "step 1 is intact" in message and "--checkpoint 1" in message
    assert len(message) < 800 and message.count("\n") < 3  # short, not a TensorStore spec
    model, _ = load_trained(run, step=1)
    assert np.isfinite(np.asarray(model.meta_tokens[...])).all()
    assert runner.checkpoint_location(run, "1") == (run, 1)  # eval.py --checkpoint 1


def test_emptied_checkpoint_metadata_is_a_clear_error(tmp_path_factory, tmp_path):
    run = copy_run(trained_lora_run(tmp_path_factory), tmp_path / "run")
    (run / "checkpoints" / "2" / "meta" / "metadata").write_text("")
    with pytest.raises(CheckpointError, match=r"step 2: its metadata file .* is not valid JSON"):
        load_trained(run)
    with pytest.raises(CheckpointError, match="step 1 is intact"):
        load_trained(run)


class SlowBatches(RandomBatches):
    """Steps of a realistic length: a tiny model's steps take milliseconds, less than the
    background save thread needs to start and fail."""

    def __next__(self):
        time.sleep(0.5)
        return super().__next__()


def test_failed_background_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    def failing_commit(*args, **kwargs):
        raise OSError("injected: no space left on device")

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", failing_commit)
    config = tiny_run_config(r_q=4, r_c=8)
    config.loss.groups = ((1, 1, 1.0), (4, 8, 1.0))
    config.train.steps = 8
    config.checkpoint.every, config.checkpoint.async_save = 2, True
    with pytest.raises(OSError, match="injected"):
        loop.train(config, tmp_path / "run", train_iterator=SlowBatches(0))
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    # The save of step 2 failed: the run stops at step 3, not at the next save (step 4).
    assert max(logged) <= 3, logged
