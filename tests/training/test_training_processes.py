"""Real processes: a two-process run on 127.0.0.1 (4 CPU devices each, gloo collectives) gives
the losses of one process; SIGTERM leaves a checkpoint that restores to the step it logged."""

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


def test_sigterm_saves_a_usable_checkpoint_then_stops_with_143(tmp_path):
    body = f"""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_default_matmul_precision", "highest")
    from metaembed_jax.training import loop
    from tests import helpers
    {textwrap.indent(CONFIG, "    ").strip()}
    config.train.steps = 100000
    config.checkpoint.every = 100000
    config.checkpoint.async_save = True
    try:
        loop.train(config, sys.argv[1], train_iterator=helpers.RandomBatches(0))
    except loop.StoppedBySignal as stopped:  # what train.py does with it
        sys.exit(stopped.exit_code)
    """
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script(tmp_path, body)), str(workdir)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics_path = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]  # a stop, not a success
    logged = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    last_step = logged[-1]["step"]
    assert 2 <= last_step < 100000

    config = small_config()
    config.train.steps = 100000
    mesh = loop.sharding.make_mesh(config.mesh)
    tx, _ = make_optimizer(config.optimizer, config.train.steps)
    fresh = create_train_state(build_model(config, mesh=mesh), tx, lora=False, mesh=mesh)
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
