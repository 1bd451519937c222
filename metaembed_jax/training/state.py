"""Train state: the model split into trainable / frozen / other variables, plus AdamW state.

Trainable variables: every `nnx.Param` for full fine-tuning; with LoRA only the `nnx.LoRAParam`
adapters, the meta tokens and the optional projection (the base weights are never touched by the
optimizer, so they stay bit-identical). "Other" holds non-parameter state (dropout RNG streams).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metaembed_jax import sharding

# Always trained, also with LoRA: the meta tokens and the optional projection head.
ALWAYS_TRAINED = nnx.Any(nnx.PathContains("meta_tokens"), nnx.PathContains("projection"))


def trainable_filter(lora: bool) -> Any:
    """The nnx filter of trained variables (LoRA: adapters + meta tokens + projection)."""
    if lora:
        return nnx.All(nnx.Param, nnx.Any(nnx.LoRAParam, ALWAYS_TRAINED))
    return nnx.Param


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree (graphdef and optimizer are static)."""

    step: jax.Array  # int32 scalar: optimizer steps done
    params: nnx.State  # trained variables (float32 master weights)
    frozen: nnx.State  # parameters not trained (LoRA base weights); empty for full fine-tuning
    other: nnx.State  # non-parameter variables (RNG streams of dropout)
    opt_state: Any  # optax state of `tx`
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.frozen, self.other)


def make_schedule(optimizer_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then decay to `lr * end_factor` (linear or cosine) or constant."""
    lr = float(optimizer_config.lr)
    warmup = int(optimizer_config.warmup_steps)
    end = lr * float(optimizer_config.end_factor)
    kind = optimizer_config.schedule
    decay_steps = max(1, total_steps - warmup)
    if kind == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optimizer.schedule={kind!r}; expected linear, cosine or constant")
    if warmup <= 0:
        return decay
    # Warm-up starts at lr / warmup (HF Trainer's step-1 value), never at 0.
    warm = optax.linear_schedule(lr / warmup, lr, warmup - 1) if warmup > 1 else (lambda _: lr)
    return optax.join_schedules([warm, decay], [warmup])


def make_optimizer(optimizer_config, total_steps: int):
    """(AdamW with global-norm clipping, its learning-rate schedule).

    Equal settings return the same objects, so a second run in one process (a resume, a test)
    reuses the compiled train step instead of compiling it again.
    """
    settings = tuple(sorted(dict(optimizer_config).items()))
    return _cached_optimizer(settings, int(total_steps))


@functools.lru_cache(maxsize=16)
def _cached_optimizer(settings: tuple, total_steps: int):
    optimizer_config = types.SimpleNamespace(**dict(settings))
    schedule = make_schedule(optimizer_config, total_steps)
    chain = []
    if optimizer_config.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(float(optimizer_config.grad_clip)))
    chain.append(
        optax.adamw(
            schedule,
            b1=float(optimizer_config.b1),
            b2=float(optimizer_config.b2),
            eps=float(optimizer_config.eps),
            weight_decay=float(optimizer_config.weight_decay),
        )
    )
    return optax.chain(*chain), schedule


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, lora: bool, mesh: Mesh | None = None
) -> TrainState:
    """A fresh TrainState for `model`, whose variables `build_model` already placed on `mesh`:
    only the new arrays (optimizer state, step counter) are placed here. The model is put in
    training mode (LoRA dropout on; models are built in inference mode)."""
    model.train()
    graphdef, params, frozen, other = nnx.split(model, trainable_filter(lora), nnx.Param, ...)
    if mesh is not None:
        # Adam moments take their parameter's sharding (zeros_like keeps it); counters replicated.
        opt_state = jax.jit(tx.init)(params)
        opt_state = jax.device_put(opt_state, _opt_shardings(opt_state, mesh))
        step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P()))
    else:
        opt_state, step = tx.init(params), jnp.zeros((), jnp.int32)
    return TrainState(step, params, frozen, other, opt_state, graphdef, tx)


def _opt_shardings(opt_state: Any, mesh: Mesh) -> Any:
    replicated = NamedSharding(mesh, P())

    def one(leaf):
        current = getattr(leaf, "sharding", None)
        if isinstance(current, NamedSharding) and current.mesh == mesh:
            return current
        return replicated

    return jax.tree.map(one, opt_state)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings of every array of `state` (params by logical names; moments alike)."""
    param_shardings = sharding.state_shardings(state.params, mesh)
    replicated = NamedSharding(mesh, P())
    opt_shardings = _opt_shardings(state.opt_state, mesh)
    return state.replace(
        step=replicated,
        params=param_shardings,
        frozen=sharding.state_shardings(state.frozen, mesh),
        other=jax.tree.map(lambda _: replicated, state.other),
        opt_state=opt_shardings,
    )
