"""grain pipeline: exact resume, disjoint process shards, processor parity, global arrays.

References: the processor applied directly to the records (numpy), the split's record list, and
the host batches of the same pipeline for the global arrays.
"""

import io
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from metaembed_jax.data import builders, pipeline
from metaembed_jax.data.config import get_data_config
from metaembed_jax.data.tokenizer import train_tokenizer
from metaembed_jax.models import qwen2_vl
from metaembed_jax.models.processing import BadRowError, decode_image
from tests.helpers import iterate_features

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
    train_tokenizer(texts * 5, root / "tokenizer", qwen2_vl.FAMILY.special_tokens, vocab_size=300)
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
    return qwen2_vl.make_processor(data_config)


def train_iterator(data_config, processor, **kwargs):
    """The pipeline's training iterator for the Qwen2-VL family."""
    return pipeline.make_train_iterator(data_config, processor, family=qwen2_vl.FAMILY, **kwargs)


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
    iterator = train_iterator(data_config, processor, **kwargs)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 4)
    resumed = train_iterator(data_config, processor, **kwargs)
    resumed.set_state(state)
    assert_trees_equal(take(resumed, 4), expected)
    for it in (iterator, resumed):
        it.close()


def test_epochs_are_seeded_permutations(data_config, processor):
    """Each epoch visits every record once, in a seed-dependent order that changes per epoch."""
    iterator = train_iterator(data_config, processor, mesh=None, global_batch_size=4, seed=1)
    order = [i for batch in take(iterator, 10) for i in query_indices(batch, processor)]
    first, second = order[:NUM_RECORDS], order[NUM_RECORDS:]
    assert sorted(first) == sorted(second) == list(range(NUM_RECORDS))
    assert first != second and first != sorted(first)
    again = train_iterator(data_config, processor, mesh=None, global_batch_size=4, seed=1)
    assert [i for b in take(again, 5) for i in query_indices(b, processor)] == first
    other = train_iterator(data_config, processor, mesh=None, global_batch_size=4, seed=2)
    assert [i for b in take(other, 5) for i in query_indices(b, processor)] != first


def test_two_processes_see_disjoint_shards_covering_the_split(data_config, processor):
    """Shard 0/2 and 1/2 (global batch 4 -> 2 per process): disjoint, together the split."""
    seen = []
    for index in range(2):
        iterator = train_iterator(
            data_config, processor, mesh=None, global_batch_size=4, seed=3,
            process_index=index, process_count=2,
        )  # fmt: skip
        indices = [i for b in take(iterator, NUM_RECORDS // 4) for i in query_indices(b, processor)]
        assert len(indices) == len(set(indices)) == NUM_RECORDS // 2
        seen.append(set(indices))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_RECORDS))


