"""`layers.Dense`'s matmul has a custom backward (it transposes the input, not the output
gradient): its gradients must equal autodiff of the plain product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaembed_jax.models.layers import _matmul


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_gradients_equal_autodiff_of_the_plain_product(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 8)), dtype)
    kernel = jnp.asarray(rng.standard_normal((8, 6)), dtype)
    weights = jnp.asarray(rng.standard_normal((3, 5, 6)), dtype)

    def loss(fn):
        return lambda x, k: jnp.sum((fn(x, k) * weights).astype(jnp.float32))

    ours = jax.grad(loss(_matmul), argnums=(0, 1))(x, kernel)
    plain = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, kernel)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for got, want in zip(ours, plain, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(
            np.asarray(got, np.float32),
            np.asarray(want, np.float32),
            rtol=tolerance,
            atol=tolerance,
        )
    assert float(jnp.abs(ours[1].astype(jnp.float32)).max()) > 0.1  # a real gradient, not zeros


def test_no_kernel_gradient_leaves_one_dot():
    """A frozen kernel (LoRA's base weight) needs only the input's gradient: XLA removes the
    custom backward's kernel product, so the compiled backward holds one dot, not two."""
    x, kernel = jnp.ones((3, 5, 8)), jnp.ones((8, 6))

    def dots(argnums):
        grad = jax.grad(lambda x, k: jnp.sum(_matmul(x, k)), argnums=argnums)
        return jax.jit(grad).lower(x, kernel).compile().as_text().count(" dot(")

    assert dots(0) == 1
    assert dots((0, 1)) == 2
