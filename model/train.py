"""Training loops: base pretraining, specialist fine-tunes and norm-only user adapters.

One loop serves all three; what differs is the data and which parameters train. A run can keep a
checkpoint (weights, optimizer moments, the sampler's and torch's random state, the losses so far)
every ``checkpoint_every`` steps; a run started again with the same checkpoint path resumes from it
and ends with the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
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
    if out.loss is None:
        raise ValueError("optimizer_step needs the loss of a forward pass given targets")
    loss = out.loss + aux_loss_coef * out.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return float(out.loss.detach())


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``; ValueError otherwise or
    when CUDA is asked for and absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use auto or cpu)")
    return torch.device(device)


def save_checkpoint(path: Path, model: FractalMoE, opt: torch.optim.Optimizer, sampler: object,
                    step: int, losses: list[float]) -> None:
    """Everything a resumed run needs after ``step`` steps, as one safetensors file (no pickle), atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = opt.state_dict()
    for i, st in state["state"].items():
        for name, v in st.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    gen = getattr(sampler, "gen", None)
    if isinstance(gen, torch.Generator):
        tensors["rng.sampler"] = gen.get_state()
    meta = {"step": step, "losses": losses, "groups": [{k: v for k, v in g.items() if k != "params"}
                                                        for g in state["param_groups"]]}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: FractalMoE, opt: torch.optim.Optimizer, sampler: object) -> tuple[int, list]:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``opt`` and ``sampler``; returns
    (steps done, losses so far)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    tensors = load_file(str(path))
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = opt.state_dict()
    moments: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            moments.setdefault(int(i), {})[name] = v if name == "step" else v.to(device)
    state["state"] = moments
    for g, saved in zip(state["param_groups"], meta["groups"]):
        g.update(saved)
    opt.load_state_dict(state)
    torch.set_rng_state(tensors["rng.torch"])
    gen = getattr(sampler, "gen", None)
    if isinstance(gen, torch.Generator) and "rng.sampler" in tensors:
        gen.set_state(tensors["rng.sampler"])
    return int(meta["step"]), list(meta["losses"])


def train(
    model: FractalMoE,
    sample_batch: Callable[[], Batch],
    tc: TrainConfig,
    *,
    params: Iterable[str] | None = None,
    desc: str = "train",
    progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 100,
    stop_after: int | None = None,
) -> list[float]:
    """Train ``model`` in place for ``tc.steps`` steps; returns the loss of each step.

    ``params`` names the parameters that train (all when None); the others are frozen.
    The objective is next-token cross-entropy plus the load-balancing loss. Batches move to the
    model's device. With ``checkpoint``, the state is saved there every ``checkpoint_every`` steps
    and a run finding the file resumes from it (the caller deletes it once the result is kept);
    ``stop_after`` ends the run after that many steps in total (an interruption, for tests).
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
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        start, losses = load_checkpoint(Path(checkpoint), model, opt, sample_batch)
    device = next(model.parameters()).device
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = tqdm(range(start, end), desc=desc, disable=not progress, leave=False, dynamic_ncols=True,
               initial=start, total=tc.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        x, y = sample_batch()
        losses.append(optimizer_step(opt, model(x.to(device), y.to(device)), aux_loss_coef=model.cfg.aux_loss_coef,
                                     params=trainable, grad_clip=tc.grad_clip))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if checkpoint is not None and done < tc.steps and (done % checkpoint_every == 0 or done == end):
            save_checkpoint(Path(checkpoint), model, opt, sample_batch, done, losses)
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
