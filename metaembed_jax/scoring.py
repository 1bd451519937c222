"""Budgeted MaxSim scoring and deterministic top-k.

Score of query ``q`` against candidate ``c`` at budget ``(r_q, r_c)``:
``s(q, c) = sum_{i < r_q} max_{j < r_c} <q_i, c_j>`` (no length normalisation). The prefixes are
sliced from the full stored vectors, so one array of all ``R_c`` candidate vectors serves every
budget.

The scorer is one matmul per candidate chunk over all query vectors at once
(``[Nq * r_q, D] x [D, chunk * r_c]``), then a max over the candidate-vector axis and a sum over
the query-vector axis. Chunks are sized so that the similarity block stays small (the matmul then
runs near the machine's peak and the block is reduced right after it), and memory is
bounded at any number of candidates. Accumulation is always float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Chunk sizing (candidates per chunk), tuned on a 2-core AVX-512 CPU (jax 0.10.2) with
# benchmarks/bench_scoring.py and benchmarks/index_chunk_sweep.py (the sweeps:
# docs/experiments/2026-12-speed-work.md, "Chunk sizes"). Three bounds:
# - the float32 similarity block [Nq * r_q, chunk * r_c] holds at most 1M floats (4 MiB): it is
#   reduced (max, sum) right after the matmul; much larger blocks ran slower, and smaller ones
#   leave too little matmul per chunk at small D;
# - the candidate slice [chunk, r_c, D] is at most 2 MiB: larger slices ran slower at (1, 1)
#   with a large D;
# - at least 8 candidates: fewer (the slice bound at D=2048 and (16, 64)) left the bfloat16
#   matmul further below its peak.
DEFAULT_BLOCK_ELEMENTS = 1 << 20
MAX_SLICE_BYTES = 2 << 20
MIN_CHUNK_CANDIDATES = 8

_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def resolve_budget(budget, num_query_vectors: int, num_candidate_vectors: int) -> tuple[int, int]:
    """The one budget check (scoring, the index, evaluation, loss groups): ``(r_q, r_c)`` as
    ints; ``None`` means all vectors.

    Prefixes past the stored (trained) vector counts do not exist, so a budget beyond them is an
    error, not a silent clip.

    Raises:
      ValueError: when the budget is not two positive ints within the vector counts.
    """
    if budget is None:
        return int(num_query_vectors), int(num_candidate_vectors)
    try:
        r_q, r_c = budget
        if isinstance(r_q, bool) or isinstance(r_c, bool):
            raise TypeError
        r_q, r_c = int(r_q), int(r_c)
        if (r_q, r_c) != tuple(budget):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(
            f"a budget must be a pair of integers (r_q, r_c), got {budget!r}"
        ) from None
    if not (1 <= r_q <= num_query_vectors and 1 <= r_c <= num_candidate_vectors):
        raise ValueError(
            f"budget {(r_q, r_c)} is out of range: there are {num_query_vectors} query and "
            f"{num_candidate_vectors} candidate vectors (R_q={num_query_vectors}, "
            f"R_c={num_candidate_vectors}), so r_q must be in [1, {num_query_vectors}] and r_c "
            f"in [1, {num_candidate_vectors}]"
        )
    return r_q, r_c


def resolve_budgets(
    budgets, num_query_vectors: int, num_candidate_vectors: int
) -> list[tuple[int, int]]:
    """`resolve_budget` for each of a non-empty list of budgets (no `None`)."""
    if not budgets:
        raise ValueError("no budget to evaluate: the budget list (config.eval.budgets) is empty")
    return [
        resolve_budget(tuple(budget), num_query_vectors, num_candidate_vectors)
        for budget in budgets
    ]


def _check_inputs(queries, candidates, query_mask, candidate_mask, candidate_scales):
    """Validate ranks, D, dtypes and mask shapes; raise ValueError naming the shapes."""
    q_shape, c_shape = tuple(np.shape(queries)), tuple(np.shape(candidates))
    if len(q_shape) != 3 or len(c_shape) != 3:
        raise ValueError(
            f"expected queries [Nq, R_q, D] and candidates [Nc, R_c, D] (rank 3), got "
            f"queries {q_shape} and candidates {c_shape}"
        )
    if q_shape[2] != c_shape[2]:
        raise ValueError(
            f"embedding dims differ: queries {q_shape} have D={q_shape[2]}, candidates "
            f"{c_shape} have D={c_shape[2]}"
        )
    if jnp.dtype(queries.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"queries must be float32 or bfloat16, got {queries.dtype}")
    c_dtype = jnp.dtype(candidates.dtype)
    if c_dtype not in (*_FLOAT_DTYPES, jnp.dtype(jnp.int8)):
        raise ValueError(f"candidates must be float32, bfloat16 or int8, got {c_dtype}")
    expected = {
        "query_mask": (query_mask, q_shape[:2]),
        "candidate_mask": (candidate_mask, c_shape[:2]),
        "candidate_scales": (candidate_scales, c_shape[:2]),
    }
    for name, (value, shape) in expected.items():
        if value is not None and tuple(np.shape(value)) != shape:
            raise ValueError(
                f"{name} must have shape {shape} to match queries {q_shape} / candidates "
                f"{c_shape}, got {tuple(np.shape(value))}"
            )
    if candidate_scales is not None and c_dtype != jnp.dtype(jnp.int8):
        raise ValueError(f"candidate_scales only apply to int8 candidates, got {c_dtype}")


def compute_dtype(query_dtype, candidate_dtype):
    """Matmul operand dtype: bfloat16 when the candidates are bfloat16, the query dtype for int8
    candidates (int8 values are exact in bfloat16 and float32), float32 otherwise."""
    candidate_dtype = jnp.dtype(candidate_dtype)
    if candidate_dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.uint16)):
        return jnp.dtype(jnp.bfloat16)
    if candidate_dtype == jnp.dtype(jnp.int8):
        return jnp.dtype(query_dtype)
    return jnp.dtype(jnp.float32)


def default_chunk_size(
    num_query_rows: int,
    r_c: int,
    num_candidates: int,
    dim: int,
    itemsize: int,
    *,
    block_elements: int | None = None,
) -> int:
    """Candidates per chunk within the bounds above (and at most ``num_candidates``);
    ``block_elements`` replaces `DEFAULT_BLOCK_ELEMENTS` (the loss keeps its own, see losses.py)."""
    block = DEFAULT_BLOCK_ELEMENTS if block_elements is None else block_elements
    by_block = block // max(1, num_query_rows * r_c)
    by_slice = MAX_SLICE_BYTES // max(1, r_c * dim * itemsize)
    chunk = max(MIN_CHUNK_CANDIDATES, min(by_block, by_slice))
    return int(max(1, min(chunk, num_candidates)))


def score_block(
    q_rows, q_mask, cand, cand_mask, cand_scales, *, num_queries, r_q, dtype, vector_major=False
):
    """MaxSim of all queries against one block of candidates.

    q_rows [Nq * r_q, D] (already in ``dtype``), q_mask [Nq, r_q] bool or None,
    cand [n, r_c, D], cand_mask [n, r_c] bool or None, cand_scales [n, r_c] or None; with
    ``vector_major`` the candidate arrays are [r_c, n, D] / [r_c, n] (the index's layout, in
    which every prefix of the vectors is contiguous). Returns [Nq, n] float32.
    """
    if vector_major:
        r_c, n, dim = cand.shape
    else:
        n, r_c, dim = cand.shape
    grid = (r_c, n) if vector_major else (n, r_c)
    sims = lax.dot_general(
        q_rows,
        cand.astype(dtype).reshape(n * r_c, dim),
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    ).reshape(num_queries, r_q, *grid)
    if cand_scales is not None:
        sims = sims * cand_scales.astype(jnp.float32)
    if cand_mask is not None:
        sims = jnp.where(cand_mask, sims, -jnp.inf)
    best = sims.max(axis=-2 if vector_major else -1)  # [Nq, r_q, n]
    if q_mask is not None:
        # where, not multiply: a fully masked candidate gives -inf and -inf * 0 would be NaN.
        best = jnp.where(q_mask[:, :, None], best, 0.0)
    return best.sum(axis=1)


def _slice_rows(x, start, size, r, vector_major=False):
    """Candidates [start, start + size) and their first r vectors of x [N, R, ...], or of
    x [R, N, ...] with ``vector_major`` (None passes)."""
    if x is None:
        return None
    starts = ((0, start) if vector_major else (start, 0)) + (0,) * (x.ndim - 2)
    sizes = (r, size) if vector_major else (size, r)
    chunk = lax.dynamic_slice(x, starts, (*sizes, *x.shape[2:]))
    return lax.bitcast_convert_type(chunk, jnp.bfloat16) if x.dtype == jnp.uint16 else chunk


def chunked_scores(
    queries,
    candidates,
    query_mask,
    candidate_mask,
    candidate_scales,
    *,
    r_q,
    r_c,
    chunk_size,
    vector_major=False,
):
    """Traceable core of `maxsim` (call it inside jit / shard_map); 1 <= chunk_size <= Nc.

    ``candidates`` [Nc, >= r_c, D] (or [>= r_c, Nc, D] with ``vector_major``, masks and scales
    alike) may be float32, int8, or uint16 holding raw bfloat16 words (how the index keeps
    bfloat16 vectors, see below). Returns [Nq, Nc] float32.
    """
    num_queries = queries.shape[0]
    num_candidates = candidates.shape[1 if vector_major else 0]
    dtype = compute_dtype(queries.dtype, candidates.dtype)
    q_rows = queries[:, :r_q].astype(dtype).reshape(num_queries * r_q, queries.shape[2])
    q_mask = None if query_mask is None else query_mask[:, :r_q].astype(bool)
    c_mask = None if candidate_mask is None else candidate_mask.astype(bool)
    score = functools.partial(
        score_block, num_queries=num_queries, r_q=r_q, dtype=dtype, vector_major=vector_major
    )
    take = functools.partial(_slice_rows, r=r_c, vector_major=vector_major)

    def chunk_scores(start, size):
        return score(
            q_rows,
            q_mask,
            take(candidates, start, size),
            take(c_mask, start, size),
            take(candidate_scales, start, size),
        )

    # Every chunk has the same size: the last one is shifted back to end at the last candidate
    # (overlapping its predecessor, whose scores it rewrites with the same values). A separate,
    # smaller remainder chunk made XLA:CPU run bfloat16 scoring ~3x slower (jax 0.10.2).
    num_chunks = -(-num_candidates // chunk_size)

    def body(i, scores):
        start = jnp.minimum(i * chunk_size, num_candidates - chunk_size)
        return lax.dynamic_update_slice(scores, chunk_scores(start, chunk_size), (0, start))

    # Under shard_map the carry must vary over the same mesh axes as the chunk scores the body
    # writes, i.e. those of the inputs: zeros_like keeps an input's varying axes, so the sum
    # below has all of them. (Scoring a first chunk outside the loop would give the type too, but
    # then XLA:CPU converted the whole bfloat16 array up front: ~2x slower.)
    inputs = (queries, candidates, query_mask, candidate_mask, candidate_scales)
    initial = jnp.zeros((num_queries, num_candidates), jnp.float32)
    for x in inputs:
        if x is not None:
            initial = initial + jnp.zeros_like(x, jnp.float32, shape=())
    return lax.fori_loop(0, num_chunks, body, initial)


def bfloat16_words(candidates, r_c=None):
    """The raw 16-bit words of bfloat16 candidates' first r_c vectors (other dtypes pass).

    XLA:CPU (jax 0.10.2) converts a bfloat16 array that is dynamic-sliced inside a loop to
    float32 as a whole, i.e. a full-index copy per call; looping over the raw words touches only
    the vectors the budget needs. The words are bitcast back to bfloat16 per chunk.
    """
    if candidates.dtype != jnp.bfloat16:
        return candidates
    prefix = candidates if r_c is None else candidates[:, :r_c]
    return lax.bitcast_convert_type(prefix, jnp.uint16)


@functools.partial(jax.jit, static_argnames=("r_q", "r_c", "chunk_size"))
def _maxsim_jit(
    queries, candidates, query_mask, candidate_mask, candidate_scales, *, r_q, r_c, chunk_size
):
    return chunked_scores(
        queries,
        bfloat16_words(candidates, r_c),
        query_mask,
        candidate_mask,
        candidate_scales,
        r_q=r_q,
        r_c=r_c,
        chunk_size=chunk_size,
    )


def maxsim(
    queries,
    candidates,
    budget=None,
    query_mask=None,
    candidate_mask=None,
    *,
    candidate_scales=None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Budgeted MaxSim scores of every query against every candidate.

    Args:
      queries: [Nq, R_q, D] float32 or bfloat16.
      candidates: [Nc, R_c, D] float32, bfloat16 or int8 (int8: pass ``candidate_scales``, the
        per-vector dequantisation scale [Nc, R_c]; without it the raw integers are used).
      budget: (r_q, r_c) prefix sizes; None = all stored vectors.
      query_mask: [Nq, R_q] (nonzero = real); masked query vectors add 0 to the score.
      candidate_mask: [Nc, R_c]; masked candidate vectors never win a max (a candidate with all
        vectors masked scores -inf).
      chunk_size: candidates per chunk (memory bound); the result does not depend on it.

    Returns:
      [Nq, Nc] float32. bfloat16 candidates are multiplied in bfloat16 (queries rounded to
      bfloat16) with float32 accumulation; float32 and int8 candidates in float32.

    Raises:
      ValueError: wrong ranks, mismatched D, bad dtypes, mask shapes or budget.
    """
    _check_inputs(queries, candidates, query_mask, candidate_mask, candidate_scales)
    r_q, r_c = resolve_budget(budget, queries.shape[1], candidates.shape[1])
    num_candidates = candidates.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(
            queries.shape[0] * r_q, r_c, num_candidates, candidates.shape[2], candidates.itemsize
        )
    elif not (isinstance(chunk_size, int | np.integer) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if num_candidates == 0 or queries.shape[0] == 0:
        return jnp.zeros((queries.shape[0], num_candidates), jnp.float32)
    return _maxsim_jit(
        jnp.asarray(queries),
        jnp.asarray(candidates),
        None if query_mask is None else jnp.asarray(query_mask),
        None if candidate_mask is None else jnp.asarray(candidate_mask),
        None if candidate_scales is None else jnp.asarray(candidate_scales, jnp.float32),
        r_q=r_q,
        r_c=r_c,
        chunk_size=int(min(chunk_size, num_candidates)),
    )


def top_k(scores, k: int):
    """Top ``k`` scores per row, best first; equal scores keep the lower index first.

    Args:
      scores: [..., N] float.
      k: 1 <= k <= N.

    Returns:
      (values [..., k] float32, indices [..., k] int32).
    """
    n = np.shape(scores)[-1]
    if not (isinstance(k, int | np.integer) and 1 <= k <= n):
        raise ValueError(f"k must be an int in [1, {n}] for scores of shape {np.shape(scores)}")
    # lax.top_k is documented (and relied on here) to return the lower index first on ties.
    values, indices = lax.top_k(jnp.asarray(scores, jnp.float32), int(k))
    return values, indices
