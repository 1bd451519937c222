"""The checkpoint reader and the rule-table loader, on a toy backbone registered for the test:
values land where the rules say (stacked layers, transposes, bf16), sharded checkpoints load,
and every mismatch is reported in one error."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from metaembed_jax import sharding
from metaembed_jax.models import hf_loading, layers, rules
from tests.helpers import register_loader_family


class ToyBlock(nnx.Module):
    def __init__(self, lora, rngs):
        self.proj = layers.Dense(4, 6, ("embed", "mlp"), use_bias=True, lora=lora, rngs=rngs)
        self.norm = layers.RMSNorm(6, 1e-6, rngs=rngs)


class ToyBackbone(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, lora, remat, rngs):
        self.embed = layers.make_param(
            rngs,
            nnx.initializers.normal(),
            (config["vocab_size"], 4),
            ("vocab", "embed"),
            param_dtype,
        )
        self.layers = layers.stack_layers(lambda r: ToyBlock(lora, r), config["num_layers"], rngs)


def toy_rules(config):
    return [
        rules.Rule(r"model\.embed_tokens\.weight", "embed"),
        rules.Rule(r"model\.layers\.(?P<layer>\d+)\.proj\.weight", "layers.proj.kernel", "linear"),
        rules.Rule(r"model\.layers\.(?P<layer>\d+)\.proj\.bias", "layers.proj.bias"),
        rules.Rule(r"model\.layers\.(?P<layer>\d+)\.norm\.weight", "layers.norm.scale"),
        rules.Rule(r"lm_head\.weight", None),
    ]


register_loader_family(
    "toy_test", ToyBackbone, toy_rules, key_aliases=(("model.language_model.", "model."),)
)


def toy_tensors(num_layers=2, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    tensors = {
        "model.embed_tokens.weight": rng.normal(size=(10, 4)),
        "lm_head.weight": rng.normal(size=(10, 4)),
    }
    for i in range(num_layers):
        tensors[f"model.layers.{i}.proj.weight"] = rng.normal(size=(6, 4))
        tensors[f"model.layers.{i}.proj.bias"] = rng.normal(size=(6,))
        tensors[f"model.layers.{i}.norm.weight"] = rng.normal(size=(6,))
    return {k: v.astype(dtype) for k, v in tensors.items()}


def write_checkpoint(directory, tensors, num_layers=2, shards=1):
    (directory / "config.json").write_text(
        json.dumps({"model_type": "toy_test", "vocab_size": 10, "num_layers": num_layers})
    )
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return
    weight_map = {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[shard::shards]}
        save_file(part, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def check_values(model, tensors):
    np.testing.assert_array_equal(model.embed[...], tensors["model.embed_tokens.weight"])
    for i in range(2):
        np.testing.assert_array_equal(
            model.layers.proj.kernel[...][i], tensors[f"model.layers.{i}.proj.weight"].T
        )
        np.testing.assert_array_equal(
            model.layers.proj.bias[...][i], tensors[f"model.layers.{i}.proj.bias"]
        )
        np.testing.assert_array_equal(
            model.layers.norm.scale[...][i], tensors[f"model.layers.{i}.norm.weight"]
        )


@pytest.mark.parametrize("shards", [1, 3])
def test_values_land_where_rules_say(tmp_path, shards):
    tensors = toy_tensors()
    write_checkpoint(tmp_path, tensors, shards=shards)
    check_values(hf_loading.load_hf(tmp_path), tensors)


def test_bfloat16_checkpoint_and_key_aliases(tmp_path):
    tensors = toy_tensors(dtype=ml_dtypes.bfloat16)
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
    write_checkpoint(tmp_path, renamed)
    model = hf_loading.load_hf(tmp_path, dtype=jnp.bfloat16)
    assert model.embed[...].dtype == jnp.bfloat16
    check_values(model, tensors)


def test_every_mismatch_reported_at_once(tmp_path):
    tensors = toy_tensors()
    del tensors["model.layers.1.norm.weight"]
    tensors["model.layers.0.proj.bias"] = np.zeros((5,), np.float32)
    tensors["vision.extra.weight"] = np.zeros((2,), np.float32)
    write_checkpoint(tmp_path, tensors)
    with pytest.raises(hf_loading.CheckpointMismatchError) as error:
        hf_loading.load_hf(tmp_path)
    message = str(error.value)
    assert "3 problem(s)" in message
    assert "missing tensor for layers.norm.scale at layers [1]" in message
    assert "wrong shape for layers.proj.bias" in message and "(5,)" in message
    assert "unexpected tensor vision.extra.weight" in message


def test_lora_adapters_start_fresh_and_base_loads(tmp_path):
    tensors = toy_tensors()
    write_checkpoint(tmp_path, tensors)
    model = hf_loading.load_hf(tmp_path, lora=layers.LoRASpec(rank=2, alpha=4.0, targets=("proj",)))
    check_values(model, tensors)
    assert model.layers.proj.lora_a[...].shape == (2, 4, 2)
    assert float(jnp.abs(model.layers.proj.lora_a[...]).sum()) > 0
    np.testing.assert_array_equal(model.layers.proj.lora_b[...], 0.0)


def test_placed_on_mesh_by_logical_rules(tmp_path):
    tensors = toy_tensors()
    write_checkpoint(tmp_path, tensors)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, jax.devices()[:8])
    model = hf_loading.load_hf(tmp_path, mesh=mesh)  # the project's rules table by default
    kernel = model.layers.proj.kernel[...]  # [2 layers, 4, 6]: 6 not divisible by 4 devices
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    embed = model.embed[...]  # [10, 4]: vocab 10 not divisible by 4 -> replicated, embed by fsdp
    assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    check_values(model, tensors)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_loading.load_hf(tmp_path / "nope")
