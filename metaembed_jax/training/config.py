"""The training config every recipe in `configs/` starts from; every field is described here.

A recipe (`configs/*.py`) calls `base_config()` and overrides fields; command-line overrides use
`--config.train.steps=100` etc. `validate_config` checks a config before anything is built.
"""

from __future__ import annotations

import math

from ml_collections import ConfigDict, config_dict

from metaembed_jax.data.config import get_data_config
from metaembed_jax.losses import LOSS_VARIANTS, MMR_GROUPS, groups_for_variant, validate_groups

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_config() -> ConfigDict:
    config = ConfigDict()
    # Seed of parameter initialisation (meta tokens, LoRA, random backbones), dropout and shuffle.
    config.seed = 0
    # Local Hugging Face checkpoint dir (config.json + *.safetensors) the backbone is loaded from;
    # "" = random initialisation from `model.hf_config` (the demo). Its tokenizer is used too.
    config.init_from = ""

    config.model = ConfigDict()
    # transformers config of a random backbone (used only when init_from is ""), as a dict (e.g.
    # `Qwen2_5_VLConfig(...).to_dict()` fields). text_config.vocab_size = 0: the tokenizer's size.
    config.model.hf_config = ConfigDict()
    # Meta tokens: R_q query and R_c candidate tokens (official 16 / 64).
    config.model.num_query_tokens = 16
    config.model.num_candidate_tokens = 64
    # Width of an optional linear projection of the meta states (0 = none, D = hidden size).
    config.model.projection_dim = 0
    # "meta" (MetaEmbed) or "last_token" (the `single` baseline, one vector per item).
    config.model.readout = "meta"
    # Compute dtype (activations, matmuls) and storage dtype of the weights (master copy).
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    # Rematerialisation of the decoder layers in the backward pass: "none", "full", "dots".
    config.model.remat = "none"
    # Attention implementation of every family (models.layers.ATTENTION_IMPLS): "reference"
    # (einsum, exact), "xla" (jax.nn.dot_product_attention: XLA or cuDNN choose) or "pallas"
    # (flash kernel with segment ids on TPU / GPU). Applied process-wide by build_model.
    config.model.attention_impl = "reference"
    # Qwen2-VL / 2.5-VL in the per-example image layout: False runs the vision tower once over
    # the batch's images packed together; True runs it per example (`nnx.vmap`), so its work
    # splits over the batch shards: the large recipes need it on a pod (docs/tpu.md). The two
    # are equal up to rounding, which training amplifies: the demo keeps the packed tower.
    config.model.vision_per_example = False

    config.lora = ConfigDict()
    # LoRA adapters on dense layers (frozen base); False = full fine-tuning of every weight.
    config.lora.enabled = False
    config.lora.rank = 32
    config.lora.alpha = 32.0
    config.lora.dropout = 0.1
    # The adapted layers, chosen as PEFT's `target_modules` list chooses them over transformers'
    # module names: each name adapts every dense layer of that name, in the text decoder, the
    # vision tower and the projector alike (q_proj ... down_proj: also Qwen2.5-VL's vision MLP,
    # as the reference recipe's regex does).
    config.lora.targets = LORA_TARGETS
    # A regex PEFT full-matches against transformers' module names (its `target_modules`
    # string form, e.g. r".*language_model.*(q|v)_proj"); when set it replaces `targets`.
    config.lora.target_regex = ""
    # rsLoRA scaling, alpha / sqrt(rank) instead of alpha / rank (PEFT's use_rslora).
    config.lora.rslora = False

    config.loss = ConfigDict()
    # "mmr" (all groups), "nommr" (only the last, full-budget group), "single" (one vector;
    # use with model.readout = "last_token").
    config.loss.variant = "mmr"
    # Matryoshka groups (r_q, r_c, weight); each must fit in R_q x R_c.
    config.loss.groups = MMR_GROUPS
    # InfoNCE temperature tau.
    config.loss.temperature = 0.03
    # True: group (r_q, r_c) uses temperature * r_q, i.e. its logits are each query's MEAN rather
    # than sum of its r_q MaxSim terms (same ranking). With summed scores (False, the paper's
    # loss) the (16, 64) group's softmax is 16x sharper than the (1, 1) group's.
    config.loss.scale_temperature_by_r_q = False

    config.optimizer = ConfigDict()
    # AdamW peak learning rate, reached after `warmup_steps` of linear warm-up.
    config.optimizer.lr = 1e-4
    config.optimizer.warmup_steps = 500
    # Decay after warm-up: "linear" (to lr * end_factor at the last step), "cosine", "constant".
    config.optimizer.schedule = "linear"
    config.optimizer.end_factor = 0.0
    config.optimizer.weight_decay = 0.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    # Clip gradients to this global norm (0 = no clipping).
    config.optimizer.grad_clip = 1.0

    config.train = ConfigDict()
    # Optimizer steps to run in total.
    config.train.steps = 4000
    # Global batch (queries per optimizer step, over all devices and micro-batches).
    config.train.batch_size = 384
    # Micro-batches per step (gradient accumulation); batch_size must divide by it. In-batch
    # negatives then come from the micro-batch of batch_size / grad_accum_steps examples,
    # unless grad_cache is on.
    config.train.grad_accum_steps = 1
    # Gradient caching: the grad_accum_steps micro-batches form ONE contrastive batch (every
    # query against every positive of the global batch, as with grad_accum_steps = 1) at the
    # activation memory of one micro-batch, for one extra forward pass per micro-batch.
    config.train.grad_cache = False
    # Write metrics every this many steps.
    config.train.log_every = 10
    # Show a tqdm progress bar (process 0 only).
    config.train.progress_bar = True
    # Stop (with a checkpoint, as on SIGTERM) after this many steps of this run; 0 = never.
    config.train.stop_after = 0

    config.checkpoint = ConfigDict()
    # Save every this many steps (and at the end, and on SIGTERM / SIGINT).
    config.checkpoint.every = 500
    # Checkpoints kept (older ones deleted).
    config.checkpoint.keep = 3
    # Write checkpoints in a background thread while training continues.
    config.checkpoint.async_save = True

    config.mesh = ConfigDict()
    # Device mesh sizes; -1 = all remaining devices. batch over data x fsdp, weights over fsdp
    # (FSDP) and tensor (tensor parallelism).
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1

    config.distributed = ConfigDict()
    # jax.distributed start-up: "auto" (when a cluster environment is detected), "on", "off".
    config.distributed.mode = "auto"
    # Explicit coordinator "host:port", process count and id ("" / -1 = from the environment).
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = -1
    config.distributed.process_id = -1

    # Input pipeline (metaembed_jax/data/config.py documents every field).
    config.data = get_data_config()

    config.eval = ConfigDict()
    # Budgets (r_q, r_c) scored by eval.py. None: the paper's five, (1,1) (2,4) (4,8) (8,16)
    # (16,64), or only (1,1) for the single-vector readout. Any r_q <= R_q, r_c <= R_c is allowed.
    # A typed placeholder, so `--config.eval.budgets='((1,1),(4,8))'` parses as a tuple.
    config.eval.budgets = config_dict.placeholder(tuple)
    # Items encoded per jitted call (rounded up to a multiple of the batch shards).
    config.eval.batch_size = 16
    # Storage of the cached candidate index: "float32", "bfloat16" or "int8".
    config.eval.index_dtype = "float32"
    # Evaluate the built-in dataset's `split` ("validation" or "test"), per task type.
    config.eval.builtin = True
    config.eval.split = "test"
    # Write DIR/eval/scaling.png (quality, latency and index size vs budget).
    config.eval.plot = True
    # Every field is declared above: a recipe or a command-line override naming any other key is
    # an error (naming it), not a silently ignored setting.
    config.lock()
    return config


