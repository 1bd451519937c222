"""Build the MetaEmbed model a config describes: from a local HF checkpoint (`config.init_from`)
or randomly initialised from `config.model.hf_config`, with LoRA, dtypes and remat applied,
directly onto the mesh when one is given."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from metaembed_jax import sharding
from metaembed_jax.metaembed import MetaEmbed
from metaembed_jax.models import layers
from metaembed_jax.models.hub import resolve_checkpoint
from metaembed_jax.models.layers import LoRASpec
from metaembed_jax.models.rules import read_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def lora_spec(config) -> LoRASpec | None:
    """The LoRA adapter of `config.lora`, or None for full fine-tuning."""
    lora = config.lora
    if not lora.enabled:
        return None
    targets = lora.get("target_regex") or tuple(lora.targets)
    if lora.rank < 1 or not targets:
        raise ValueError(
            f"config.lora: rank={lora.rank}, targets={targets}; expected rank >= 1 "
            "and at least one target module"
        )
    return LoRASpec(
        int(lora.rank),
        float(lora.alpha),
        float(lora.dropout),
        targets,
        use_rslora=bool(lora.get("rslora", False)),
    )


def hf_config_dict(config, vocab_size: int | None = None) -> dict[str, Any]:
    """`config.model.hf_config` as a plain dict; a vocab size of 0 means "the tokenizer's"."""
    hf = config.model.hf_config.to_dict()
    text = hf.get("text_config", hf)
    if text.get("vocab_size") and vocab_size and vocab_size > text["vocab_size"]:
        # Token ids past the embedding table would embed as NaN under jit, silently.
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but config.model.hf_config has vocab_size "
            f"{text['vocab_size']}; set it to 0 (= the tokenizer's size) or >= {vocab_size}"
        )
    if not text.get("vocab_size"):
        if not vocab_size:
            raise ValueError(
                "config.model.hf_config vocab_size is 0 (= the tokenizer's) but no tokenizer "
                "vocabulary size was given"
            )
        text["vocab_size"] = int(vocab_size)
        hf["vocab_size"] = int(vocab_size)
    return hf


def model_kwargs(config) -> dict[str, Any]:
    """Keyword arguments shared by `MetaEmbed.from_pretrained` and `MetaEmbed.from_config`."""
    model = config.model
    return dict(
        num_query_tokens=int(model.num_query_tokens),
        num_candidate_tokens=int(model.num_candidate_tokens),
        projection_dim=int(model.projection_dim) or None,
        readout=model.readout,
        dtype=dtype_of(model.dtype),
        param_dtype=dtype_of(model.param_dtype),
        lora=lora_spec(config),
        remat=model.remat,
    )


def configure_model(model: MetaEmbed, config) -> MetaEmbed:
    """Apply the model options that are not weights' shapes (`config.model.vision_per_example`,
    for a backbone that has the choice) to a built model; returns it."""
    if hasattr(model.backbone, "vision_per_example"):
        model.backbone.vision_per_example = bool(config.model.get("vision_per_example", False))
    return model


def check_init_from(config) -> None:
    """Raise FileNotFoundError unless `config.init_from` is empty or a checkpoint directory."""
    path = resolve_checkpoint(config.init_from)
    if path and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"config.init_from={path!r} is not a Hugging Face checkpoint directory (expected "
            f"{os.path.join(path, 'config.json')} and *.safetensors)"
        )


def base_hf_config(config, vocab_size: int | None = None) -> dict[str, Any]:
    """The transformers config of the backbone `config` builds: `init_from`'s config.json or
    `model.hf_config` (with the tokenizer's vocabulary size filled in)."""
    if config.init_from:
        return read_config(resolve_checkpoint(config.init_from))
    return hf_config_dict(config, vocab_size)


def base_source(config) -> str:
    """Where the backbone's weights come from, in words (for error messages)."""
    if config.init_from:
        return f"checkpoint {config.init_from}"
    return f"random initialisation of config.model.hf_config with seed {config.seed}"


def build_model(config, *, mesh: Mesh | None = None, vocab_size: int | None = None) -> MetaEmbed:
    """The MetaEmbed of `config`, every variable placed on `mesh` by the logical-axis rules (the
    one placement: `create_train_state` keeps it).

    Random initialisation is seeded by `config.seed` and does not depend on the mesh.
    Raises FileNotFoundError for a missing `init_from` dir, ValueError for bad model fields.
    """
    check_init_from(config)
    # Read when the step is traced, i.e. after this: one process-wide choice for every family.
    layers.set_attention_impl(config.model.get("attention_impl", "reference"))
    kwargs = model_kwargs(config)
    rngs_seed = int(config.seed)
    if config.init_from:
        # load_hf places the backbone's variables on the mesh; only MetaEmbed's own (meta tokens,
        # projection) are left to place.
        model = MetaEmbed.from_pretrained(
            config.init_from,
            rngs=nnx.Rngs(rngs_seed),
            mesh=mesh,
            rules=sharding.axis_rules(),
            **kwargs,
        )
        if mesh is not None:
            own = nnx.state(model, nnx.Not(nnx.PathContains("backbone")))
            nnx.update(model, sharding.shard_state(own, mesh))
        return configure_model(model, config)
    hf = hf_config_dict(config, vocab_size)

    def create() -> MetaEmbed:
        model = MetaEmbed.from_config(hf, rngs=nnx.Rngs(rngs_seed), **kwargs)
        return configure_model(model, config)

    if mesh is None:
        return create()
    # Build the parameters directly in their shards: no host ever holds the whole model.
    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    shardings = sharding.state_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)
