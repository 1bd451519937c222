"""Train-step throughput: the JAX step vs a PyTorch reference, same model, weights, batch, loss.

The reference is transformers' Qwen2.5-VL (eager PyTorch on CPU) with the same random weights
(saved by transformers, loaded by our loader), the meta tokens appended as extra embedding rows,
the same MMR loss (a torch transcription) and torch.optim.AdamW with the same clipping. Batches
are text-only (query / positive / hard negative), left-padded. One process, CPU.
MFU = XLA's FLOP count of the compiled step / step time / a measured float32 matmul peak.

    python benchmarks/bench_train_step.py [--hidden 128 --layers 2 --batch 16 --length 64]
    python benchmarks/bench_train_step.py --size representative   # hidden 512, 4 layers
    python benchmarks/bench_train_step.py --profile   # + forward / loss / backward on their own
    python benchmarks/bench_train_step.py --smoke     # tiny, one step, --profile (a test runs it)

`--size` sets the defaults of --hidden / --layers / --batch / --length / --head_dim /
--intermediate (explicit flags win): smoke (hidden 32, 1 layer, batch 2 x length 8; `--smoke`
adds one timed step and `--profile`), tiny (the default, hidden 128, 2 layers), representative
(hidden 512, 4 layers, batch 16 x 3 sides, length 128; head dim 16 as `tiny_config` gives it)
or qwen_shaped (the same with Qwen2.5-VL's head dim 128 and MLP width 5.375x). All text-only:
the PyTorch reference has no image path.
XLA's FLOP count counts the scanned layer body once, so the MFU printed is a lower bound.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from ml_collections import ConfigDict
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from benchmarks import machine_load
from metaembed_jax.losses import MMR_GROUPS
from metaembed_jax.models.qwen2_vl import tiny_config
from metaembed_jax.training.config import base_config
from metaembed_jax.training.gradients import compute_loss, embed_batch
from metaembed_jax.training.model import build_model
from metaembed_jax.training.state import create_train_state, make_optimizer
from metaembed_jax.training.step import TrainStep, _grads_one


def matmul_peak(size: int = 1024, repeats: int = 10) -> float:
    """float32 FLOP/s of a jitted square matmul (best of `repeats`)."""
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * size**3 / best


def text_batch(seed: int, batch: int, length: int, vocab: int) -> dict:
    """{"query", "positive", "negative"}: left-padded random text (3..length tokens, no images)."""
    rng = np.random.default_rng(seed)

    def side():
        lengths = rng.integers(3, length + 1, batch)
        mask = (np.arange(length)[None] >= length - lengths[:, None]).astype(np.int32)
        ids = np.where(mask, rng.integers(8, vocab, (batch, length)), 0).astype(np.int32)
        return {"input_ids": ids, "attention_mask": mask}

    return {name: side() for name in ("query", "positive", "negative")}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_mmr_loss(q, pos, neg, groups, tau):
    """The MMR loss (docs/design.md) in torch: q [B,Rq,D], pos [B,Rc,D], neg [B,Rc,D]."""
    losses = []
    targets = torch.arange(q.shape[0])
    for r_q, r_c, _ in groups:
        qg = q[:, :r_q]
        in_batch = torch.einsum("qid,cjd->qcij", qg, pos[:, :r_c]).amax(-1).sum(-1)
        own_neg = torch.einsum("qid,qjd->qij", qg, neg[:, :r_c]).amax(-1).sum(-1)
        logits = torch.cat([in_batch, own_neg[:, None]], dim=1) / tau
        losses.append(torch.nn.functional.cross_entropy(logits, targets))
    weights = torch.tensor([w for _, _, w in groups])
    return (weights * torch.stack(losses)).sum() / len(groups)


class TorchMetaEmbed(torch.nn.Module):
    def __init__(self, hf_model, meta_tokens: np.ndarray, r_q: int):
        super().__init__()
        self.model = hf_model.model
        self.meta = torch.nn.Parameter(torch.from_numpy(np.array(meta_tokens)))
        self.r_q = r_q

    def embed(self, side, input_ids, attention_mask):
        content = self.model.get_input_embeddings()(input_ids)
        batch, count = input_ids.shape[0], self.meta.shape[0]
        embeds = torch.cat([content, self.meta[None].expand(batch, -1, -1)], dim=1)
        mask = torch.cat([attention_mask, torch.ones(batch, count, dtype=attention_mask.dtype)], 1)
        # Text-only: positions = running count of real tokens (left padding), meta continuing.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        positions = positions[None].expand(3, -1, -1)
        hidden = self.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions
        ).last_hidden_state[:, -count:]
        hidden = hidden[:, : self.r_q] if side == "query" else hidden[:, self.r_q :]
        return torch.nn.functional.normalize(hidden.float(), dim=-1)


SIZES = {
    "smoke": dict(hidden=32, layers=1, batch=2, length=8),
    "tiny": dict(hidden=128, layers=2, batch=16, length=64),
    "representative": dict(hidden=512, layers=4, batch=16, length=128),
    # As representative, with Qwen2.5-VL's proportions: head dim 128 (4 heads, 2 kv heads) and
    # an MLP 5.375x the width (3B: 2048 -> 11008), where `tiny_config` gives head dim 16 and 2x.
    "qwen_shaped": dict(
        hidden=512, layers=4, batch=16, length=128, head_dim=128, intermediate=2752
    ),
}


def apply_size(args, size: str) -> None:
    """Fill the model / batch fields of `args` that are missing or None from `SIZES[size]`."""
    for name in ("hidden", "layers", "batch", "length", "head_dim", "intermediate"):
        if getattr(args, name, None) is None:
            setattr(args, name, SIZES[size].get(name))


def build_models(args, lr: float = 1e-3):
    """(config, transformers model, our model) with the same random weights: the transformers
    model at `args`' size is saved and loaded by our loader. The config trains at constant `lr`
    (the torch peer's AdamW) with batch `args.batch`."""
    hf_dict = tiny_config(
        vocab_size=1024, hidden=args.hidden, layers=args.layers, head_dim=args.head_dim or 16
    )
    if args.intermediate:
        hf_dict["text_config"]["intermediate_size"] = args.intermediate
    config = base_config()
    config.model.hf_config = ConfigDict(hf_dict)
    config.optimizer.lr = lr
    config.train.batch_size = args.batch
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    torch.manual_seed(0)
    hf_model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_dict)).float()
    with tempfile.TemporaryDirectory() as checkpoint:
        hf_model.save_pretrained(checkpoint)
        config.init_from = checkpoint
        model = build_model(config)
    return config, hf_model, model


