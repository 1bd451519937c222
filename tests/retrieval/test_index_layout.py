"""The budget-major index layout: same results as the candidate-major scorer at every budget,
dtype, mask and chunk size; version-1 indexes (the earlier format) still load and search the
same; a quantised index rescored from its float32 copy returns the float32 top-k exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from metaembed_jax.retrieval import _placement as placement
from metaembed_jax.retrieval import _storage as _index_io
from metaembed_jax.retrieval import index as index_module
from metaembed_jax.retrieval.index import MultiVectorIndex, quantize
from metaembed_jax.scoring import chunked_scores, default_chunk_size, maxsim, top_k
from tests.paths import FIXTURES

FIXTURE = FIXTURES / "index_v1"
# The corners and one uneven budget (each budget compiles its own programs: kept few).
BUDGETS = [(1, 1), (4, 8), (16, 64), (3, 17)]


def unit(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    return unit(rng, (5, 16, 24)), unit(rng, (41, 64, 24))


def _stored(candidates, dtype):
    """Candidate-major (vectors, scales) as the index stores them (bfloat16 as its words)."""
    vectors, scales = quantize(candidates, dtype)
    return vectors, scales


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("budget", [(1, 1), (16, 64), (3, 17)])
def test_vector_major_scores_equal_candidate_major(data, dtype, budget):
    """chunked_scores on [R, N, D] equals it on [N, R, D], bit for bit, with and without
    query / candidate masks, at chunk sizes 1 and 7 (41 candidates: the last chunk overlaps)."""
    queries, candidates = data
    vectors, scales = _stored(candidates, dtype)
    rng = np.random.default_rng(4)
    query_mask = rng.random(queries.shape[:2]) < 0.7
    candidate_mask = rng.random(candidates.shape[:2]) < 0.6
    candidate_mask[:, 0] = True
    r_q, r_c = budget
    for masks in ((None, None), (query_mask, candidate_mask)):
        for chunk in (1, 7):  # one per chunk, and chunks with a shifted last one

            def run(vector_major, masks=masks, chunk=chunk):
                flip = (lambda x: x) if not vector_major else (lambda x: np.swapaxes(x, 0, 1))
                args = [
                    None if a is None else jnp.asarray(np.ascontiguousarray(flip(a)))
                    for a in (vectors, masks[1], scales)
                ]
                return np.asarray(
                    jax.jit(
                        lambda q, c, qm, cm, s: chunked_scores(
                            q,
                            c,
                            qm,
                            cm,
                            s,
                            r_q=r_q,
                            r_c=r_c,
                            chunk_size=chunk,
                            vector_major=vector_major,
                        )
                    )(jnp.asarray(queries), args[0], masks[0], args[1], args[2])
                )

            np.testing.assert_array_equal(run(True), run(False))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_index_search_equals_candidate_major_maxsim(data, dtype):
    """Index search (budget-major) = `maxsim` on the candidate-major stored vectors + top-k,
    for every budget, with and without a query mask, at several chunk sizes."""
    queries, candidates = data
    index = MultiVectorIndex.build(candidates, dtype=dtype)
    vectors, scales = _stored(candidates, dtype)
    if dtype == "bfloat16":
        vectors = jnp.asarray(vectors).view(jnp.bfloat16)
    query_mask = np.random.default_rng(5).random(queries.shape[:2]) < 0.7
    query_mask[:, 0] = True
    for budget in BUDGETS:
        for mask in (None, query_mask):
            want = top_k(
                maxsim(queries, vectors, budget, query_mask=mask, candidate_scales=scales), 9
            )
            for chunk in (None, 6):
                scores, ids = index.search(queries, budget, 9, query_mask=mask, chunk_size=chunk)
                np.testing.assert_array_equal(ids, np.asarray(want[1]), err_msg=str(budget))
                np.testing.assert_allclose(scores, np.asarray(want[0]), rtol=1e-6, atol=1e-6)


def test_prefixes_are_contiguous_in_memory_files_and_mmap(data, tmp_path):
    """Every prefix [:r_c] of a stored block is one C-contiguous range (also memory-mapped), and
    a streamed search places only the prefix its budget needs."""
    queries, candidates = data
    index = MultiVectorIndex.build(candidates, dtype="int8")
    index.save(tmp_path / "i", shard_rows=16)
    streamed = MultiVectorIndex.load(tmp_path / "i", mmap=True)
    for vectors, scales in index._blocks + streamed._blocks:
        assert vectors.shape[0] == 64 and scales.shape[0] == 64
        for r_c in (1, 5, 64):
            assert vectors[:r_c].flags.c_contiguous and scales[:r_c].flags.c_contiguous
    placed = []
    real_place = placement.place_rows

    def record(blocks, rows, sharding):
        placed.append(blocks[0].shape)
        return real_place(blocks, rows, sharding)

    placement.place_rows = record
    try:
        got = streamed.search(queries, (2, 3), k=4)
    finally:
        placement.place_rows = real_place
    assert placed and all(shape[0] == 3 for shape in placed), placed
    want = index.search(queries, (2, 3), k=4)
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("mmap", [False, True])
def test_version_1_index_loads_and_searches_the_same(dtype, mmap, tmp_path):
    """The fixture, written by the earlier release ([n, R_c, D] shards), loads and returns the
    results that release returned; saving it again writes version 2 with the same results."""
    expected = np.load(FIXTURE / "expected.npz")
    index = MultiVectorIndex.load(FIXTURE / dtype, mmap=mmap)
    assert _index_io.read_manifest(str(FIXTURE / dtype))["version"] == 1
    assert len(index) == 9 and index.ids[:3] == [0, "c1", "c2"]
    want_vectors, want_scales = quantize(expected["candidates"], dtype)
    from metaembed_jax.retrieval.index import dequantize

    np.testing.assert_array_equal(index.embeddings(), dequantize(want_vectors, want_scales, dtype))
    index.save(tmp_path / "v2", shard_rows=4)
    resaved = MultiVectorIndex.load(tmp_path / "v2", mmap=mmap)
    assert _index_io.read_manifest(str(tmp_path / "v2"))["version"] == 2
    for candidate in (index, resaved):
        for budget in ((1, 1), (2, 4)):
            key = f"{dtype}_{budget[0]}x{budget[1]}"
            scores, ids = candidate.search(expected["queries"], budget, k=4)
            assert [[str(i) for i in row] for row in ids] == expected[key + "_ids"].tolist()
            np.testing.assert_allclose(scores, expected[key + "_scores"], rtol=1e-6, atol=1e-6)


def test_unknown_format_version_is_named(tmp_path):
    path = tmp_path / "i"
    MultiVectorIndex.build(unit(np.random.default_rng(0), (3, 2, 4))).save(path)
    manifest = (path / "manifest.json").read_text().replace('"version": 2', '"version": 7')
    (path / "manifest.json").write_text(manifest)
    with pytest.raises(ValueError, match=r"format version 7 is not supported.*\(1, 2\)"):
        MultiVectorIndex.load(path)


# ----------------------------------------------------------------------------- rescoring


@pytest.fixture(scope="module")
def untied():
    """Random unit vectors whose exact top-10 at every tested budget has clear score gaps."""
    for seed in range(50):  # the first seed whose top-11 gaps all exceed float32 rounding
        rng = np.random.default_rng(seed)
        queries, candidates = unit(rng, (6, 16, 32)), unit(rng, (300, 64, 32))
        gaps = [
            -np.diff(np.sort(np.asarray(maxsim(queries, candidates, b)), axis=1)[:, ::-1][:, :11])
            for b in ((1, 1), (4, 8), (16, 64))
        ]
        if min(gap.min() for gap in gaps) > 1e-5:
            return queries, candidates
    raise AssertionError("no tie-free corpus among 50 seeds")


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_rescored_quantised_search_returns_the_float32_top_k(untied, dtype, tmp_path):
    """int8 / bfloat16 + rescore = the float32 index's exhaustive results (ids exactly), in
    memory, after save / load (float32 copy memory-mapped, RAM = the quantised size), with
    two-stage search, on a mesh, after `add`."""
    queries, candidates = untied
    exact = MultiVectorIndex.build(candidates, dtype="float32")
    index = MultiVectorIndex.build(candidates[:200], dtype=dtype, full_precision=True)
    index.add(candidates[200:])
    quantised_only = MultiVectorIndex.build(candidates, dtype=dtype)
    assert index.nbytes == quantised_only.nbytes
    index.save(tmp_path / "i", shard_rows=128)
    loaded = MultiVectorIndex.load(tmp_path / "i", mmap=False)
    assert all(isinstance(full, np.memmap) for full in loaded._full)
    assert loaded.nbytes == quantised_only.nbytes < exact.nbytes
    mesh = Mesh(np.array(jax.devices()), ("index",))
    for budget in ((1, 1), (4, 8), (16, 64)):
        want_scores, want_ids = exact.search(queries, budget, k=10)
        # (Two-stage with the whole index as shortlist: random vectors' (1, 1) scores say
        # little about (4, 8), so a shorter list would lose results before any rescoring.)
        runs = [
            index.search(queries, budget, k=10, rescore=60),
            loaded.search(queries, budget, k=10, rescore=60),
            loaded.search(queries, budget, k=10, rescore=60, mesh=mesh),
            loaded.search(queries, budget, k=10, rescore=60, coarse_budget=(1, 1), shortlist=300),
        ]
        for scores, ids in runs:
            np.testing.assert_array_equal(ids, want_ids, err_msg=str(budget))
            np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
    # Without rescoring the quantised order differs somewhere (else this test proves nothing).
    assert (
        any(
            not np.array_equal(
                quantised_only.search(queries, b, k=10)[1], exact.search(queries, b, k=10)[1]
            )
            for b in ((1, 1), (4, 8), (16, 64))
        )
        or dtype == "bfloat16"
    )


def test_rescore_argument_errors(untied):
    queries, candidates = untied
    with pytest.raises(ValueError, match="full_precision=True"):
        MultiVectorIndex.build(candidates, dtype="int8").search(queries, (1, 1), rescore=20)
    index = MultiVectorIndex.build(candidates, dtype="int8", full_precision=True)
    with pytest.raises(ValueError, match="rescore must be an int >= k=10"):
        index.search(queries, (1, 1), k=10, rescore=5)
    with pytest.raises(ValueError, match="shortlist must be >= k and rescore=50"):
        index.search(queries, (1, 1), k=10, rescore=50, coarse_budget=(1, 1), shortlist=20)
    with pytest.raises(ValueError, match="float32 already is exact"):
        MultiVectorIndex.build(candidates, dtype="float32", full_precision=True)


def test_float32_single_vector_search_scores_all_candidates_in_one_chunk():
    """A float32 (1, 1) search takes every candidate of a device in one chunk (its similarity
    block is its score rows); other dtypes and budgets keep `default_chunk_size`'s bound."""
    assert index_module._search_chunk_size(32, (1, 1), 20000, 2048, np.float32) == 20000
    for budget, dtype in (((1, 1), np.uint16), ((2, 4), np.float32), ((1, 2), np.float32)):
        r_q, r_c = budget
        bounded = default_chunk_size(32 * r_q, r_c, 20000, 2048, np.dtype(dtype).itemsize)
        assert bounded < 20000
        assert index_module._search_chunk_size(32, budget, 20000, 2048, dtype) == bounded


