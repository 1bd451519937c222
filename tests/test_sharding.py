"""Mesh construction from config sizes, the logical-axis rules, and state placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from metaembed_jax.models.layers import Dense, LoRASpec, make_param
from metaembed_jax.sharding import logical_to_spec, make_mesh, shard_state


@pytest.mark.parametrize(
    "sizes, want",
    [
        ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
        ({"data": 4, "fsdp": 2, "tensor": 1}, (4, 2, 1)),
    ],
)
def test_make_mesh_fills_the_rest(sizes, want):
    mesh = make_mesh(sizes)
    assert tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor")) == want


@pytest.mark.parametrize(
    "sizes, match",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices; 8 are available"),
        ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one -1"),
        ({"data": -1, "fsdp": 3, "tensor": 1}, "not divisible by 3"),
    ],
)
def test_make_mesh_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(sizes)


def test_rules_replicate_what_does_not_divide_and_never_reuse_an_axis():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "heads"), (2, 64, 64), mesh) == P(
        None, "fsdp", "tensor"
    )
    assert logical_to_spec(("embed", "kv_heads"), (64, 3), mesh) == P("fsdp", None)
    assert logical_to_spec(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)
    assert logical_to_spec(("batch", None), (8, 5), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="'embd' has no rule"):
        logical_to_spec(("embd",), (4,), mesh)


def test_shard_state_places_params_by_their_names_and_keeps_values():
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.up = Dense(
                16, 32, ("embed", "mlp"), use_bias=True, rngs=rngs, lora=LoRASpec(4, 4.0, 0.0)
            )
            self.meta_tokens = make_param(
                rngs, nnx.initializers.normal(1.0), (6, 16), ("meta", "embed"), jnp.float32
            )

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
    placed = shard_state(state, mesh)
    assert placed["up"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
    assert placed["up"]["lora_b"][...].sharding.spec == P(None, "tensor")
    assert placed["meta_tokens"][...].sharding.spec == P(None, "fsdp")
    for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