# Forward + MMR loss + backward of one batch: the gradients alone, without the optimizer.
gradients = jax.jit(
    lambda state, batch: _grads_one(
        state, state.params, state.other, batch, MMR_GROUPS, 0.03, None
    )[2]
)


def _best_of(fn, repeats: int) -> float:
    fn()  # compile / warm up
    return min(_timed(fn) for _ in range(repeats))


def profile_parts(state, jax_batch, torch_model, torch_batch, repeats: int) -> None:
    """Where a step's time goes: each part jitted (JAX) or run eagerly (torch) on its own, same
    model and batch; the differences between rows are the backward and the optimizer."""
    model = state.model()
    embed = jax.jit(lambda m, b: embed_batch(m, b))
    loss = jax.jit(lambda m, b: compute_loss(m, b, MMR_GROUPS, 0.03, None)[0])
    jax_parts = {
        "forward (3 sides)": lambda: jax.block_until_ready(embed(model, jax_batch)),
        "forward + MMR loss": lambda: jax.block_until_ready(loss(model, jax_batch)),
        "forward + loss + backward": lambda: jax.block_until_ready(gradients(state, jax_batch)),
    }

    def torch_forward():
        with torch.no_grad():
            torch_model.embed("query", **torch_batch["query"])
            torch_model.embed("candidate", **torch_batch["positive"])
            torch_model.embed("candidate", **torch_batch["negative"])

    def torch_loss(backward: bool):
        q = torch_model.embed("query", **torch_batch["query"])
        pos = torch_model.embed("candidate", **torch_batch["positive"])
        neg = torch_model.embed("candidate", **torch_batch["negative"])
        value = torch_mmr_loss(q, pos, neg, MMR_GROUPS, 0.03)
        if backward:
            torch_model.zero_grad()
            value.backward()

    torch_parts = {
        "forward (3 sides)": torch_forward,
        "forward + MMR loss": lambda: torch_loss(False),
        "forward + loss + backward": lambda: torch_loss(True),
    }
    print("\n| part | PyTorch (s) | JAX (s) | JAX speed-up |")
    print("|---|---|---|---|")
    for name in jax_parts:
        jax_s = _best_of(jax_parts[name], repeats)
        torch_s = _best_of(torch_parts[name], repeats)
        print(f"| {name} | {torch_s:.4f} | {jax_s:.4f} | {torch_s / jax_s:.2f}x |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--head_dim", type=int, default=None, help="default: tiny_config's 16")
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2 x hidden")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--profile", action="store_true", help="also time forward / loss / backward on their own"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="--size smoke, one timed step, --profile, tiny peak"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.profile = "smoke", 1, True
    apply_size(args, args.size)
    return args