@pytest.mark.parametrize("layout", ["per_example", "packed"])
def test_batch_equals_processor_on_records(data_config, layout):
    """Each side of a batch = processor(texts, images, side) on the batch's records, with
    pixel_values / image_grid_thw zero-padded to the static shapes of the image layout."""
    config = data_config.copy_and_resolve_references()
    config.image_layout = layout
    processor = qwen2_vl.make_processor(config)
    assert processor.image_layout == layout
    iterator = train_iterator(config, processor, mesh=None, global_batch_size=4, seed=0)
    batch = take(iterator, 1)[0]
    source = builders.open_pairs(pipeline.dataset_dir(config))
    records = [source[i] for i in query_indices(batch, processor)]
    per_image = 56 * 56 // 14**2  # patches of a max_pixels image (max_images = 1)
    for name, side in (("query", "query"), ("positive", "candidate"), ("negative", "candidate")):
        texts = [r[f"{name}_text"] for r in records]
        images = [[decode_image(r[f"{name}_image"])] if r[f"{name}_image"] else [] for r in records]
        expected = processor(texts, images if any(images) else None, side=side)
        got = batch[name]
        np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
        if layout == "per_example":  # one block per example: [B, P_ex, D], [B, max_images, 3]
            assert got["pixel_values"].shape == (4, per_image, 3 * 2 * 14 * 14)
            assert got["image_grid_thw"].shape == (4, 1, 3)
            grid = expected.get("image_grid_thw", np.zeros((4, 0, 3), np.int32))
            pixels = expected.get("pixel_values", np.zeros((4, 0, 3 * 2 * 14 * 14)))
        else:  # one block for the batch: [batch * max_images * per_image, D], [4, 3]
            assert got["pixel_values"].shape == (4 * per_image, 3 * 2 * 14 * 14)
            assert got["image_grid_thw"].shape == (4, 3)
            grid = expected.get("image_grid_thw", np.zeros((0, 3), np.int32))[None]
            pixels = expected.get("pixel_values", np.zeros((0, 3 * 2 * 14 * 14)))[None]
            got = {k: v[None] for k, v in got.items()}
        for b in range(len(grid)):
            real = int(np.prod(grid[b], axis=-1).sum())
            np.testing.assert_array_equal(got["image_grid_thw"][b, : len(grid[b])], grid[b])
            assert not got["image_grid_thw"][b, len(grid[b]) :].any()
            np.testing.assert_array_equal(got["pixel_values"][b, :real], pixels[b, :real])
            assert not got["pixel_values"][b, real:].any()
    assert not batch["negative"]["image_grid_thw"].any()  # text-only side: all-zero, same shapes


def test_static_shapes_refuse_the_other_layout(data_config):
    """Per-example static shapes given packed features (or the reverse): a ValueError naming
    the layout and the fix, not a silent mis-read."""
    config = data_config.copy_and_resolve_references()
    config.image_layout = "packed"
    packed = qwen2_vl.make_processor(config)
    features = packed(["a", ""], [[], [Image.new("RGB", (28, 28))]])
    with pytest.raises(ValueError, match="image_layout='per_example' needs 3 dims"):
        qwen2_vl.FAMILY.static_shapes(data_config, 2)(features)
    per_example = qwen2_vl.make_processor(data_config)
    features = per_example(["a", ""], [[], [Image.new("RGB", (28, 28))]])
    with pytest.raises(ValueError, match="image_layout='packed' needs 2 dims"):
        qwen2_vl.FAMILY.static_shapes(config, 2)(features)
    config.image_layout = "ragged"
    with pytest.raises(ValueError, match="image_layout='ragged': expected one of"):
        qwen2_vl.FAMILY.static_shapes(config, 2)


def test_several_processes_pad_to_the_largest_buckets(data_config, processor):
    """With process_count > 1 each process pads to the largest length and patch bucket (the
    processes cannot agree on a bucket per step), left padding preserved."""
    config = data_config.copy_and_resolve_references()
    config.patch_buckets = (4, 8, 16)
    several = train_iterator(
        config, processor, mesh=None, global_batch_size=4, seed=0, process_index=0,
        process_count=2,
    )  # fmt: skip
    batch = take(several, 1)[0]
    source = builders.open_pairs(pipeline.dataset_dir(config))
    records = [source[i] for i in query_indices(batch, processor)]
    for name in ("query", "positive", "negative"):
        assert batch[name]["input_ids"].shape[1] == 32  # largest of length_buckets (16, 32)
        assert batch[name]["pixel_values"].shape[1] == 16
    # Negatives are short texts: the processor picks bucket 16, the pipeline left-pads to 32.
    expected = processor([r["negative_text"] for r in records], None, side="candidate")
    length = expected["input_ids"].shape[1]
    assert length == 16
    got = batch["negative"]
    np.testing.assert_array_equal(got["input_ids"][:, -length:], expected["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"][:, -length:], expected["attention_mask"])
    assert (got["input_ids"][:, :-length] == processor.pad_token_id).all()
    assert not got["attention_mask"][:, :-length].any()
    several.close()


