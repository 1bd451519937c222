"""Index faults: concurrent writers, non-finite vectors, duplicate ids, ids beyond int64,
manifests that name files outside the index directory or lack fields, shapes that disagree with
their files."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from metaembed_jax.retrieval.index import MultiVectorIndex, quantize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unit(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- two writers

_WRITER = """
import os, sys, time
import numpy as np
sys.path.insert(0, sys.argv[4])
from metaembed_jax.retrieval.index import MultiVectorIndex
path, writer, saves = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
index = MultiVectorIndex.build(
    np.random.default_rng(writer).standard_normal((40 + 25 * writer, 4, 8)).astype(np.float32),
    ids=[f"w{writer}-{i}" for i in range(40 + 25 * writer)],
    dtype=("bfloat16", "int8")[writer],
)
open(f"{path}.ready{writer}", "w").close()
while not os.path.exists(f"{path}.go"):
    time.sleep(0.001)
for _ in range(saves):
    index.save(path, shard_rows=7)
"""


def _writer_index(writer):
    count = 40 + 25 * writer
    embeddings = np.random.default_rng(writer).standard_normal((count, 4, 8)).astype(np.float32)
    return MultiVectorIndex.build(
        embeddings, ids=[f"w{writer}-{i}" for i in range(count)], dtype=("bfloat16", "int8")[writer]
    )


def test_two_processes_saving_to_one_path_leave_one_readable_index(tmp_path):
    """Two real processes save different indexes to one path at the same moment, 6 times each,
    in 3 trials: both exit 0, the index then verifies and equals one writer's, no shard file is
    left behind, and files the saves did not write (a user's, even one named like a shard)
    survive."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    want = [_writer_index(0), _writer_index(1)]
    for trial in range(3):
        path = tmp_path / f"index{trial}"
        path.mkdir()
        user_files = [path / "notes.txt", path / "vectors-00ff-0.bin"]
        for user_file in user_files:
            user_file.write_text("mine")
        writers = [
            subprocess.Popen(
                [sys.executable, str(script), str(path), str(w), "6", REPO],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for w in range(2)
        ]
        deadline = time.time() + 300
        while not all(os.path.exists(f"{path}.ready{w}") for w in range(2)):
            assert time.time() < deadline and all(p.poll() is None for p in writers), [
                p.communicate()[0][-2000:] for p in writers if p.poll() is not None
            ]
            time.sleep(0.01)
        open(f"{path}.go", "w").close()
        for writer in writers:
            output = writer.communicate(timeout=300)[0]
            assert writer.returncode == 0, output[-3000:]
        loaded = MultiVectorIndex.load(path)  # verifies every checksum
        winner = want[0] if loaded.ids == want[0].ids else want[1]
        assert loaded.ids == winner.ids and loaded.dtype == winner.dtype
        np.testing.assert_array_equal(loaded.embeddings(), winner.embeddings())
        assert all(f.read_text() == "mine" for f in user_files)
        manifest = json.loads((path / "manifest.json").read_text())
        named = {e[kind]["file"] for e in manifest["shards"] for kind in e}
        others = {p.name for p in path.iterdir()} - named
        assert others == {"manifest.json", ".lock", "notes.txt", "vectors-00ff-0.bin"}, others


# ----------------------------------------------------------------------------- bad vectors and ids


def test_non_finite_vectors_are_rejected_where_they_enter(tmp_path):
    rng = np.random.default_rng(0)
    candidates, queries = unit(rng, (10, 4, 8)), unit(rng, (3, 2, 8))
    bad = candidates.copy()
    bad[3, 2, 5] = np.nan
    for dtype in ("float32", "bfloat16", "int8"):
        with pytest.raises(ValueError, match="candidate 3 .*NaN or inf"):
            MultiVectorIndex.build(bad, dtype=dtype)
    with pytest.raises(ValueError, match="candidate 3 .*NaN or inf"):
        quantize(bad, "int8")  # int8 never stores NaN
    index = MultiVectorIndex.build(candidates, dtype="int8")
    infinite = candidates[:2].copy()
    infinite[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match="candidate 1 .*NaN or inf"):
        index.add(infinite)
    assert len(index) == 10  # the failed add changed nothing
    bad_queries = queries.copy()
    bad_queries[1, 1, 1] = -np.inf
    with pytest.raises(ValueError, match="query 1 contains NaN or inf"):
        index.search(bad_queries, (1, 1), k=3)
    bad_queries[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="query 1 contains NaN or inf"):
        index.search(bad_queries, (1, 1), k=3)


def test_duplicate_ids_are_rejected_in_build_and_add():
    candidates = unit(np.random.default_rng(1), (4, 2, 8))
    with pytest.raises(ValueError, match="duplicate id 'a' \\(row 2\\): already earlier"):
        MultiVectorIndex.build(candidates[:3], ids=["a", "b", "a"])
    index = MultiVectorIndex.build(candidates[:2], ids=[2, "x"])
    with pytest.raises(ValueError, match="duplicate id 'x' \\(row 1\\): already in the index"):
        index.add(candidates[2:], ids=["y", "x"])
    with pytest.raises(ValueError, match="duplicate id 2 \\(row 0\\): already in the index"):
        index.add(candidates[2:3])  # the default id is its position, 2: taken
    assert index.ids == [2, "x"]
    index.add(candidates[2:], ids=["y", 3])
    assert index.ids == [2, "x", "y", 3]


def test_int_ids_beyond_int64_are_refused_where_they_enter(tmp_path):
    """An id >= 2**63 was accepted and every search then crashed with OverflowError (issue 36,
    case 12): `build` and `add` refuse it naming the id and row, a manifest holding one is
    refused on load; the int64 limits themselves work end to end."""
    candidates = unit(np.random.default_rng(3), (4, 2, 8))
    with pytest.raises(ValueError, match=r"id 9223372036854775808 \(row 1\) does not fit in int64"):
        MultiVectorIndex.build(candidates[:3], ids=[1, 2**63, 3])
    with pytest.raises(ValueError, match=r"id 9223372036854775808 \(row 0\) does not fit"):
        MultiVectorIndex.build(candidates[:1], ids=np.array([2**63], dtype=np.uint64))
    index = MultiVectorIndex.build(candidates[:2], ids=[2**63 - 1, -(2**63)])
    with pytest.raises(ValueError, match=r"id -9223372036854775809 \(row 1\) does not fit"):
        index.add(candidates[2:], ids=[5, -(2**63) - 1])
    assert index.ids == [2**63 - 1, -(2**63)]
    _, ids = index.search(candidates[:1], (1, 1), k=2)
    assert ids[0][0] == 2**63 - 1 and sorted(int(i) for i in ids[0]) == [-(2**63), 2**63 - 1]

    index.save(tmp_path / "index")
    _edit_manifest(tmp_path / "index", lambda m: m["ids"].__setitem__(0, 2**64))
    with pytest.raises(ValueError, match=r"id 18446744073709551616 does not fit in int64"):
        MultiVectorIndex.load(tmp_path / "index")


# ----------------------------------------------------------------------------- manifests


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "index"
    MultiVectorIndex.build(unit(np.random.default_rng(2), (50, 4, 8)), dtype="int8").save(
        path, shard_rows=20
    )
    return path


def _edit_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("outside", ["../outside/secret.bin", "ABSOLUTE"])
def test_manifest_file_names_are_confined_to_the_index_directory(saved, tmp_path, outside):
    """A manifest naming a file outside its directory is refused before the file is touched:
    the error names the entry, not the outside file's size, and a later save over it does not
    remove the outside file."""
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"s" * 12345)
    name = str(secret) if outside == "ABSOLUTE" else outside

    def point_outside(manifest):
        manifest["shards"][1]["scales"]["file"] = name

    _edit_manifest(saved, point_outside)
    for mmap in (False, True):
        with pytest.raises(
            ValueError, match=r"shards\[1\]\.scales names .*not a file of this"
        ) as e:
            MultiVectorIndex.load(saved, mmap=mmap)
        assert "12345" not in str(e.value)
    MultiVectorIndex.build(unit(np.random.default_rng(3), (5, 4, 8))).save(saved)
    assert secret.read_bytes() == b"s" * 12345


@pytest.mark.parametrize("field", ["ids", "shards"])
def test_manifest_missing_a_field_is_named(saved, field):
    _edit_manifest(saved, lambda manifest: manifest.pop(field))
    with pytest.raises(ValueError, match=f"has no '{field}' field"):
        MultiVectorIndex.load(saved)


def test_manifest_with_wrong_field_types_is_named(saved):
    _edit_manifest(saved, lambda manifest: manifest.update(shards="none"))
    with pytest.raises(ValueError, match="'shards' must be list"):
        MultiVectorIndex.load(saved)
    _edit_manifest(saved, lambda manifest: manifest.update(shards=[{"scales": {}}]))
    with pytest.raises(ValueError, match=r"shards\[0\] has no 'vectors' entry"):
        MultiVectorIndex.load(saved)


def test_shape_disagreeing_with_the_file_names_both_sizes(saved):
    """The shard file matches its 'bytes' field but not its shape: the error gives the file's
    byte count and the (different) count the shape needs."""

    def shrink(manifest):
        manifest["shards"][0]["vectors"]["shape"] = [4, 20, 4]  # the file holds [4, 20, 8]

    _edit_manifest(saved, shrink)
    with pytest.raises(ValueError, match=r"the file has 640 bytes.*\(4, 20, 4\).*needs 320"):
        MultiVectorIndex.load(saved)


def test_a_shard_that_is_a_symbolic_link_is_refused(saved, tmp_path):
    """A shard name inside the directory that links outside it is not followed."""
    manifest = json.loads((saved / "manifest.json").read_text())
    shard = saved / manifest["shards"][0]["vectors"]["file"]
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(ValueError, match="is a symbolic link"):
        MultiVectorIndex.load(saved)
