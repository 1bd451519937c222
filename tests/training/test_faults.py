"""Faults and bad inputs (issue 15): each case fails on the code before the fix.

References: the inputs each test writes (rows, files, configs), an uninterrupted training run for
the resumed one, the embeddings the fake encoder returns, and the known-bad values themselves.
"""

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl import flags
from ml_collections import config_flags
from safetensors.numpy import save_file

from metaembed_jax.data import build, builders, sources
from metaembed_jax.data.config import get_data_config
from metaembed_jax.evaluation import runner
from metaembed_jax.models import hf_loading
from metaembed_jax.retrieval import encode
from metaembed_jax.training import checkpointing, loop
from metaembed_jax.training.config import validate_config
from tests.helpers import RandomBatches, tiny_run_config
from tests.paths import FIXTURES, REPO

GROUPS = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0))


def small_config():
    config = tiny_run_config(r_q=4, r_c=8)
    config.loss.groups = GROUPS
    return config


def copy_fixture_train(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURES / "images", raw / "images")
    shutil.copy(FIXTURES / "mmeb_train" / "train.jsonl", raw / "train.jsonl")
    return raw


# ----------------------------------------------------------------------------- 3. stale rows


def test_rebuilding_mmeb_train_from_changed_inputs_is_refused(tmp_path):
    """A second build into the same directory from a changed JSONL, another file list or other
    settings is refused, naming the difference; the same inputs (even touched) build nothing."""
    raw = copy_fixture_train(tmp_path)
    jsonl, out = raw / "train.jsonl", tmp_path / "out"
    builders.convert_mmeb_train([jsonl], raw, out)
    record_file = next(builders.pairs_path(out).glob("*.array_record*"))
    before = record_file.stat().st_mtime_ns
    jsonl.touch()  # same content, new modification time: still the same inputs
    builders.convert_mmeb_train([jsonl], raw, out)
    assert record_file.stat().st_mtime_ns == before
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join(lines[:2]) + "\n")  # the user's data changed: 2 rows, not 4
    with pytest.raises(ValueError, match=r"train\.jsonl changed since the build.*delete"):
        builders.convert_mmeb_train([jsonl], raw, out)
    other = raw / "other.jsonl"
    other.write_text("\n".join(lines[:1]) + "\n")
    with pytest.raises(ValueError, match=r"input files: built from .*train\.jsonl.*other\.jsonl"):
        builders.convert_mmeb_train([other], raw, out)
    jsonl.write_text("\n".join(lines) + "\n")  # back to the built content
    with pytest.raises(ValueError, match=r"skip_bad_rows: built with False, asked for True"):
        builders.convert_mmeb_train([jsonl], raw, out, skip_bad_rows=True)
    source = builders.open_pairs(out)
    assert len(source) == len(lines)  # nothing was rebuilt over the old rows


def test_a_build_stopped_by_a_bad_row_runs_again_once_the_data_is_fixed(tmp_path):
    """Nothing was finished, so the new inputs replace the record instead of being refused."""
    raw = copy_fixture_train(tmp_path)
    jsonl, out = raw / "train.jsonl", tmp_path / "out"
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join([*lines, '{"qry": "no positive"}']) + "\n")
    with pytest.raises(sources.BadRowError, match=r"row 4: missing column"):
        builders.convert_mmeb_train([jsonl], raw, out)
    jsonl.write_text("\n".join(lines) + "\n")
    builders.convert_mmeb_train([jsonl], raw, out)
    assert len(builders.open_pairs(out)) == len(lines)


def test_rebuilding_beir_and_mmeb_eval_from_changed_inputs_is_refused(tmp_path):
    """The evaluation converters check their inputs too (qrels changed, another image root)."""
    beir = tmp_path / "beir"
    shutil.copytree(FIXTURES / "beir", beir)
    builders.convert_beir(beir, tmp_path / "b")
    qrels = pa.Table.from_pylist([{"query-id": "q1", "corpus-id": "d2", "score": 1}])
    pq.write_table(qrels, beir / "qrels.parquet")
    with pytest.raises(ValueError, match=r"qrels\.parquet changed since the build"):
        builders.convert_beir(beir, tmp_path / "b")
    files = [FIXTURES / "mmeb_eval" / "ToyRetrieval.parquet"]
    builders.convert_mmeb_eval(files, FIXTURES, "ToyRetrieval", tmp_path / "m")
    elsewhere = tmp_path / "images_elsewhere"
    shutil.copytree(FIXTURES, elsewhere)
    with pytest.raises(ValueError, match=r"image_root: built with .*asked for .*images_elsewhere"):
        builders.convert_mmeb_eval(files, elsewhere, "ToyRetrieval", tmp_path / "m")


