"""mmr_loss against a direct numpy transcription of the formula in docs/design.md, its gradient
against finite differences, the sharded (shard_map) path against the single-device one, and the
errors a user can cause."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metaembed_jax.losses import MMR_GROUPS, groups_for_variant, mmr_loss
from metaembed_jax.training.config import base_config, loss_temperatures


def numpy_mmr_loss(q, pos, neg, groups, tau):
    """docs/design.md, literally: per group, per query, logits over all positives, own negatives."""
    batch = q.shape[0]
    group_losses = []
    for r_q, r_c, _ in groups:

        def score(query, cand, r_q=r_q, r_c=r_c):
            sims = query[:r_q] @ cand[:r_c].T
            return sims.max(axis=1).sum()

        total = 0.0
        for b in range(batch):
            logits = [score(q[b], pos[c]) for c in range(batch)]
            if neg is not None:
                logits += [score(q[b], n) for n in neg[b]]
            logits = np.asarray(logits, np.float64) / tau
            log_z = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
            total += log_z - logits[b]
        group_losses.append(total / batch)
    weights = np.asarray([w for _, _, w in groups])
    return float(np.sum(weights * np.asarray(group_losses)) / len(groups)), np.asarray(group_losses)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_embeddings(seed, batch=4, r_q=16, r_c=64, dim=8, n_neg=2):
    rng = np.random.default_rng(seed)
    q = unit(rng.normal(size=(batch, r_q, dim))).astype(np.float32)
    pos = unit(rng.normal(size=(batch, r_c, dim))).astype(np.float32)
    neg = unit(rng.normal(size=(batch, n_neg, r_c, dim))).astype(np.float32)
    return q, pos, neg


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize(
    "groups",
    [MMR_GROUPS, ((16, 64, 1.0),), ((1, 1, 0.5), (3, 5, 2.0)), ((2, 2, 1.0), (16, 64, 0.25))],
)
def test_matches_numpy_transcription(with_negatives, groups):
    q, pos, neg = make_embeddings(0)
    neg = neg if with_negatives else None
    loss, aux = mmr_loss(q, pos, neg, groups=groups, temperature=0.05)
    want, want_groups = numpy_mmr_loss(q, pos, neg, groups, 0.05)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["group_losses"]), want_groups, rtol=1e-5)


def test_per_group_temperatures_match_numpy_and_scale_with_r_q():
    """A temperature per group = the transcription run group by group with its own tau; the
    config switch scale_temperature_by_r_q gives tau * r_q (the mean instead of the sum of the
    query vectors' maxima); a wrong count is refused."""
    q, pos, neg = make_embeddings(1)
    groups = ((1, 1, 1.0), (4, 8, 0.5), (16, 64, 2.0))
    taus = (0.05, 0.2, 0.8)
    loss, aux = mmr_loss(q, pos, neg, groups=groups, temperature=taus)
    want = [numpy_mmr_loss(q, pos, neg, (g,), t)[1][0] for g, t in zip(groups, taus, strict=True)]
    np.testing.assert_allclose(np.asarray(aux["group_losses"]), want, rtol=1e-5)
    weighted = sum(g[2] * w for g, w in zip(groups, want, strict=True)) / len(groups)
    np.testing.assert_allclose(float(loss), weighted, rtol=1e-5)

    config = base_config()
    config.loss.groups, config.loss.temperature = groups, 0.05
    assert loss_temperatures(config) == (0.05, 0.05, 0.05)
    config.loss.scale_temperature_by_r_q = True
    np.testing.assert_allclose(loss_temperatures(config), (0.05, 0.2, 0.8))
    config.loss.variant = "nommr"  # only the full-budget group: one temperature, 16 tau
    np.testing.assert_allclose(loss_temperatures(config), (0.8,))
    with pytest.raises(ValueError, match="2 temperatures for 3 loss groups"):
        mmr_loss(q, pos, neg, groups=groups, temperature=(0.1, 0.2))


def test_gradient_matches_finite_differences():
    """jax.grad of the float32 loss vs central differences of the float64 numpy transcription."""
    q, pos, neg = make_embeddings(1, batch=3, dim=4)
    groups = ((1, 1, 1.0), (2, 4, 1.0), (16, 64, 0.5))
    tau = 0.5
    grads = jax.grad(lambda *a: mmr_loss(*a, groups=groups, temperature=tau)[0], argnums=(0, 1, 2))(
        q, pos, neg
    )
    args64 = [x.astype(np.float64) for x in (q, pos, neg)]
    rng = np.random.default_rng(2)
    eps = 1e-6
    for arg_index, grad in enumerate(grads):
        for _ in range(5):
            index = tuple(rng.integers(s) for s in args64[arg_index].shape)
            plus = [a.copy() for a in args64]
            minus = [a.copy() for a in args64]
            plus[arg_index][index] += eps
            minus[arg_index][index] -= eps
            numeric = (
                numpy_mmr_loss(*plus, groups, tau)[0] - numpy_mmr_loss(*minus, groups, tau)[0]
            ) / (2 * eps)
            np.testing.assert_allclose(float(grad[index]), numeric, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape, with_negatives", [((8, 1), False), ((4, 2), True), ((2, 2), True)])
def test_sharded_equals_single_device(shape, with_negatives):
    """Positives gathered across shards (with gradient) = the global-batch loss and gradient."""
    data, fsdp = shape
    tensor = 8 // (data * fsdp)
    mesh = jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))
    q, pos, neg = make_embeddings(3, batch=8)
    neg = neg if with_negatives else None

    def f(q, pos, neg, mesh):
        return mmr_loss(q, pos, neg, temperature=0.1, mesh=mesh)

    want, want_grads = jax.value_and_grad(lambda *a: f(*a, None)[0], argnums=(0, 1))(q, pos, neg)
    put = lambda x: (
        None
        if x is None
        else jax.device_put(  # noqa: E731
            x, NamedSharding(mesh, P(("data", "fsdp")))
        )
    )
    sharded = jax.jit(jax.value_and_grad(lambda *a: f(*a, mesh)[0], argnums=(0, 1)))
    got, got_grads = sharded(put(q), put(pos), put(neg))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=5e-6)