def test_global_arrays_on_8_device_mesh(data_config, processor):
    """On a (data=4, fsdp=2) mesh every leaf is a global jax.Array split over both batch axes,
    equal to the host batch, each device holding its rows."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    iterator = train_iterator(data_config, processor, mesh=mesh, global_batch_size=8, seed=5)
    batch = next(iterator)
    host = pipeline.build_train_dataset(
        builders.open_pairs(pipeline.dataset_dir(data_config)), processor, data_config,
        family=qwen2_vl.FAMILY, local_batch_size=8, seed=5, shard_index=0, shard_count=1,
        multiple=8,
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
    iterator = train_iterator(
        data_config, processor, mesh=None, global_batch_size=1, seed=0, source=source
    )
    with pytest.raises(
        BadRowError, match=r"split='train'\): record 0: cannot decode positive_image"
    ):
        next(iterator)


def test_missing_negative_is_an_error_unless_disabled(data_config, processor, tmp_path):
    """hard_negatives=True with a row lacking a negative raises; hard_negatives=False drops the
    negative side entirely."""
    row = {**record(0), "negative_text": "", "negative_image": b""}
    builders.write_pairs(tmp_path, {"train": [("0", row)]})
    source = builders.open_pairs(tmp_path)
    kwargs = dict(mesh=None, global_batch_size=1, seed=0, source=source)
    with pytest.raises(BadRowError, match="record 0: negative has an empty text and no image"):
        next(train_iterator(data_config, processor, **kwargs))
    config = data_config.copy_and_resolve_references()
    config.hard_negatives = False
    batch = next(train_iterator(config, processor, **kwargs))
    assert set(batch) == {"query", "positive"}


def test_batch_size_must_split_over_processes_and_devices(data_config, processor):
    """Indivisible batch sizes are refused with the numbers named."""
    with pytest.raises(ValueError, match="global_batch_size=5 not divisible by 2 processes"):
        train_iterator(
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
        train_iterator(data_config, processor, mesh=mesh, global_batch_size=4, seed=0)


def test_iterate_features_for_evaluation(data_config, processor):
    """5 items in batches of 2 -> 3 full batches (last padded by repetition), num_valid 2, 2, 1,
    rows equal to the processor on the items."""
    items = [{"text": f"caption {i}", "image": png(i) if i % 2 else b""} for i in range(5)]
    out = list(iterate_features(items, processor, "candidate", 2, data_config))
    assert [valid for _, valid in out] == [2, 2, 1]
    for start, (features, _) in zip(range(0, 5, 2), out, strict=True):
        chunk = items[start : start + 2]
        chunk += [chunk[-1]] * (2 - len(chunk))
        images = [[decode_image(i["image"])] if i["image"] else [] for i in chunk]
        expected = processor([i["text"] for i in chunk], images, side="candidate")
        np.testing.assert_array_equal(features["input_ids"], expected["input_ids"])
        assert features["image_grid_thw"].shape == (2, 1, 3)  # per example: [B, max_images, 3]
        assert features["pixel_values"].shape == (2, 16, 3 * 2 * 14 * 14)


@pytest.mark.slow
def test_worker_process_gives_the_same_batches(data_config, processor):
    """num_workers=1 (a grain worker process runs decoding + processing): the same batches as
    in the main process, and a JSON-able state."""
    kwargs = dict(mesh=None, global_batch_size=4, seed=11)
    expected = take(train_iterator(data_config, processor, **kwargs), 3)
    config = data_config.copy_and_resolve_references()
    config.num_workers = 1
    iterator = train_iterator(config, processor, **kwargs)
    assert_trees_equal(take(iterator, 3), expected)
    json.dumps(iterator.get_state())
    iterator.close()


def test_text_only_data_and_multiprocess_image_guard(data_config, processor, monkeypatch):
    """max_images=0: text batches carry no image arrays and an image is refused; with several
    JAX processes, packed image inputs are refused (per-process patch blocks would mis-align),
    per-example ones accepted."""
    config = data_config.copy_and_resolve_references()
    config.max_images = 0
    items = [{"text": "caption 1"}, {"text": "caption 2"}]
    ((features, _),) = iterate_features(items, processor, "query", 2, config)
    assert set(features) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="has images but config.data.max_images=0"):
        list(iterate_features([{"text": "", "image": png(1)}], processor, "query", 1, config))
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    packed = data_config.copy_and_resolve_references()
    packed.image_layout = "packed"
    with pytest.raises(ValueError, match="2 processes with image inputs.*need config.data"):
        train_iterator(packed, processor, mesh=mesh, global_batch_size=16, seed=0, process_index=0)
    assert pipeline._check_batch(data_config, mesh, 16, 2) == (8, 4)


# ----------------------------------------------------------------------------- two real processes

_PROCESS_SCRIPT = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, index, data_dir, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)
import numpy as np
from jax.sharding import Mesh
from metaembed_jax.data import pipeline
from metaembed_jax.models import qwen2_vl
from metaembed_jax.data.config import get_data_config
config = get_data_config()
config.update(dir=data_dir, min_pixels=28 * 28, max_pixels=56 * 56, length_buckets=(16, 32),
              read_threads=1)
processor = qwen2_vl.make_processor(config)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
iterator = pipeline.make_train_iterator(
    config, processor, family=qwen2_vl.FAMILY, mesh=mesh, global_batch_size=8, seed=4
)
saved = {}
for step in range(2):
    batch = next(iterator)
    for side in ("query", "positive"):
        for key, array in batch[side].items():
            shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
            name = f"{step}/{side}/{key}"
            saved[name] = np.concatenate([np.asarray(s.data) for s in shards])
            saved[name + "/starts"] = np.array(sorted({s.index[0].start for s in shards}))
            saved[name + "/shape"] = np.array(array.shape)
            saved[name + "/spec"] = np.array(repr(tuple(array.sharding.spec)))
np.savez(f"{out_dir}/{index}.npz", **saved)
iterator.close()
"""