def test_build_cli_refuses_a_dataset_built_without_a_record(tmp_path):
    """build() on a directory holding rows of unknown origin (built before records existed)
    refuses instead of printing "built" over them."""
    raw = copy_fixture_train(tmp_path)
    config = get_data_config()
    config.dir = str(tmp_path / "data")
    config.name = "mmeb"
    config.mmeb_train.files = (str(raw / "train.jsonl"),)
    config.mmeb_train.image_root = str(raw)
    (directory,) = build.build(config)
    (directory / "build_config.json").unlink()
    with pytest.raises(ValueError, match=r"without a record of its build inputs"):
        build.build(config)


# ----------------------------------------------------------------------------- 4. configs, NaN


@pytest.mark.parametrize(
    ("section", "name", "value", "message"),
    [
        ("checkpoint", "keep", 0, r"config\.checkpoint\.keep=0; expected >= 1"),
        ("loss", "temperature", 0.0, r"config\.loss\.temperature=0\.0; expected .* > 0"),
        ("loss", "temperature", -0.05, r"config\.loss\.temperature=-0\.05"),
        ("loss", "temperature", float("nan"), r"config\.loss\.temperature=nan"),
        ("optimizer", "lr", 0.0, r"config\.optimizer\.lr=0\.0"),
        ("optimizer", "lr", float("inf"), r"config\.optimizer\.lr=inf"),
        ("optimizer", "b2", 1.0, r"config\.optimizer\.b2=1\.0; expected .*in \[0, 1\)"),
        ("optimizer", "eps", 0.0, r"config\.optimizer\.eps=0\.0"),
        ("optimizer", "warmup_steps", -1, r"config\.optimizer\.warmup_steps=-1"),
        ("optimizer", "grad_clip", -1.0, r"config\.optimizer\.grad_clip=-1\.0"),
        ("lora", "rank", 0, r"config\.lora\.rank=0; expected >= 1"),
    ],
)
def test_configs_that_lose_data_or_cannot_train_are_refused(section, name, value, message):
    config = small_config()
    config.lora.enabled = True
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_reference_recipes_stay_valid():
    """The shipped configs pass the stricter checks (the checks refuse only broken values)."""
    from metaembed_jax.training.recipes import load_recipe

    for spec in ("configs/demo.py", "configs/demo.py:single", "configs/qwen2_5_vl_7b.py"):
        validate_config(load_recipe(REPO / spec))


class NaNImagesFrom(RandomBatches):
    """Random batches whose images turn NaN from batch `bad_index` on (a diverging run)."""

    def __init__(self, bad_index: int):
        super().__init__(0, image_every=2)
        self.bad_index = bad_index

    def __next__(self):
        index = self.index
        batch = super().__next__()
        if index >= self.bad_index:
            batch["positive"]["pixel_values"] = np.full_like(
                batch["positive"]["pixel_values"], np.nan
            )
        return batch


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    config = small_config()
    config.train.steps = 6
    config.checkpoint.every = 2
    with pytest.raises(loop.NonFiniteLossError, match=r"not finite at step 3.*step 2\) is kept"):
        loop.train(config, tmp_path, train_iterator=NaNImagesFrom(bad_index=2))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2]
    assert all(np.isfinite(row["loss"]) for row in logged)
    mesh = loop.sharding.make_mesh(config.mesh)
    from metaembed_jax.training.model import build_model
    from metaembed_jax.training.state import create_train_state, make_optimizer

    tx, _ = make_optimizer(config.optimizer, config.train.steps)
    template = create_train_state(build_model(config, mesh=mesh), tx, lora=False, mesh=mesh)
    checkpointer = checkpointing.Checkpointer(tmp_path, async_save=False)
    try:
        assert checkpointer.latest_step() == 2
        restored, _ = checkpointer.restore(template)
    finally:
        checkpointer.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


# ----------------------------------------------------------------------------- 5. metrics resume

KILLED_RUN = """
import sys, time
from pathlib import Path
import jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
from metaembed_jax.training import loop
from tests.helpers import RandomBatches, tiny_run_config

class StallAtStep5(RandomBatches):
    # The batch of step 5 never comes: steps 1-4 are logged, then the parent kills the process.
    def __next__(self):
        if self.index == 4:
            Path(sys.argv[2]).write_text("stalled")
            time.sleep(3600)
        return super().__next__()

config = tiny_run_config(r_q=4, r_c=8)
config.loss.groups = ((1, 1, 1.0), (2, 4, 1.0), (4, 8, 1.0))
config.train.steps = 6
config.checkpoint.every = int(sys.argv[3])
loop.train(config, sys.argv[1], train_iterator=StallAtStep5(0))
"""


