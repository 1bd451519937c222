"""Real processes: a two-process run on 127.0.0.1 (4 CPU devices each, gloo collectives) gives
the losses of one process; train.py's program refuses a second trainer on its run directory,
and SIGTERM leaves a checkpoint that restores to the step it logged, then exits 143."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from metaembed_jax.training import checkpointing, loop
from metaembed_jax.training.model import build_model
from metaembed_jax.training.recipes import load_recipe
from metaembed_jax.training.state import create_train_state, make_optimizer
from tests import helpers
from tests.paths import REPO

pytestmark = pytest.mark.slow

CONFIG = """
from tests import helpers
config = helpers.tiny_run_config(r_q=4, r_c=8)
config.loss.groups = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0))
config.mesh.data = 8
"""


def small_config():
    scope = {}
    exec(CONFIG, scope)
    return scope["config"]


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "run.py"
    path.write_text(textwrap.dedent(body))
    return path


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


def test_two_processes_give_the_losses_of_one(tmp_path, run_two_processes):
    body = f"""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_default_matmul_precision", "highest")
    port, process_id, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{{port}}", num_processes=2,
                               process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    from metaembed_jax.training import loop
    from tests import helpers
    {textwrap.indent(CONFIG, "    ").strip()}
    config.distributed.mode = "off"  # initialised above
    rows = loop.train(config, workdir, train_iterator=helpers.RandomBatches(0))
    with open(f"{{workdir}}/rows_{{process_id}}.json", "w") as f:
        json.dump(rows, f)
    """
    workdir = tmp_path / "two"
    run_two_processes(body, workdir)
    want = loop.train(small_config(), tmp_path / "one", train_iterator=helpers.RandomBatches(0))
    for i in range(2):
        rows = json.loads((workdir / f"rows_{i}.json").read_text())
        assert [r["step"] for r in rows] == [r["step"] for r in want]
        np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in want], rtol=1e-5)
        np.testing.assert_allclose(
            [r["group_losses"] for r in rows],
            [r["group_losses"] for r in want],
            rtol=1e-5,
            atol=1e-6,
        )


# train.py's program (cli/apps.py run_train) with its data pipeline replaced by random batches,
# so that no dataset has to be built; flags, the run lock, errors and exit codes are the real ones.
TRAIN_PROGRAM = """
import jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
from metaembed_jax.training import loop
from tests.helpers import RandomBatches
loop.make_train_iterator = lambda *args, **kwargs: RandomBatches(0)
from metaembed_jax.cli.apps import run_train
run_train()
"""

PROGRAM_CONFIG = """
from tests import helpers


def get_config():
    config = helpers.tiny_run_config(r_q=4, r_c=8, vocab_size=0)  # 0: the tokenizer's
    config.loss.groups = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0))
    config.mesh.data = 8
    config.data.dir = {data_dir!r}
    config.train.steps = 100000
    config.checkpoint.every = 100000
    config.checkpoint.async_save = True
    return config
"""


def _wait_for_logged_steps(proc, metrics_path: Path, steps: int) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)


def test_a_second_trainer_is_refused_and_sigterm_exits_143_after_a_usable_checkpoint(tmp_path):
    """Two trainers on one --workdir both ran and logged every step twice (case 9): the second
    is refused in one line naming the first, which trains on. SIGTERM looked like success (case
    5): the program saves a checkpoint that restores to the step it logged, then exits 143."""
    tokenizer = helpers.build_test_tokenizer(tmp_path / "data" / "tokenizer", 320)
    config_file = tmp_path / "config.py"
    config_file.write_text(PROGRAM_CONFIG.format(data_dir=str(tmp_path / "data")))
    workdir = tmp_path / "run"
    program = script(tmp_path, TRAIN_PROGRAM)
    command = [sys.executable, str(program), f"--config={config_file}", f"--workdir={workdir}"]
    first = subprocess.Popen(
        command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics_path = workdir / "metrics.jsonl"
    _wait_for_logged_steps(first, metrics_path, 2)
    # A few steps only, so that a second trainer that is not refused ends (and fails the test).
    bounded = [*command, "--config.train.steps=3"]
    second = subprocess.run(bounded, env=env(), capture_output=True, text=True, timeout=600)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=300)[0]

    assert second.returncode == 1, second.stderr[-3000:]
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"{program}: error: {workdir} is being trained by another process ")
    assert f"(pid {first.pid} on " in line
    assert first.returncode == 128 + signal.SIGTERM, output[-3000:]
    logged = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [row["step"] for row in logged]
    last_step = steps[-1]
    assert steps == list(range(1, last_step + 1)) and last_step >= 2  # each step logged once
    assert f"stopped by SIGTERM at step {last_step}: its checkpoint is saved in {workdir}" in (
        output
    )

    config = load_recipe(config_file)
    mesh = loop.sharding.make_mesh(config.mesh)
    tx, _ = make_optimizer(config.optimizer, config.train.steps)
    model = build_model(config, mesh=mesh, vocab_size=len(tokenizer))
    fresh = create_train_state(model, tx, lora=False, mesh=mesh)
    fresh_params = jax.tree.map(np.asarray, fresh.params)
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    assert ckpt.latest_step() == last_step
    restored, data_state = ckpt.restore(fresh)
    ckpt.close()
    assert int(restored.step) == last_step
    assert data_state == {"index": last_step}  # the iterator resumes at the next batch
    moved = [
        not np.array_equal(np.asarray(a), b)
        for a, b in zip(
            jax.tree.leaves(restored.params), jax.tree.leaves(fresh_params), strict=True
        )
    ]
    assert any(moved) and all(
        np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params)
    )
