"""Budgeted MaxSim and top_k against a direct numpy transcription of the formula."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from metaembed_jax.retrieval.index import quantize
from metaembed_jax.scoring import maxsim, top_k

BUDGETS = [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]


def reference_maxsim(queries, candidates, budget, query_mask=None, candidate_mask=None):
    """s(q, c) = sum_{i < r_q} max_{j < r_c} <q_i, c_j>, in float64, masks as specified."""
    r_q, r_c = budget
    q = np.asarray(queries, np.float64)[:, :r_q]
    c = np.asarray(candidates, np.float64)[:, :r_c]
    sims = np.einsum("qid,cjd->qcij", q, c)
    if candidate_mask is not None:
        sims = np.where(candidate_mask[None, :, None, :r_c].astype(bool), sims, -np.inf)
    best = sims.max(axis=-1)
    if query_mask is not None:
        best = np.where(query_mask[:, None, :r_q].astype(bool), best, 0.0)
    return best.sum(axis=-1)


def unit(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return unit(rng, (5, 16, 24)), unit(rng, (37, 64, 24))


@pytest.mark.parametrize("budget", BUDGETS)
def test_float32_matches_numpy_every_budget(data, budget):
    queries, candidates = data
    got = np.asarray(maxsim(queries, candidates, budget))
    assert got.dtype == np.float32 and got.shape == (5, 37)
    np.testing.assert_allclose(got, reference_maxsim(queries, candidates, budget), atol=2e-5)


def test_budget_none_means_all_vectors(data):
    queries, candidates = data
    np.testing.assert_allclose(
        np.asarray(maxsim(queries, candidates)),
        reference_maxsim(queries, candidates, (16, 64)),
        atol=2e-5,
    )


@pytest.mark.parametrize("budget", [(2, 4), (16, 64)])
def test_bfloat16_multiplies_rounded_inputs_with_float32_accumulation(data, budget):
    """bfloat16: queries and candidates rounded to bfloat16, products summed in float32: equal to
    the float64 reference on the rounded inputs up to float32 rounding; near the float32 score."""
    queries, candidates = data
    q16, c16 = queries.astype(ml_dtypes.bfloat16), candidates.astype(ml_dtypes.bfloat16)
    got = np.asarray(maxsim(jnp.asarray(q16), jnp.asarray(c16), budget))
    np.testing.assert_allclose(got, reference_maxsim(q16, c16, budget), atol=5e-5)
    np.testing.assert_allclose(got, reference_maxsim(queries, candidates, budget), atol=0.05)


@pytest.mark.parametrize("budget", [(1, 1), (4, 8), (16, 64)])
def test_int8_with_per_vector_scales(data, budget):
    queries, candidates = data
    vectors, scales = quantize(candidates, "int8")
    got = np.asarray(maxsim(queries, vectors, budget, candidate_scales=scales))
    dequantized = vectors.astype(np.float64) * scales[..., None]
    np.testing.assert_allclose(got, reference_maxsim(queries, dequantized, budget), atol=5e-5)
    # Quantisation error: each vector is off by at most half a step (absmax/254) per coordinate.
    np.testing.assert_allclose(got, reference_maxsim(queries, candidates, budget), atol=0.05)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_masks(data, dtype):
    """Masked query vectors add 0; masked candidate vectors never win a max."""
    queries, candidates = (x.astype(dtype) for x in data)
    rng = np.random.default_rng(1)
    query_mask = rng.random((5, 16)) < 0.7
    candidate_mask = rng.random((37, 64)) < 0.6
    candidate_mask[:, 0] = True  # keep every candidate scoreable at r_c = 1
    for budget in [(4, 8), (16, 64)]:
        got = np.asarray(maxsim(queries, candidates, budget, query_mask, candidate_mask))
        want = reference_maxsim(queries, candidates, budget, query_mask, candidate_mask)
        np.testing.assert_allclose(got, want, atol=5e-5)


def test_fully_masked_candidate_scores_minus_infinity_without_nan(data):
    queries, candidates = data
    candidate_mask = np.ones((37, 64), bool)
    candidate_mask[3] = False
    query_mask = np.ones((5, 16), bool)
    query_mask[:, 1] = False
    got = np.asarray(maxsim(queries, candidates, (4, 8), query_mask, candidate_mask))
    assert not np.isnan(got).any()
    assert np.all(got[:, 3] == -np.inf) and np.isfinite(np.delete(got, 3, axis=1)).all()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int8])
def test_chunk_size_does_not_change_the_result(data, dtype):
    queries, candidates = data
    scales = None
    if dtype == np.int8:
        candidates, scales = quantize(candidates, "int8")
    else:
        candidates = candidates.astype(dtype)
    results = [
        np.asarray(maxsim(queries, candidates, (8, 16), candidate_scales=scales, chunk_size=size))
        for size in (1, 4, 10, 37, 1000)
    ]
    for result in results[1:]:
        np.testing.assert_allclose(result, results[0], rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_value_errors_naming_the_shapes(data):
    queries, candidates = data
    with pytest.raises(ValueError, match=r"budget \(17, 4\) is out of range"):
        maxsim(queries, candidates, (17, 4))
    with pytest.raises(ValueError, match=r"r_c in \[1, 64\]"):
        maxsim(queries, candidates, (1, 65))
    with pytest.raises(ValueError, match="budget must be a pair"):
        maxsim(queries, candidates, (0.5, 2))
    with pytest.raises(ValueError, match=r"\(5, 16, 24\).*\(37, 64, 8\)"):
        maxsim(queries, candidates[..., :8])
    with pytest.raises(ValueError, match=r"rank 3.*\(5, 384\)"):
        maxsim(queries.reshape(5, -1), candidates)
    with pytest.raises(ValueError, match="query_mask must have shape"):
        maxsim(queries, candidates, query_mask=np.ones((5, 3)))
    with pytest.raises(ValueError, match="chunk_size"):
        maxsim(queries, candidates, chunk_size=0)


def test_top_k_breaks_ties_by_lower_index():
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    values, indices = top_k(scores, 4)
    np.testing.assert_array_equal(np.asarray(indices), [[1, 2, 4, 3], [0, 1, 2, 3]])
    np.testing.assert_array_equal(np.asarray(values), [[3, 3, 3, 2], [0, 0, 0, 0]])
    # Same answer as a stable numpy sort on (-score, index).
    rng = np.random.default_rng(2)
    tied = rng.integers(0, 5, size=(8, 300)).astype(np.float32)
    want = np.argsort(-tied, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(np.asarray(top_k(tied, 20)[1]), want)
    with pytest.raises(ValueError, match="k must be"):
        top_k(tied, 301)