def kill_after_step_4(tmp_path: Path, workdir: Path, every: int) -> None:
    """Runs the tiny 6-step run in a subprocess and SIGKILLs it once step 4 is logged."""
    script = tmp_path / "killed_run.py"
    script.write_text(textwrap.dedent(KILLED_RUN))
    marker = tmp_path / "stalled"
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(workdir), str(marker), str(every)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate(timeout=60)[0]
    assert marker.exists(), output[-3000:]
    assert proc.returncode == -signal.SIGKILL


_UNINTERRUPTED: list = []


def uninterrupted_rows(config, workdir: Path) -> list[dict]:
    """The logged rows of the uninterrupted 6-step run (trained once: checkpoint.every, the only
    setting the two cases differ in, does not change what is logged)."""
    if not _UNINTERRUPTED:
        _UNINTERRUPTED.extend(loop.train(config, workdir, train_iterator=RandomBatches(0)))
    return _UNINTERRUPTED


@pytest.mark.slow
@pytest.mark.parametrize("every", [5, 3], ids=["no_checkpoint_yet", "checkpoint_at_3"])
def test_metrics_after_sigkill_and_resume_match_the_uninterrupted_run(tmp_path, every, caplog):
    """SIGKILL after step 4 (before any checkpoint, or after the one of step 3), a half-written
    last line (what a kill during the write leaves; appended here), then a resume: every step
    1-6 is logged once, with the uninterrupted run's values, and the bad line is dropped with a
    warning."""
    config = small_config()
    config.train.steps = 6
    config.checkpoint.every = every
    workdir = tmp_path / "killed"
    kill_after_step_4(tmp_path, workdir, every)
    metrics_path = workdir / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics_path.read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    with metrics_path.open("a") as f:
        f.write('{"step": 5, "lo')
    with caplog.at_level(logging.WARNING):
        loop.train(config, workdir, train_iterator=RandomBatches(0))
    full = uninterrupted_rows(config, tmp_path / "full")
    logged = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    drop = lambda row: {k: v for k, v in row.items() if k != "examples_per_s"}  # noqa: E731
    assert [drop(row) for row in logged] == [drop(row) for row in full]
    assert "dropping invalid line 5" in caplog.text


# ----------------------------------------------------------------------------- 6. budgets flag