def test_float32_single_vector_kernel_equals_the_chunked_scorer(data, monkeypatch):
    """The float32 (1, 1) search (candidates-first product, `_single_vector_top_k`) returns the
    ids and scores of the chunked MaxSim path, ties and padded shards included, on one device
    and on 8; the test counts its traces, so it fails if the search stops taking that path."""
    queries, candidates = data
    candidates = candidates.copy()
    candidates[30:36, 0] = candidates[7, 0]  # six ties with candidate 7 at (1, 1)
    queries = np.concatenate([queries, candidates[7:8, :16]])  # a query on the tied vector
    index = MultiVectorIndex.build(candidates, dtype="float32")
    traced = []
    kernel = index_module.kernels._single_vector_top_k
    monkeypatch.setattr(
        index_module.kernels,
        "_single_vector_top_k",
        lambda *args: traced.append(1) or kernel(*args),
    )
    index_module.kernels.exhaustive_fn.cache_clear()
    devices = np.array(jax.devices())
    for mesh in (None, Mesh(devices, ("index",))):  # 41 candidates: 8 devices pad to 48
        for k in (3, 9):
            fast = index.search(queries, (1, 1), k, mesh=mesh)
            chunked = index.search(queries, (1, 1), k, mesh=mesh, chunk_size=4)
            np.testing.assert_array_equal(fast[1], chunked[1])
            np.testing.assert_array_equal(fast[0], chunked[0])
        assert fast[1][-1, :7].tolist() == [7, 30, 31, 32, 33, 34, 35]
    assert len(traced) == 4  # one trace per (mesh, k); chunk_size=4 never takes the path
    index_module.kernels.exhaustive_fn.cache_clear()