@pytest.mark.slow
def test_two_jax_processes_build_global_batches(
    data_config, processor, tmp_path, run_two_processes
):
    """Two real JAX processes (gloo, 4 CPU devices each) on mixed text / image data: every
    global array of a step (input_ids [8, L], per-example pixel_values [8, P_ex, D],
    image_grid_thw [8, 1, 3]) is sharded over (data, fsdp), each process holds exactly its own
    rows, and those rows equal the simulated shard i/2 of the same pipeline."""
    mixed_dir = tmp_path / "mixed"
    rows = [(str(i), record(i)) for i in range(16)]  # even: text -> image, odd: image -> text
    builders.write_pairs(mixed_dir / "synthetic", {"train": rows})
    (mixed_dir / "tokenizer").symlink_to(Path(data_config.dir) / "tokenizer")
    run_two_processes(_PROCESS_SCRIPT, mixed_dir, tmp_path, timeout=300)
    config = data_config.copy_and_resolve_references()
    config.update(dir=str(mixed_dir))
    for index in range(2):
        got = np.load(tmp_path / f"{index}.npz")
        simulated = train_iterator(
            config, processor, mesh=None, global_batch_size=8, seed=4,
            process_index=index, process_count=2,
        )  # fmt: skip
        for step in range(2):
            expected = next(simulated)
            images = 0
            for side in ("query", "positive"):
                assert set(expected[side]) == {
                    "input_ids", "attention_mask", "pixel_values", "image_grid_thw"
                }  # fmt: skip
                for key, rows_expected in expected[side].items():
                    name = f"{step}/{side}/{key}"
                    assert tuple(got[name + "/shape"]) == (8, *rows_expected.shape[1:])
                    assert str(got[name + "/spec"]) == "(('data', 'fsdp'),)"
                    assert list(got[name + "/starts"]) == [4 * index + r for r in range(4)]
                    np.testing.assert_array_equal(got[name], rows_expected)
                images += int(expected[side]["image_grid_thw"].any(-1).sum())
            assert images == 4  # each of the 4 rows: an image query or an image positive
        simulated.close()