def parse_eval_flags(*overrides: str):
    """The config as eval.py's `--config` flag (locked, overrides from argv) parses it."""
    argv = ["eval.py", f"--config={REPO / 'configs/demo.py'}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def test_budget_override_parses_through_config_flags():
    """docs/evaluation.md's override: a tuple of int pairs reaches the run; without it, the
    defaults."""
    config = parse_eval_flags("--config.eval.budgets=((1,1),(4,8))")
    assert config.eval.budgets == ((1, 1), (4, 8))
    assert runner.configured_budgets(config) == ((1, 1), (4, 8))
    assert runner.configured_budgets(parse_eval_flags()) == runner.DEFAULT_BUDGETS


# ----------------------------------------------------------------------------- 7. bad rows


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def train_file_with_bad_lines(tmp_path: Path) -> tuple[Path, Path]:
    """The 4 fixture rows, then (rows 4..8) a decompression bomb, a non-UTF-8 line, two lines
    that are JSON but not objects, and an invalid JSON line."""
    raw = copy_fixture_train(tmp_path)
    (raw / "images" / "bomb.png").write_bytes(png_claiming_size(30000, 30000))
    good = (raw / "train.jsonl").read_bytes().splitlines()
    first = json.loads(good[0])
    bad = [
        json.dumps({**first, "qry_image_path": "images/bomb.png"}).encode(),
        json.dumps({**first, "qry": "caf\u00e9"}).encode().replace(b"\\u00e9", b"\xe9"),
        b"3",
        b'["qry", "pos_text"]',
        b'{"qry": "unterminated',
    ]
    path = raw / "train.jsonl"
    path.write_bytes(b"\n".join(good + bad) + b"\n")
    return path, raw


BAD_LINES = [
    (4, r"cannot decode image .*bomb\.png.*decompression bomb"),
    (5, r"not valid UTF-8"),
    (6, r"a row must be a JSON object, got int"),
    (7, r"a row must be a JSON object, got list"),
    (8, r"invalid JSON"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_each_bad_line_raises_bad_row_error_naming_file_and_row(tmp_path, line, message):
    path, raw = train_file_with_bad_lines(tmp_path)
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join(lines[:4] + [lines[line]]) + b"\n")
    with pytest.raises(sources.BadRowError, match=rf"train\.jsonl: row 4: {message}"):
        builders.convert_mmeb_train([path], raw, tmp_path / "out")


def test_skip_bad_rows_skips_every_bad_line_and_keeps_the_good_ones(tmp_path):
    path, raw = train_file_with_bad_lines(tmp_path)
    lines = path.read_bytes().splitlines()
    good_after = json.loads(lines[1])  # a good row after the bad ones: reading goes on
    path.write_bytes(b"\n".join([*lines, json.dumps(good_after).encode()]) + b"\n")
    out = tmp_path / "out"
    log = builders.convert_mmeb_train([path], raw, out, skip_bad_rows=True)
    assert [entry["row"] for entry in log.entries] == [line for line, _ in BAD_LINES]
    report = json.loads((out / "bad_rows.json").read_text())
    assert report["count"] == len(BAD_LINES)
    source = builders.open_pairs(out)
    assert [source[i]["query_id"] for i in range(len(source))] == [
        "train:0",
        "train:1",
        "train:2",
        "train:3",
        "train:9",
    ]


def test_non_utf8_text_in_a_parquet_binary_column_is_a_bad_row(tmp_path):
    rows = pq.read_table(FIXTURES / "mmeb_train" / "train.parquet").to_pylist()
    for row in rows:  # the query texts as a binary column, the first one not UTF-8
        row["qry"] = row["qry"].encode()
    rows[0]["qry"] = b"\xffbad"
    table = pa.Table.from_pylist(rows)
    assert table.schema.field("qry").type == pa.binary()
    pq.write_table(table, tmp_path / "bin.parquet")
    with pytest.raises(sources.BadRowError, match=r"bin\.parquet: row 0: text is not valid UTF-8"):
        builders.convert_mmeb_train([tmp_path / "bin.parquet"], FIXTURES, tmp_path / "o")
    log = builders.convert_mmeb_train(
        [tmp_path / "bin.parquet"], FIXTURES, tmp_path / "p", skip_bad_rows=True
    )
    assert [entry["row"] for entry in log.entries] == [0]
    assert len(builders.open_pairs(tmp_path / "p")) == len(rows) - 1


# ----------------------------------------------------------------------------- 8. query cache


class CountingEncoder:
    """encode(items, side) -> fixed random [N, R, D] embeddings; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, items, side):
        self.calls += 1
        rng = np.random.default_rng(len(items))
        return rng.normal(size=(len(items), 3, 4)).astype(np.float32)


def query_cache(tmp_path):
    items = [{"text": f"query {i}"} for i in range(5)]
    cache = encode.EmbeddingCache(tmp_path / "cache", model_fingerprint="model@1")
    encoder = CountingEncoder()
    want = encode.encode_items(encoder, items, "query", "set", cache)
    return items, cache, encoder, want, tmp_path / "cache" / "set"


@pytest.mark.parametrize("change", ["sign_flip", "permute"])
def test_changed_query_embeddings_are_re_encoded_with_a_warning(tmp_path, change, caplog):
    items, cache, encoder, want, base = query_cache(tmp_path)
    assert encode.encode_items(encoder, items, "query", "set", cache) is not None
    assert encoder.calls == 1  # a valid cache is used
    stored = np.load(base / "query.npy")
    np.save(base / "query.npy", -stored if change == "sign_flip" else stored[::-1])
    with caplog.at_level(logging.WARNING):
        got = encode.encode_items(encoder, items, "query", "set", cache)
    assert encoder.calls == 2 and "sha256 differs" in caplog.text
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.load(base / "query.npy"), want)  # the cache is repaired


@pytest.mark.parametrize("manifest", ["{not json", "[]", ""])
def test_invalid_query_manifest_is_re_encoded(tmp_path, manifest, caplog):
    items, cache, encoder, want, base = query_cache(tmp_path)
    (base / "query_manifest.json").write_text(manifest)
    with caplog.at_level(logging.WARNING):
        got = encode.encode_items(encoder, items, "query", "set", cache)
    assert encoder.calls == 2 and "bad manifest" in caplog.text
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- 10-11. safetensors


def write_sharded(directory: Path, weight_map: dict[str, str]) -> None:
    index = {"weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_weight_map_outside_the_checkpoint_is_refused(tmp_path, where):
    """An index naming a file outside its directory is refused, naming the entry, even when that
    file exists and is a valid safetensors file."""
    outside = tmp_path / "outside.safetensors"
    save_file({"w": np.ones((2, 2), np.float32)}, str(outside))
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_file({"v": np.zeros(3, np.float32)}, str(checkpoint / "model-1.safetensors"))
    name = "../outside.safetensors" if where == "parent" else str(outside)
    write_sharded(checkpoint, {"v": "model-1.safetensors", "w": name})
    with pytest.raises(ValueError, match=r"weight_map entry 'w' -> .*outside\.safetensors"):
        hf_loading.SafetensorsReader(checkpoint)


@pytest.mark.parametrize("keep", [20, -8], ids=["header_cut", "data_cut"])
def test_truncated_safetensors_names_the_file(tmp_path, keep):
    save_file({"w": np.arange(64, dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated"):
        hf_loading.SafetensorsReader(tmp_path)