@pytest.mark.parametrize("num_devices", [1, 8])
def test_placement_reads_bounded_pieces_and_equals_the_concatenation(monkeypatch, num_devices):
    """`place_rows` fills each device's shard from host pieces of at most `PLACE_BYTES` (never a
    host concatenation of a device's rows across blocks) and gives the zero-padded
    concatenation of the blocks, for vectors [R, n, D] and scales [R, n]."""
    rng = np.random.default_rng(0)
    sizes = (7, 1, 12, 5)  # blocks of uneven sizes: pieces cross block and shard boundaries
    vectors = [rng.standard_normal((3, n, 4)).astype(np.float32) for n in sizes]
    scales = [rng.standard_normal((3, n)).astype(np.float32) for n in sizes]
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("index",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "index"))
    reads = []
    host_rows = placement.host_rows
    monkeypatch.setattr(
        placement, "host_rows", lambda b, a, z: reads.append(z - a) or host_rows(b, a, z)
    )
    rows = 32  # 25 candidates, zero-padded
    for blocks in (vectors, scales):
        row_bytes = blocks[0][:, :1].nbytes
        monkeypatch.setattr(placement, "PLACE_BYTES", 3 * row_bytes)
        reads.clear()
        placed = placement.place_rows(blocks, rows, sharding)
        want = np.concatenate(blocks, axis=1)
        want = np.concatenate([want, np.zeros_like(want[:, : rows - want.shape[1]])], axis=1)
        np.testing.assert_array_equal(np.asarray(placed), want)
        assert placed.sharding == sharding
        assert reads and max(reads) <= 3, reads