def test_group_larger_than_meta_tokens_is_a_clear_error():
    q, pos, _ = make_embeddings(0, r_q=8, r_c=16)
    with pytest.raises(ValueError, match=r"\(16, 64, 1.0\).*8 query and 16 candidate"):
        mmr_loss(q, pos, groups=MMR_GROUPS)


def test_mismatched_shapes_are_a_clear_error():
    q, pos, neg = make_embeddings(0)
    with pytest.raises(ValueError, match="neg"):
        mmr_loss(q, pos, neg[:, :, :8])
    with pytest.raises(ValueError, match="equal B"):
        mmr_loss(q, pos[:2])


def test_variants():
    assert groups_for_variant("mmr") == MMR_GROUPS
    assert groups_for_variant("nommr") == ((16, 64, 1.0),)
    assert groups_for_variant("single") == ((1, 1, 1.0),)
    with pytest.raises(ValueError, match="loss variant 'bogus'"):
        groups_for_variant("bogus")


def test_loss_chunks_by_its_own_block_bound_not_the_search_default(monkeypatch):
    """The search's block size is a speed knob; the loss's chunks (and so its rounding, which
    the demo recipe amplifies into a different model) must not follow it."""
    from metaembed_jax import losses, scoring

    chunks = []

    def recording_maxsim(queries, candidates, budget=None, *, chunk_size=None):
        chunks.append((queries.shape[0] * budget[0], budget[1], candidates.shape[0], chunk_size))
        return scoring.maxsim(queries, candidates, budget=budget, chunk_size=chunk_size)

    monkeypatch.setattr(losses, "maxsim", recording_maxsim)
    q, pos, neg = make_embeddings(0, batch=32)
    loss_here, _ = mmr_loss(q, pos, neg, groups=MMR_GROUPS, temperature=0.05)
    seen = list(chunks)
    monkeypatch.setattr(scoring, "DEFAULT_BLOCK_ELEMENTS", 1 << 30)
    chunks.clear()
    loss_other_default, _ = mmr_loss(q, pos, neg, groups=MMR_GROUPS, temperature=0.05)
    assert chunks == seen
    assert float(loss_here) == float(loss_other_default)
    # 32 queries x 16 vectors x 64 candidate vectors = 32K floats per candidate: 128K floats
    # hold 4, raised to the 8-candidate minimum; the smaller groups fit the batch in one chunk.
    assert (32 * 16, 64, 32, 8) in seen
    assert (32 * 8, 16, 32, 32) in seen
