"""eval.py end to end on a tiny random MetaEmbed checkpoint and the ViDoRe fixture: the printed
table, results.json equal to pytrec_eval on the model's own MaxSim scores, the cache reused by a
second run, and budgets beyond the trained sizes refused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import pytrec_eval

from metaembed_jax import sharding
from metaembed_jax.evaluation import runner, vidore
from metaembed_jax.models import qwen2_vl
from metaembed_jax.training.checkpointing import Checkpointer
from metaembed_jax.training.model import build_model
from metaembed_jax.training.recipes import load_recipe
from metaembed_jax.training.state import create_train_state, make_optimizer
from tests.helpers import build_test_tokenizer
from tests.paths import FIXTURES, REPO

FIXTURE = FIXTURES / "vidore"
BUDGETS = ((1, 1), (2, 4), (4, 8))

CONFIG_FILE = """
from tests.helpers import tiny_run_config


def get_config():
    config = tiny_run_config(r_q=4, r_c=8, vocab_size={vocab_size})
    config.mesh.data = 1  # eval.py runs on one CPU device here
    config.data.dir = {data_dir!r}
    config.data.min_pixels, config.data.max_pixels = 28 * 28, 56 * 56
    config.data.length_buckets = (32, 64)
    config.data.beir.roots = ({fixture!r},)
    config.eval.budgets = {budgets!r}
    config.eval.builtin = False
    config.eval.batch_size = 4
    return config
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A config file, a data dir with the tokenizer, and a run dir with a step-0 checkpoint."""
    root = tmp_path_factory.mktemp("eval_e2e")
    tokenizer = build_test_tokenizer(root / "data" / "tokenizer", 320)
    config_path = root / "config.py"
    config_path.write_text(
        CONFIG_FILE.format(
            vocab_size=len(tokenizer),
            data_dir=str(root / "data"),
            fixture=str(FIXTURE),
            budgets=BUDGETS,
        )
    )
    config = load_recipe(config_path)
    mesh = sharding.make_mesh(config.mesh, devices=[__import__("jax").devices()[0]])
    model = build_model(config, mesh=mesh, vocab_size=len(tokenizer))
    tx, _ = make_optimizer(config.optimizer, int(config.train.steps))
    state = create_train_state(model, tx, lora=False, mesh=mesh)
    checkpointer = Checkpointer(root / "run", async_save=False)
    checkpointer.save(state, data_state={})
    checkpointer.close()
    return config, config_path, root / "run", model


def _eval_py(config_path, workdir, *extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, str(REPO / "eval.py"), f"--config={config_path}"]
    command += [f"--workdir={workdir}", *extra]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def _reference_metrics(model, config):
    """pytrec_eval on the model's own scores (numpy MaxSim over model.embed)."""
    processor = qwen2_vl.make_processor(config.data)
    tables = vidore.read_dataset(FIXTURE)

    def embed(rows, side):
        features = processor(
            [r["text"] for r in rows], [r["image"] or None for r in rows], side=side
        )
        return np.asarray(model.embed(side=side, **features))

    queries, corpus = embed(tables["queries"], "query"), embed(tables["corpus"], "candidate")
    reference = {}
    for r_q, r_c in BUDGETS:
        scores = np.einsum("qid,cjd->qcij", queries[:, :r_q], corpus[:, :r_c]).max(-1).sum(-1)
        run = {
            q["id"]: {c["id"]: float(scores[i, j]) for j, c in enumerate(tables["corpus"])}
            for i, q in enumerate(tables["queries"])
        }
        results = pytrec_eval.RelevanceEvaluator(tables["qrels"], {"ndcg_cut_5"}).evaluate(run)
        reference[f"({r_q}, {r_c})"] = np.mean([v["ndcg_cut_5"] for v in results.values()])
    return reference


def test_eval_py_end_to_end_on_the_vidore_fixture(run):
    config, config_path, workdir, model = run
    completed = _eval_py(config_path, workdir)
    assert completed.returncode == 0, completed.stderr[-3000:]
    table = completed.stdout.strip().splitlines()
    assert [line.split("  ")[0].strip() for line in table[-3:]] == ["(1, 1)", "(2, 4)", "(4, 8)"]
    assert "vidore ndcg@5" in table[-5] and "ms/query" in table[-5]

    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert (workdir / "eval" / "scaling.png").stat().st_size > 0
    task = results["suites"]["vidore"]["tasks"]["vidore"]
    reference = _reference_metrics(model, config)
    for budget, expected in reference.items():
        assert task["by_budget"][budget]["ndcg@5"] == pytest.approx(expected, abs=1e-6)

    # A second evaluation with the same checkpoint reads the cache: the encoder is never called.
    def must_not_encode(items, side):
        raise AssertionError(f"re-encoded {len(items)} {side} items")

    fingerprint = runner.model_fingerprint(config, workdir, 0)
    _, again = runner.evaluate(
        config, workdir, encode=must_not_encode, model_fingerprint=fingerprint, budgets=[(4, 8)]
    )
    got = again["suites"]["vidore"]["tasks"]["vidore"]["by_budget"]["(4, 8)"]
    assert got["ndcg@5"] == task["by_budget"]["(4, 8)"]["ndcg@5"]


def test_budget_beyond_trained_sizes_is_refused(run):
    config, _, workdir, _ = run
    with config.unlocked():
        config.eval.budgets = ((1, 1), (4, 16))
    with pytest.raises(ValueError, match=r"budget \(4, 16\) is out of range"):
        runner.run(config, workdir)