def loss_groups(config) -> tuple:
    """The groups the configured loss variant trains."""
    return groups_for_variant(config.loss.variant, config.loss.groups)


def loss_temperatures(config) -> tuple[float, ...]:
    """The temperature of each of `loss_groups(config)` (see loss.scale_temperature_by_r_q)."""
    tau = float(config.loss.temperature)
    scale = bool(config.loss.get("scale_temperature_by_r_q", False))
    return tuple(tau * (r_q if scale else 1) for r_q, _, _ in loss_groups(config))


def validate_config(config, num_batch_shards: int | None = None) -> None:
    """Raise a clear ValueError for a config that cannot train; called before building anything.

    Checks: loss variant and groups against the meta tokens, readout/variant agreement, batch
    divisible by micro-batches and by the batch shards of the mesh, positive step counts, and
    the values that lose data or cannot train (no checkpoint kept, a temperature or learning
    rate <= 0, Adam betas outside [0, 1), a negative clip / decay / warm-up, LoRA rank < 1).
    """
    if config.loss.variant not in LOSS_VARIANTS:
        raise ValueError(f"config.loss.variant={config.loss.variant!r}; expected {LOSS_VARIANTS}")
    single = config.model.readout == "last_token"
    if single != (config.loss.variant == "single"):
        raise ValueError(
            f"config.model.readout={config.model.readout!r} with config.loss.variant="
            f"{config.loss.variant!r}: the 'single' variant goes with readout 'last_token', "
            "the others with 'meta'"
        )
    r_q, r_c = (
        (1, 1) if single else (config.model.num_query_tokens, config.model.num_candidate_tokens)
    )
    try:
        validate_groups(loss_groups(config), r_q, r_c)
    except ValueError as error:
        raise ValueError(f"config.loss.groups: {error}") from None
    train = config.train
    for name in ("steps", "batch_size", "log_every", "grad_accum_steps"):
        if int(train[name]) < 1:
            raise ValueError(f"config.train.{name}={train[name]}; expected >= 1")
    for name in ("every", "keep"):
        if int(config.checkpoint[name]) < 1:
            raise ValueError(f"config.checkpoint.{name}={config.checkpoint[name]}; expected >= 1")
    _check_values(config)
    if train.batch_size % train.grad_accum_steps:
        raise ValueError(
            f"config.train.batch_size={train.batch_size} is not divisible by "
            f"grad_accum_steps={train.grad_accum_steps}"
        )
    micro = train.batch_size // train.grad_accum_steps
    if num_batch_shards and micro % num_batch_shards:
        fitting = [
            steps
            for steps in range(1, train.batch_size + 1)
            if train.batch_size % steps == 0 and (train.batch_size // steps) % num_batch_shards == 0
        ]
        hint = (
            f"; e.g. --config.train.grad_accum_steps={fitting[-1]} (micro-batch "
            f"{train.batch_size // fitting[-1]}, the smallest that splits)"
            if fitting
            else ""
        )
        raise ValueError(
            f"config.train.batch_size={train.batch_size} (micro-batch {micro}) is not divisible "
            f"by the {num_batch_shards} batch shards of the mesh (data x fsdp = "
            f"{config.mesh.data} x {config.mesh.fsdp}){hint}"
        )


# (section, field, test, what is expected): values that fail divide by zero, never move the
# weights, or diverge.
_RANGES = (
    ("loss", "temperature", lambda v: v > 0, "> 0 (the logits are scores / temperature)"),
    ("optimizer", "lr", lambda v: v > 0, "> 0 (a rate <= 0 does not train)"),
    ("optimizer", "warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optimizer", "end_factor", lambda v: v >= 0, ">= 0 (a negative final rate diverges)"),
    ("optimizer", "weight_decay", lambda v: v >= 0, ">= 0 (negative decay grows the weights)"),
    ("optimizer", "b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer", "b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer", "eps", lambda v: v > 0, "> 0 (Adam divides by sqrt(v) + eps)"),
    ("optimizer", "grad_clip", lambda v: v >= 0, ">= 0 (0 = no clipping)"),
)


def _check_values(config) -> None:
    """The finite-number ranges of `_RANGES`, and LoRA's rank / dropout when enabled."""
    for section, name, fits, expected in _RANGES:
        value = config[section][name]
        number = float(value) if isinstance(value, int | float) else math.nan
        if not (math.isfinite(number) and fits(number)):
            raise ValueError(
                f"config.{section}.{name}={value!r}; expected a finite number {expected}"
            )
    if config.lora.enabled:
        if int(config.lora.rank) < 1:
            raise ValueError(f"config.lora.rank={config.lora.rank}; expected >= 1")
        if not 0.0 <= float(config.lora.dropout) < 1.0:
            raise ValueError(f"config.lora.dropout={config.lora.dropout}; expected in [0, 1)")
