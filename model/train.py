"""Training loops: base pretraining, specialist fine-tunes and norm-only user adapters.

One loop serves all three; what differs is the data and which parameters train.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .fractal_moe import FractalMoE, Output, is_norm_param

Batch = tuple[torch.Tensor, torch.Tensor]


def cosine_lr(step: int, *, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of the peak ``lr`` at ``steps``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, tc: TrainConfig) -> float:
    """:func:`cosine_lr` with ``tc``'s steps, warm-up and peak learning rate."""
    return cosine_lr(step, steps=tc.steps, warmup=tc.warmup, lr=tc.lr)


def optimizer_step(opt: torch.optim.Optimizer, out: Output, *, aux_loss_coef: float,
                   params: Iterable[torch.Tensor], grad_clip: float) -> float:
    """One step on next-token cross-entropy plus ``aux_loss_coef`` x the load-balancing loss, the
    gradient norm of ``params`` clipped to ``grad_clip`` (0: not clipped); returns the
    cross-entropy (nats)."""
    loss = out.loss + aux_loss_coef * out.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return float(out.loss.detach())


def train(
    model: FractalMoE,
    sample_batch: Callable[[], Batch],
    tc: TrainConfig,
    *,
    params: Iterable[str] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place for ``tc.steps`` steps; returns the loss of each step.

    ``params`` names the parameters that train (all when None); the others are frozen.
    The objective is next-token cross-entropy plus the load-balancing loss.
    """
    names = set(params) if params is not None else None
    trainable = []
    for n, p in model.named_parameters():
        p.requires_grad_(names is None or n in names)
        if p.requires_grad:
            trainable.append(p)
    if not trainable:
        raise ValueError("no parameter to train")
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=(0.9, 0.95),
    )
    torch.manual_seed(tc.seed)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(tc.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        x, y = sample_batch()
        losses.append(optimizer_step(opt, model(x, y), aux_loss_coef=model.cfg.aux_loss_coef, params=trainable,
                                     grad_clip=tc.grad_clip))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


def adapter_param_names(model: FractalMoE) -> list[str]:
    """Names of the norm-only adapter's parameters (LayerNorm gains and biases)."""
    return [n for n, _ in model.named_parameters() if is_norm_param(n)]


def adapter_state(model: FractalMoE) -> dict[str, torch.Tensor]:
    """The norm-only adapter of ``model``: a copy of its LayerNorm gains and biases."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_norm_param(n)}


def apply_adapter(model: FractalMoE, adapter: dict[str, torch.Tensor]) -> FractalMoE:
    """Load a norm-only adapter into ``model`` in place (every other parameter untouched)."""
    bad = [k for k in adapter if not is_norm_param(k)]
    if bad:
        raise ValueError(f"not an adapter parameter: {bad[0]}")
    missing, unexpected = model.load_state_dict(adapter, strict=False)
    if unexpected:
        raise ValueError(f"adapter has unknown parameters: {unexpected[:3]}")
    return model