def torch_trainer(torch_model: TorchMetaEmbed):
    """The PyTorch peer's train step (AdamW at the JAX step's lr 1e-3, gradient clipping 1):
    numpy batch -> loss."""
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, weight_decay=0.0)

    def torch_step(batch):
        tensors = {
            k: {n: torch.from_numpy(np.asarray(a)).long() for n, a in v.items()}
            for k, v in batch.items()
        }
        q = torch_model.embed("query", **tensors["query"])
        pos = torch_model.embed("candidate", **tensors["positive"])
        neg = torch_model.embed("candidate", **tensors["negative"])
        loss = torch_mmr_loss(q, pos, neg, MMR_GROUPS, 0.03)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return torch_step


def main(argv=None):
    args = parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")

    config, hf_model, model = build_models(args, lr=1e-3)  # torch_trainer's AdamW's
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    state = create_train_state(model, tx, lora=False)
    step = TrainStep(state, groups=MMR_GROUPS, temperature=0.03, schedule=schedule)
    batches = [
        text_batch(i, batch=args.batch, length=args.length, vocab=1024)
        for i in range(args.steps + 1)
    ]
    jax_batches = [jax.tree.map(jnp.asarray, b) for b in batches]

    torch_model = TorchMetaEmbed(hf_model, np.asarray(model.meta_tokens[...]), 16)
    torch_step = torch_trainer(torch_model)

    # First step: both from identical weights and batch -> the same loss (a parity check).
    state, metrics = step(state, jax_batches[0])
    jax_first, torch_first = float(metrics["loss"]), torch_step(batches[0])
    jax_times, torch_times = [], []
    for batch, jax_batch in zip(batches[1:], jax_batches[1:], strict=True):
        start = time.perf_counter()
        state, metrics = step(state, jax_batch)
        jax.block_until_ready(metrics["loss"])
        jax_times.append(time.perf_counter() - start)
        torch_times.append(_timed(lambda b=batch: torch_step(b)))
    compiled = step._jitted(state, jax_batches[0]).lower(state, jax_batches[0]).compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
    peak = matmul_peak(size=128, repeats=2) if args.smoke else matmul_peak()
    jax_s, torch_s = float(np.median(jax_times)), float(np.median(torch_times))
    print(
        f"config: hidden {args.hidden}, layers {args.layers}, batch {args.batch} x 3 sides, "
        f"length {args.length} + 80 meta tokens, CPU x{jax.device_count()}; "
        f"{machine_load.describe()}"
    )
    print(f"first-step loss: jax {jax_first:.6f}  torch {torch_first:.6f}")
    print(f"{'impl':<8}{'step (s)':>10}{'examples/s':>12}{'MFU':>8}")
    for name, seconds in (("jax", jax_s), ("torch", torch_s)):
        mfu = flops / seconds / peak if peak else float("nan")
        print(f"{name:<8}{seconds:>10.4f}{args.batch / seconds:>12.1f}{mfu:>8.1%}")
    print(
        f"speed-up jax / torch: {torch_s / jax_s:.2f}x   (step FLOPs {flops:.3g}, "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s)"
    )
    if args.profile:
        torch_batch = {
            k: {n: torch.from_numpy(np.asarray(a)).long() for n, a in v.items()}
            for k, v in batches[0].items()
        }
        profile_parts(state, jax_batches[0], torch_model, torch_batch, max(2, args.steps))
    print(f"at end: {machine_load.describe()}")


if __name__ == "__main__":
    main()
