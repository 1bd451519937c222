"""MultiVectorIndex: search vs a numpy reference, files, atomic saves, sharding, streaming."""

import functools
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh

from metaembed_jax.retrieval import _search as _index_search
from metaembed_jax.retrieval import _storage as _index_io
from metaembed_jax.retrieval.index import MultiVectorIndex


def unit(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_search(queries, candidates, budget, k):
    """numpy: MaxSim in float64, then a stable sort on -score (ties: lower position first)."""
    r_q, r_c = budget
    sims = np.einsum(
        "qid,cjd->qcij", queries[:, :r_q].astype(np.float64), candidates[:, :r_c].astype(np.float64)
    )
    scores = sims.max(-1).sum(-1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    queries, candidates = unit(rng, (4, 16, 32)), unit(rng, (203, 64, 32))
    candidates[150:160] = candidates[10]  # exact duplicates: ties across shards and blocks
    return queries, candidates


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("budget", [(1, 1), (4, 8), (16, 64)])
def test_exhaustive_search_matches_numpy(data, dtype, budget):
    queries, candidates = data
    index = MultiVectorIndex.build(candidates, ids=[f"doc{i}" for i in range(203)], dtype=dtype)
    stored = index.embeddings()  # what the index holds (rounded / quantised)
    if dtype == "bfloat16":
        # A bfloat16 index multiplies in bfloat16: the queries are rounded too.
        queries = queries.astype(ml_dtypes.bfloat16).astype(np.float32)
    scores, ids = index.search(queries, budget, k=12)
    want_scores, want_positions = reference_search(queries, stored, budget, 12)
    np.testing.assert_allclose(scores, want_scores, atol=5e-5)
    assert ids.tolist() == [[f"doc{p}" for p in row] for row in want_positions]


def test_ties_go_to_the_lower_position(data):
    queries, candidates = data
    index = MultiVectorIndex.build(candidates, dtype="float32")
    # Query = the duplicated candidate's own vectors: it and its 10 copies tie at the top.
    _, ids = index.search(candidates[10:11, :16], (16, 64), k=11)
    assert ids[0].tolist() == [10, *range(150, 160)]
    # k = 3: 7 blocks of 32 candidates > k, so the blocked top-k runs; same tie order.
    _, ids = index.search(candidates[10:11, :16], (16, 64), k=3)
    assert ids[0].tolist() == [10, 150, 151]


@pytest.mark.parametrize("candidates_first", [False, True])
@pytest.mark.parametrize("k", [1, 5, 10, 40])  # 40: 32 blocks <= k, plain lax.top_k
def test_top_k_by_blocks_equals_lax_top_k(k, candidates_first):
    """Values and indices of `lax.top_k`, ties (to the lower index) and -inf included, on rows
    whose length is not a multiple of the block; also read from the transposed [n, rows]."""
    rng = np.random.default_rng(k)
    values = rng.integers(0, 6, (7, 1000)).astype(np.float32)  # many ties
    values[:, rng.choice(1000, 300, replace=False)] = -np.inf
    values[3] = -np.inf  # a row with nothing but -inf
    want = jax.lax.top_k(values, k)
    given = np.ascontiguousarray(values.T) if candidates_first else values
    top_k = functools.partial(_index_search.top_k_by_blocks, candidates_first=candidates_first)
    got = jax.jit(lambda v: top_k(v, k))(given)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_quantised_sizes(data):
    _, candidates = data
    sizes = {
        d: MultiVectorIndex.build(candidates, dtype=d).nbytes
        for d in ("float32", "bfloat16", "int8")
    }
    assert sizes["float32"] == candidates.nbytes
    assert sizes["bfloat16"] * 2 == sizes["float32"]
    # int8: D bytes + one float32 scale per vector instead of 4 D bytes.
    assert sizes["int8"] == 203 * 64 * (32 + 4)


def test_add_equals_building_at_once(data):
    queries, candidates = data
    whole = MultiVectorIndex.build(candidates, dtype="int8")
    parts = MultiVectorIndex.build(candidates[:100], dtype="int8")
    parts.add(candidates[100:])
    assert parts.ids == list(range(203))
    np.testing.assert_array_equal(parts.embeddings(), whole.embeddings())
    # the first candidates only, across the added block's boundary
    np.testing.assert_array_equal(parts.embeddings(150), whole.embeddings()[:150])
    np.testing.assert_array_equal(parts.embeddings(10**6), whole.embeddings())
    for got, want in zip(
        parts.search(queries, (4, 8), 7), whole.search(queries, (4, 8), 7), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_two_stage_full_shortlist_equals_exhaustive_and_reranks_exactly(data):
    queries, candidates = data
    index = MultiVectorIndex.build(candidates, dtype="float32")
    exhaustive = index.search(queries, (16, 64), k=10)
    full = index.search(queries, (16, 64), k=10, coarse_budget=(1, 1), shortlist=203)
    np.testing.assert_array_equal(full[1], exhaustive[1])
    np.testing.assert_allclose(full[0], exhaustive[0], atol=1e-5)
    # A short list: results are the exact fine scores of the best coarse candidates.
    scores, ids = index.search(queries, (16, 64), k=5, coarse_budget=(1, 1), shortlist=20)
    _, coarse = reference_search(queries, candidates, (1, 1), 20)
    for row in range(4):
        sub_scores, sub_order = reference_search(
            queries[row : row + 1], candidates[np.sort(coarse[row])], (16, 64), 5
        )
        assert ids[row].tolist() == np.sort(coarse[row])[sub_order[0]].tolist()
        np.testing.assert_allclose(scores[row], sub_scores[0], atol=5e-5)


def test_mixed_ids_come_back_as_given(data):
    queries, candidates = data
    ids = [f"s{i}" if i % 2 else i for i in range(203)]
    index = MultiVectorIndex.build(candidates, ids=ids, dtype="float32")
    _, found = index.search(queries, (2, 4), k=6)
    _, positions = reference_search(queries, candidates, (2, 4), 6)
    assert found.tolist() == [[ids[p] for p in row] for row in positions]
    with pytest.raises(ValueError, match="ints or strs"):
        MultiVectorIndex.build(candidates[:2], ids=[1.5, 2.5])


def test_search_argument_errors(data):
    queries, candidates = data
    index = MultiVectorIndex.build(candidates, dtype="float32")
    with pytest.raises(ValueError, match="k must be an int in \\[1, 203\\]"):
        index.search(queries, (1, 1), k=204)
    with pytest.raises(ValueError, match=r"D=32.*\(4, 16, 8\)"):
        index.search(queries[..., :8], (1, 1))
    with pytest.raises(ValueError, match=r"budget \(16, 65\) is out of range"):
        index.search(queries, (16, 65))
    with pytest.raises(ValueError, match="shortlist must be >= k"):
        index.search(queries, (1, 1), k=10, coarse_budget=(1, 1), shortlist=5)
    with pytest.raises(ValueError, match="dtype must be one of"):
        MultiVectorIndex.build(candidates, dtype="float16")
    with pytest.raises(ValueError, match=r"expected embeddings \[n, 64, 32\]"):
        index.add(candidates[:, :8])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_save_load_round_trip_is_bit_exact(data, tmp_path, dtype):
    queries, candidates = data
    index = MultiVectorIndex.build(candidates, ids=[f"d{i}" for i in range(203)], dtype=dtype)
    index.save(tmp_path / "index", shard_rows=64)  # 4 shards
    for mmap in (False, True):
        loaded = MultiVectorIndex.load(tmp_path / "index", mmap=mmap)
        assert loaded.ids == index.ids and loaded.dtype == dtype and len(loaded) == 203
        for (v0, s0), (v1, s1) in zip(
            index._blocks,
            [
                (
                    np.concatenate([v for v, _ in loaded._blocks], axis=1),  # [R_c, N, D]
                    None
                    if dtype != "int8"
                    else np.concatenate([s for _, s in loaded._blocks], axis=1),
                )
            ],
            strict=True,
        ):
            assert v0.dtype == v1.dtype and v0.tobytes() == v1.tobytes()
            assert (s0 is None and s1 is None) or s0.tobytes() == s1.tobytes()
        got, want = loaded.search(queries, (8, 16), 9), index.search(queries, (8, 16), 9)
        np.testing.assert_array_equal(got[1], want[1])
        if mmap:  # streamed per shard: other matmul shapes, float32 rounding may differ
            np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(got[0], want[0])


def _shard_files(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return [path / entry["vectors"]["file"] for entry in manifest["shards"]]


def test_truncated_altered_and_missing_files_are_rejected(data, tmp_path):
    _, candidates = data
    path = tmp_path / "index"
    MultiVectorIndex.build(candidates, dtype="bfloat16").save(path, shard_rows=100)
    shard = _shard_files(path)[1]
    original = shard.read_bytes()
    shard.write_bytes(original[:-10])
    with pytest.raises(ValueError, match="truncated"):
        MultiVectorIndex.load(path)
    with pytest.raises(ValueError, match="truncated"):
        MultiVectorIndex.load(path, mmap=True)
    altered = bytearray(original)
    altered[1234] ^= 0x01
    shard.write_bytes(bytes(altered))
    with pytest.raises(ValueError, match="altered"):
        MultiVectorIndex.load(path, mmap=True)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        MultiVectorIndex.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        MultiVectorIndex.load(path)
    with pytest.raises(FileNotFoundError, match="no index"):
        MultiVectorIndex.load(tmp_path / "nowhere")


def test_crash_mid_save_leaves_the_previous_index_readable(data, tmp_path, monkeypatch):
    queries, candidates = data
    path = tmp_path / "index"
    old = MultiVectorIndex.build(candidates[:120], dtype="int8")
    old.save(path, shard_rows=50)
    new = MultiVectorIndex.build(candidates, dtype="float32")
    real_write, calls = _index_io.write_array, []

    def crash_on_third_file(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError("simulated crash: disk full")
        return real_write(*args)

    monkeypatch.setattr(_index_io, "write_array", crash_on_third_file)
    with pytest.raises(OSError, match="simulated crash"):
        new.save(path, shard_rows=50)
    monkeypatch.setattr(_index_io, "write_array", real_write)

    def crash_at_commit(*args):
        raise OSError("simulated crash before the manifest swap")

    monkeypatch.setattr(os, "replace", crash_at_commit)
    with pytest.raises(OSError, match="manifest swap"):
        new.save(path, shard_rows=50)
    monkeypatch.undo()

    survivor = MultiVectorIndex.load(path)  # verifies every checksum
    assert survivor.dtype == "int8" and len(survivor) == 120
    np.testing.assert_array_equal(survivor.embeddings(), old.embeddings())
    new.save(path, shard_rows=50)  # a later save succeeds and cleans the debris up
    assert len(MultiVectorIndex.load(path)) == 203
    assert sorted(
        p.name for p in path.iterdir() if p.name not in ("manifest.json", ".lock")
    ) == sorted(p.name for p in _shard_files(path))


def _meshes():
    devices = np.array(jax.devices())
    assert devices.size == 8, "tests/conftest.py sets 8 virtual CPU devices"
    return [Mesh(devices, ("index",)), Mesh(devices.reshape(2, 4), ("data", "model"))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_sharded_search_equals_one_device(data, dtype):
    """203 candidates over 8 devices (padded), ties straddling shards: same ids, same scores."""
    queries, candidates = data
    index = MultiVectorIndex.build(candidates, dtype=dtype)
    single = index.search(queries, (4, 8), k=15)
    single_two = index.search(queries, (16, 64), k=5, coarse_budget=(1, 1), shortlist=30)
    tie_query = candidates[10:11, :16]
    single_ties = index.search(tie_query, (16, 64), k=11)
    for mesh in _meshes():
        sharded = index.search(queries, (4, 8), k=15, mesh=mesh)
        np.testing.assert_array_equal(sharded[1], single[1])
        np.testing.assert_allclose(sharded[0], single[0], rtol=1e-6, atol=1e-6)
        two = index.search(queries, (16, 64), k=5, coarse_budget=(1, 1), shortlist=30, mesh=mesh)
        np.testing.assert_array_equal(two[1], single_two[1])
        np.testing.assert_allclose(two[0], single_two[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(
            index.search(tie_query, (16, 64), k=11, mesh=mesh)[1], single_ties[1]
        )


def test_streamed_mmap_index_equals_in_memory(data, tmp_path):
    queries, candidates = data
    index = MultiVectorIndex.build(candidates, dtype="bfloat16")
    index.save(tmp_path / "index", shard_rows=40)  # 6 blocks, the ties span blocks 0 and 3
    streamed = MultiVectorIndex.load(tmp_path / "index", mmap=True)
    assert streamed.streaming and isinstance(streamed._blocks[0][0], np.memmap)
    mesh = _meshes()[0]
    for kwargs in ({}, {"coarse_budget": (1, 1), "shortlist": 25}):
        want = index.search(queries, (16, 64), k=8, **kwargs)
        for got in (
            streamed.search(queries, (16, 64), k=8, **kwargs),
            streamed.search(queries, (16, 64), k=8, mesh=mesh, **kwargs),
        ):
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    _, ids = streamed.search(candidates[10:11, :16], (16, 64), k=11)
    assert ids[0].tolist() == [10, *range(150, 160)]


# ----------------------------------------------------------------------------- two real processes

_PROCESS_SCRIPT = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id, index_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
import numpy as np
from jax.sharding import Mesh
from metaembed_jax.retrieval import _placement as placement
from metaembed_jax.retrieval.index import MultiVectorIndex

read = []  # every host row range this process reads to place the index on its devices
host_rows = placement.host_rows
placement.host_rows = lambda blocks, a, b: read.append((a, b)) or host_rows(blocks, a, b)
queries = np.load(f"{index_dir}/queries.npy")
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("host", "device"))
saved = {}
for dtype in ("float32", "bfloat16", "int8"):
    for mmap in (False, True):
        index = MultiVectorIndex.load(f"{index_dir}/{dtype}", mmap=mmap)
        name = f"{dtype}/{mmap}"
        read.clear()
        searches = {
            "exhaustive": index.search(queries, (4, 8), k=15, mesh=mesh),
            "two_stage": index.search(
                queries, (16, 64), k=5, coarse_budget=(1, 1), shortlist=30, mesh=mesh
            ),
            "ties": index.search(np.load(f"{index_dir}/tie.npy"), (16, 64), k=11, mesh=mesh),
        }
        for kind, (scores, ids) in searches.items():
            saved[f"{name}/{kind}/s"], saved[f"{name}/{kind}/p"] = scores, ids
        saved[f"{name}/read"] = np.array(read)
np.savez(f"{index_dir}/{process_id}.npz", **saved)
"""


@pytest.mark.slow
def test_two_processes_search_their_own_rows_and_match_one_device(
    data, tmp_path, run_two_processes
):
    """Two real JAX processes (gloo, 4 CPU devices each) load the same saved index (in memory
    and memory-mapped, with 40-row file shards) and search it on one 2x4 mesh: results equal
    the single-device search, and each process reads only the rows its own devices hold."""
    queries, candidates = data
    tie_query = candidates[10:11, :16]
    np.save(tmp_path / "queries.npy", queries)
    np.save(tmp_path / "tie.npy", tie_query)
    want = {}
    for dtype in ("float32", "bfloat16", "int8"):
        index = MultiVectorIndex.build(candidates, dtype=dtype)
        index.save(tmp_path / dtype, shard_rows=40)
        want[dtype] = {
            "exhaustive": index.search(queries, (4, 8), k=15),
            "two_stage": index.search(queries, (16, 64), k=5, coarse_budget=(1, 1), shortlist=30),
            "ties": index.search(tie_query, (16, 64), k=11),
        }
    run_two_processes(_PROCESS_SCRIPT, tmp_path)
    # Rows placed per search: in memory the whole index padded to 208 (26 per device); streamed,
    # each 40-row file shard (5 per device). Each process must read only its half.
    placed_rows = {False: -(-len(candidates) // 8) * 8, True: 40}
    for process_id in range(2):
        got = np.load(tmp_path / f"{process_id}.npz", allow_pickle=False)
        for dtype, searches in want.items():
            for mmap in (False, True):
                for kind, (scores, ids) in searches.items():
                    key = f"{dtype}/{mmap}/{kind}"
                    np.testing.assert_array_equal(got[key + "/p"], ids, err_msg=key)
                    np.testing.assert_allclose(got[key + "/s"], scores, rtol=1e-6, atol=1e-6)
                read, rows = got[f"{dtype}/{mmap}/read"], placed_rows[mmap]
                own = (process_id * rows // 2, (process_id + 1) * rows // 2)
                assert len(read) and (read[:, 0] >= own[0]).all(), (dtype, mmap, read)
                assert (read[:, 1] <= own[1]).all(), (dtype, mmap, read)
