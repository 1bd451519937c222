"""grain pipeline: exact resume, disjoint process shards, processor parity, global arrays.

References: the processor applied directly to the records (numpy), the split's record list, and
the host batches of the same pipeline for the global arrays.
"""

import io
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from metaembed_jax.data import builders, pipeline, sources
from metaembed_jax.data.config import get_data_config
from metaembed_jax.data.tokenizer import train_tokenizer

tfds.disable_progress_bar()
NUM_RECORDS = 20
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def png(index: int, size: int = 28) -> bytes:
    image = Image.new("RGB", (size, size), COLOURS[index % 4])
    image.putpixel((index % size, 3), (0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def record(index: int) -> dict:
    """Mixed modalities: even queries are text -> image, odd ones image -> text."""
    text_query = index % 2 == 0
    return {
        "query_text": f"query {index}" if text_query else "",
        "query_image": b"" if text_query else png(index, 56),
        "positive_text": "" if text_query else f"caption {index}",
        "positive_image": png(index) if text_query else b"",
        "negative_text": f"other {index}",
        "negative_image": b"",
        "task": "t2i" if text_query else "i2t",
        "query_id": f"q{index}",
        "positive_id": f"p{index}",
        "negative_id": f"n{index}",
    }


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    records = [(str(i), record(i)) for i in range(NUM_RECORDS)]
    builders.write_pairs(root / "synthetic", {"train": records})
    texts = [
        r["query_text"] + " " + r["positive_text"] + " " + r["negative_text"] for _, r in records
    ]
    train_tokenizer(texts * 5, root / "tokenizer", vocab_size=300)
    config = get_data_config()
    config.dir = str(root)
    config.min_pixels = 28 * 28
    config.max_pixels = 56 * 56
    config.length_buckets = (16, 32)
    config.read_threads = 1
    config.prefetch = 1
    return config


@pytest.fixture(scope="module")
def processor(data_config):
    return pipeline.processor_from_config(data_config)


def query_indices(batch, processor) -> list[int]:
    """Record indices in a batch, read back from the (unique) negative texts."""
    texts = processor.tokenizer.batch_decode(np.asarray(batch["negative"]["input_ids"]))
    return [int(text.split("other ")[1].split("<")[0]) for text in texts]


def take(iterator, count):
    return [jax.tree.map(np.asarray, next(iterator)) for _ in range(count)]


def assert_trees_equal(left, right):
    assert jax.tree.structure(left) == jax.tree.structure(right)
    for a, b in zip(jax.tree.leaves(left), jax.tree.leaves(right), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_mid_epoch_gives_identical_batches(data_config, processor):
    """State saved after 3 batches (JSON round trip) -> the next 4 batches, across the epoch
    boundary, equal those of the uninterrupted run."""
    kwargs = dict(mesh=None, global_batch_size=4, seed=7)
    iterator = pipeline.make_train_iterator(data_config, processor, **kwargs)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 4)
    resumed = pipeline.make_train_iterator(data_config, processor, **kwargs)
    resumed.set_state(state)
    assert_trees_equal(take(resumed, 4), expected)
    for it in (iterator, resumed):
        it.close()


def test_epochs_are_seeded_permutations(data_config, processor):
    """Each epoch visits every record once, in a seed-dependent order that changes per epoch."""
    iterator = pipeline.make_train_iterator(
        data_config, processor, mesh=None, global_batch_size=4, seed=1
    )
    order = [i for batch in take(iterator, 10) for i in query_indices(batch, processor)]
    first, second = order[:NUM_RECORDS], order[NUM_RECORDS:]
    assert sorted(first) == sorted(second) == list(range(NUM_RECORDS))
    assert first != second and first != sorted(first)
    again = pipeline.make_train_iterator(
        data_config, processor, mesh=None, global_batch_size=4, seed=1
    )
    assert [i for b in take(again, 5) for i in query_indices(b, processor)] == first
    other = pipeline.make_train_iterator(
        data_config, processor, mesh=None, global_batch_size=4, seed=2
    )
    assert [i for b in take(other, 5) for i in query_indices(b, processor)] != first


def test_two_processes_see_disjoint_shards_covering_the_split(data_config, processor):
    """Shard 0/2 and 1/2 (global batch 4 -> 2 per process): disjoint, together the split."""
    seen = []
    for index in range(2):
        iterator = pipeline.make_train_iterator(
            data_config, processor, mesh=None, global_batch_size=4, seed=3,
            process_index=index, process_count=2,
        )  # fmt: skip
        indices = [i for b in take(iterator, NUM_RECORDS // 4) for i in query_indices(b, processor)]
        assert len(indices) == len(set(indices)) == NUM_RECORDS // 2
        seen.append(set(indices))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_RECORDS))


def test_batch_equals_processor_on_records(data_config, processor):
    """Each side of a batch = processor(texts, images, side) on the batch's records, with
    pixel_values / image_grid_thw zero-padded to the static shapes."""
    iterator = pipeline.make_train_iterator(
        data_config, processor, mesh=None, global_batch_size=4, seed=0
    )
    batch = take(iterator, 1)[0]
    source = builders.open_pairs(pipeline.dataset_dir(data_config))
    records = [source[i] for i in query_indices(batch, processor)]
    patch_rows = 4 * (56 * 56 // 14**2)  # batch * max_images * patches of a max_pixels image
    for name, side in (("query", "query"), ("positive", "candidate"), ("negative", "candidate")):
        texts = [r[f"{name}_text"] for r in records]
        images = [
            [sources.decode_png(r[f"{name}_image"])] if r[f"{name}_image"] else [] for r in records
        ]
        expected = processor(texts, images if any(images) else None, side=side)
        got = batch[name]
        np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
        assert got["pixel_values"].shape == (patch_rows, 3 * 2 * 14 * 14)
        assert got["image_grid_thw"].shape == (4, 3)
        grid = expected.get("image_grid_thw", np.zeros((0, 3), np.int32))
        real = int(np.prod(grid, axis=-1).sum())
        np.testing.assert_array_equal(got["image_grid_thw"][: len(grid)], grid)
        assert not got["image_grid_thw"][len(grid) :].any()
        if real:
            np.testing.assert_array_equal(
                got["pixel_values"][:real], expected["pixel_values"][:real]
            )
        assert not got["pixel_values"][real:].any()
    assert not batch["negative"]["image_grid_thw"].any()  # text-only side: all-zero, same shapes


def test_global_arrays_on_8_device_mesh(data_config, processor):
    """On a (data=4, fsdp=2) mesh every leaf is a global jax.Array split over both batch axes,
    equal to the host batch, each device holding its rows."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    iterator = pipeline.make_train_iterator(
        data_config, processor, mesh=mesh, global_batch_size=8, seed=5
    )
    batch = next(iterator)
    host = pipeline.build_train_dataset(
        builders.open_pairs(pipeline.dataset_dir(data_config)), processor, data_config,
        local_batch_size=8, seed=5, shard_index=0, shard_count=1, multiple=8,
    )  # fmt: skip
    expected = next(iter(host))
    assert jax.tree.structure(batch) == jax.tree.structure(expected)
    expected_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    for array, reference in zip(jax.tree.leaves(batch), jax.tree.leaves(expected), strict=True):
        assert isinstance(array, jax.Array) and array.sharding.is_equivalent_to(
            expected_sharding, array.ndim
        )
        np.testing.assert_array_equal(np.asarray(array), reference)
        rows = len(reference) // 8
        for shard in array.addressable_shards:
            assert shard.data.shape[0] == rows
            np.testing.assert_array_equal(np.asarray(shard.data), reference[shard.index])
    assert batch["query"]["pixel_values"].shape[0] % 8 == 0


def test_undecodable_image_names_record(data_config, processor, tmp_path):
    """A corrupt PNG in a built split -> BadRowError naming the split, record and field."""
    bad = {**record(0), "positive_image": b"\x89PNG\r\n\x1a\ngarbage"}
    builders.write_pairs(tmp_path, {"train": [("0", bad)]})
    source = builders.open_pairs(tmp_path)
    iterator = pipeline.make_train_iterator(
        data_config, processor, mesh=None, global_batch_size=1, seed=0, source=source
    )
    with pytest.raises(
        sources.BadRowError, match=r"split='train'\): record 0: cannot decode positive_image"
    ):
        next(iterator)


def test_missing_negative_is_an_error_unless_disabled(data_config, processor, tmp_path):
    """hard_negatives=True with a row lacking a negative raises; hard_negatives=False drops the
    negative side entirely."""
    row = {**record(0), "negative_text": "", "negative_image": b""}
    builders.write_pairs(tmp_path, {"train": [("0", row)]})
    source = builders.open_pairs(tmp_path)
    kwargs = dict(mesh=None, global_batch_size=1, seed=0, source=source)
    with pytest.raises(
        sources.BadRowError, match="record 0: negative has an empty text and no image"
    ):
        next(pipeline.make_train_iterator(data_config, processor, **kwargs))
    config = data_config.copy_and_resolve_references()
    config.hard_negatives = False
    batch = next(pipeline.make_train_iterator(config, processor, **kwargs))
    assert set(batch) == {"query", "positive"}


def test_batch_size_must_split_over_processes_and_devices(data_config, processor):
    """Indivisible batch sizes are refused with the numbers named."""
    with pytest.raises(ValueError, match="global_batch_size=5 not divisible by 2 processes"):
        pipeline.make_train_iterator(
            data_config,
            processor,
            mesh=None,
            global_batch_size=5,
            seed=0,
            process_index=0,
            process_count=2,
        )
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    with pytest.raises(ValueError, match="per-process batch 4 not divisible by its 8 batch shards"):
        pipeline.make_train_iterator(data_config, processor, mesh=mesh, global_batch_size=4, seed=0)


def test_iterate_features_for_evaluation(data_config, processor):
    """5 items in batches of 2 -> 3 full batches (last padded by repetition), num_valid 2, 2, 1,
    rows equal to the processor on the items."""
    items = [{"text": f"caption {i}", "image": png(i) if i % 2 else b""} for i in range(5)]
    out = list(pipeline.iterate_features(items, processor, "candidate", 2, data_config))
    assert [valid for _, valid in out] == [2, 2, 1]
    for start, (features, _) in zip(range(0, 5, 2), out, strict=True):
        chunk = items[start : start + 2]
        chunk += [chunk[-1]] * (2 - len(chunk))
        images = [[sources.decode_png(i["image"])] if i["image"] else [] for i in chunk]
        expected = processor([i["text"] for i in chunk], images, side="candidate")
        np.testing.assert_array_equal(features["input_ids"], expected["input_ids"])
        assert features["image_grid_thw"].shape == (2, 3)


@pytest.mark.slow
def test_worker_process_gives_the_same_batches(data_config, processor):
    """num_workers=1 (a grain worker process runs decoding + processing): the same batches as
    in the main process, and a JSON-able state."""
    kwargs = dict(mesh=None, global_batch_size=4, seed=11)
    expected = take(pipeline.make_train_iterator(data_config, processor, **kwargs), 3)
    config = data_config.copy_and_resolve_references()
    config.num_workers = 1
    iterator = pipeline.make_train_iterator(config, processor, **kwargs)
    assert_trees_equal(take(iterator, 3), expected)
    json.dumps(iterator.get_state())
    iterator.close()


def test_text_only_data_and_multiprocess_image_guard(data_config, processor, monkeypatch):
    """max_images=0: text batches carry no image arrays and an image is refused; with several
    JAX processes, image inputs are refused (per-process patch blocks would mis-align)."""
    config = data_config.copy_and_resolve_references()
    config.max_images = 0
    items = [{"text": "caption 1"}, {"text": "caption 2"}]
    ((features, _),) = pipeline.iterate_features(items, processor, "query", 2, config)
    assert set(features) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="has images but config.data.max_images=0"):
        list(
            pipeline.iterate_features(
                [{"text": "", "image": png(1)}], processor, "query", 1, config
            )
        )
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    with pytest.raises(ValueError, match="2 processes with image inputs"):
        pipeline.make_train_iterator(
            data_config, processor, mesh=mesh, global_batch_size=16, seed=0, process_index=0
        )


# ----------------------------------------------------------------------------- two real processes

_PROCESS_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, index, data_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)
import numpy as np
from jax.sharding import Mesh
from metaembed_jax.data import pipeline
from metaembed_jax.data.config import get_data_config
config = get_data_config()
config.update(dir=data_dir, max_images=0, length_buckets=(16, 32), read_threads=1)
processor = pipeline.processor_from_config(config)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
iterator = pipeline.make_train_iterator(config, processor, mesh=mesh, global_batch_size=8, seed=4)
batches = []
for _ in range(2):
    batch = next(iterator)
    array = batch["query"]["input_ids"]
    local = np.concatenate([np.asarray(s.data) for s in sorted(
        array.addressable_shards, key=lambda s: s.index[0].start)])
    starts = sorted({s.index[0].start for s in array.addressable_shards})
    batches.append({"shape": list(array.shape), "starts": starts, "local": local.tolist(),
                    "spec": [list(axes) for axes in array.sharding.spec]})
json.dump(batches, open(out, "w"))
iterator.close()
"""


@pytest.mark.slow
def test_two_jax_processes_build_global_batches(data_config, processor, tmp_path):
    """Two real JAX processes (gloo, 4 CPU devices each, text-only data): each step's global
    input_ids [8, L] is sharded over (data, fsdp), each process holds exactly its own rows, and
    those rows equal the simulated shard i/2 of the same pipeline."""
    import socket
    import subprocess
    import sys

    text_dir = tmp_path / "text"
    rows = [
        (str(i), {**record(i), "query_text": f"query {i}", "query_image": b""}) for i in range(16)
    ]
    rows = [(k, {**r, "positive_text": f"caption {k}", "positive_image": b""}) for k, r in rows]
    builders.write_pairs(text_dir / "synthetic", {"train": rows})
    (text_dir / "tokenizer").symlink_to(Path(data_config.dir) / "tokenizer")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "process.py"
    script.write_text(_PROCESS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(port), str(i), text_dir, tmp_path / f"{i}.json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]  # fmt: skip
    for proc in procs:
        output = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, output[-3000:]
    config = data_config.copy_and_resolve_references()
    config.update(dir=str(text_dir), max_images=0)
    for index in range(2):
        got = json.loads((tmp_path / f"{index}.json").read_text())
        simulated = pipeline.make_train_iterator(
            config, processor, mesh=None, global_batch_size=8, seed=4,
            process_index=index, process_count=2,
        )  # fmt: skip
        for step in got:
            expected = next(simulated)["query"]["input_ids"]
            assert step["shape"][0] == 8 and step["spec"] == [["data", "fsdp"]]
            assert step["starts"] == [4 * index + r for r in range(4)]
            np.testing.assert_array_equal(np.asarray(step["local"]), expected)
