"""Quantisation-aware fine-tuning of the experts, so that a ternary (or pruned) model stays usable.

Post-training ternarisation of a small model usually wrecks it. Here the forward pass sees the
expert matrices exactly as their codec will decode them (model.codecs.fake_quantise, the same
rule the encoder applies), and a straight-through estimator passes the gradient to the latent
float weights: w_used = w + (Q(w) - w).detach(). After the fine-tune the model holds the latent
weights; encoding them with the codec yields precisely the weights the fine-tune trained with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from tqdm import tqdm

from .codecs import CODECS, LOSSLESS_CODECS, CodecError, fake_quantise
from .fractal_moe import expert_of
from .train import cosine_lr, optimizer_step


class StraightThroughQuantiser(nn.Module):
    """Parametrisation: the forward uses the codec's reconstruction, the backward is the identity."""

    def __init__(self, codec: str) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (fake_quantise(w, self.codec) - w).detach()


def expert_linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers whose weights are expert matrices (blocks.B.moe.experts.E.fc1/fc2)."""
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and expert_of(f"{name}.weight") is not None]


def ternary_qat(model: nn.Module, sample_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], *,
                steps: int, lr: float, seed: int, progress: bool = True, codec: str = "ternary",
                train_all: bool = False) -> nn.Module:
    """Fine-tune ``model`` in place so that its experts work when encoded with ``codec``; returns it.

    ``sample_batch()`` gives (x, y) LongTensors (B, T); the loss is model(x, y).loss plus
    cfg.aux_loss_coef times the load-balancing loss. Only the expert matrices train unless
    ``train_all`` (the shared weights then move too, which breaks adapters trained on the base).
    AdamW without weight decay (decay would shrink the absmean scale), gradient clipping at 1.
    """
    if codec not in CODECS or codec in LOSSLESS_CODECS:
        raise CodecError(f"QAT needs a lossy codec; got {codec!r} (choose from {', '.join(CODECS[1:])})")
    if steps < 0:
        raise CodecError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise CodecError(f"lr must be > 0, got {lr}")
    linears = expert_linears(model)
    if not linears:
        raise CodecError("the model has no expert matrices to fine-tune")
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    aux_coef = float(getattr(getattr(model, "cfg", None), "aux_loss_coef", 0.0))
    for lin in linears:
        parametrize.register_parametrization(lin, "weight", StraightThroughQuantiser(codec))
    try:
        latent = [lin.get_parameter("parametrizations.weight.original") for lin in linears]
        trainable = list(model.parameters()) if train_all else latent
        ids = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        model.train()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            bar = tqdm(range(steps), desc=f"QAT {codec}", disable=not progress, leave=False)
            # a short warm-up (a fine-tune, not a fresh run), then the same cosine decay as training
            warmup = max(1, min(20, steps // 10))
            for step in bar:
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(step, steps=steps, warmup=warmup, lr=lr)
                x, y = sample_batch()
                loss = optimizer_step(opt, model(x, y), aux_loss_coef=aux_coef, params=trainable, grad_clip=1.0)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    finally:
        for lin in linears:
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return model
