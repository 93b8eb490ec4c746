"""A FractalMoE forward pass that stops at every block whose tokens route to an expert it lacks.

A partial node (``node.partial``) holds only some experts. Its miss policies need the forward pass to
pause where a block's router picks a missing expert: ``wait`` fetches the expert and runs it, ``remote``
sends those tokens' hidden states to a node that holds it, ``substitute`` lets the router choose among the
installed experts. :func:`staged_forward` is that pass as a generator: it yields a :class:`Miss` (the
block, the experts missing, the full router's choice and the MoE input) and is sent back a
:class:`Answer` (outputs of the missing experts for their tokens, or the experts to choose among
instead). With every expert available it never pauses and computes exactly what ``FractalMoE.forward``
does (the same operations in the same order), so a fully materialised node and a partial one that
waited for every expert give the same log-probabilities.

A user's norm-only adapter is given as ``norms`` ({parameter name: tensor}); the module's own norms are
used where it has none.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .fractal_moe import Block, FractalMoE


@dataclass(frozen=True)
class Miss:
    """Block ``block``'s router chose experts that are not installed."""

    block: int
    missing: tuple[int, ...]  # experts chosen by some token and not installed, ascending
    route: torch.Tensor  # (N,) long: the full router's choice for every token
    inputs: torch.Tensor  # (N, C): the MoE's input (ln2 of the residual stream)

    def rows(self, expert: int) -> torch.Tensor:
        """Indices (n,) of the tokens routed to ``expert``."""
        return (self.route == expert).nonzero(as_tuple=True)[0]


@dataclass(frozen=True)
class Answer:
    """How the caller resolved a :class:`Miss`: the outputs (n_e, C) of missing experts for their tokens
    (before the gate), and/or ``available`` (E,) bool: choose again among these for the tokens whose
    expert has no output (substitution)."""

    outputs: Mapping[int, torch.Tensor] = field(default_factory=dict)
    available: torch.Tensor | None = None


def _norm(x: torch.Tensor, ln: torch.nn.LayerNorm, name: str, norms: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    w = norms.get(f"{name}.weight", ln.weight) if norms else ln.weight
    b = norms.get(f"{name}.bias", ln.bias) if norms else ln.bias
    return F.layer_norm(x, ln.normalized_shape, w, b, ln.eps)


StagedPass = Generator[Miss, Answer, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def staged_forward(model: FractalMoE, idx: torch.Tensor, available: torch.Tensor,
                   norms: Mapping[str, torch.Tensor] | None = None,
                   router_bias: torch.Tensor | None = None) -> StagedPass:
    """Logits (T, V) of ``idx`` (T,) long, pausing at each block whose tokens need a missing expert.

    ``available`` (L, E) bool: the installed experts. ``router_bias`` (L, E), if given, is added to every
    token's router logits of its block (choice and gate alike). Returns (logits (T, V), wanted (L, T): the full
    router's choice, served (L, T): the expert whose weights computed each token's output, or -1 for a
    token whose output came from the caller).
    """
    T = idx.numel()
    if model.cfg.context < T:
        raise ValueError(f"sequence of {T} tokens exceeds the context of {model.cfg.context}")
    pos = torch.arange(T)
    x = (model.tok_emb(idx[None]) + model.pos_emb(pos))  # (1, T, C)
    wanted, served = [], []
    for b, blk in enumerate(model.blocks):
        assert isinstance(blk, Block)
        x = x + blk.attn(_norm(x, blk.ln1, f"blocks.{b}.ln1", norms))  # (1, T, C)
        flat = _norm(x, blk.ln2, f"blocks.{b}.ln2", norms).reshape(T, -1)  # (T, C)
        moe = blk.moe
        logits = moe.router(flat)  # (T, E)
        if router_bias is not None:  # a prior over experts (L, E), e.g. log of a user's usage: routing made predictable
            logits = logits + router_bias[b]
        probs = logits.softmax(dim=-1)  # (T, E)
        route = logits.argmax(dim=-1)  # (T,)
        use = route.clone()  # (T,) the expert whose weights run each token; -1: output given
        outputs: Mapping[int, torch.Tensor] = {}
        missing = tuple(int(e) for e in torch.unique(route) if not bool(available[b, e]))
        if missing:
            answer = yield Miss(block=b, missing=missing, route=route, inputs=flat)
            outputs = answer.outputs
            given = torch.zeros_like(route, dtype=torch.bool)
            for e in outputs:
                given |= route == e
            use[given] = -1
            left = ~given & ~available[b][route]  # (T,) still without an expert
            if bool(left.any()):
                if answer.available is None or not bool(answer.available.any()):
                    raise ValueError(f"block {b}: experts {missing} got neither outputs nor a substitute")
                choice = logits.masked_fill(~answer.available, float("-inf")).argmax(dim=-1)  # (T,)
                use[left] = choice[left]
        gate = moe.gate(probs, torch.where(use >= 0, use, route))  # (T, 1)
        out = torch.zeros_like(flat)  # (T, C)
        for e in torch.unique(use).tolist():
            if e < 0:
                continue
            rows = (use == e).nonzero(as_tuple=True)[0]
            out.index_add_(0, rows, moe.experts[e](flat[rows]) * gate[rows])
        for e, y in outputs.items():
            rows = (route == e).nonzero(as_tuple=True)[0]
            out.index_add_(0, rows, y * gate[rows])
        x = x + out.view(1, T, -1)
        wanted.append(route)
        served.append(use)
    logits_out = model.lm_head(_norm(x, model.ln_f, "ln_f", norms))[0]  # (T, V)
    return logits_out, torch.stack(wanted), torch.stack(served)


def run_expert(model: FractalMoE, block: int, expert: int, inputs: torch.Tensor) -> torch.Tensor:
    """Expert ``expert`` of block ``block`` on ``inputs`` (n, C): its output (n, C), before the gate."""
    return model.blocks[block].moe.experts[expert](inputs)  # type: ignore[union-attr, index, operator]


def expert_from_weights(tensors: Mapping[str, torch.Tensor], block: int, expert: int,
                        inputs: torch.Tensor) -> torch.Tensor:
    """Expert ``expert`` of block ``block`` on ``inputs`` (n, C), from its two matrices by parameter name
    (``tensors`` holds at least ``blocks.{b}.moe.experts.{e}.fc1.weight`` (F, C) and ``.fc2.weight`` (C, F)):
    what ``Expert.forward`` computes, without a module. Output (n, C), before the gate."""
    prefix = f"blocks.{block}.moe.experts.{expert}."
    with torch.no_grad():
        return F.linear(F.gelu(F.linear(inputs, tensors[prefix + "fc1.weight"])), tensors[prefix + "fc2.weight"])


PRIOR_FLOOR = 1e-6  # the smallest usage a prior counts with: log(0) would forbid an expert outright


def router_prior(usage: torch.Tensor, beta: float) -> torch.Tensor:
    """A router bias (L, E) from an expert-usage distribution ``usage`` (L, E), each row normalised here:
    ``beta * log(max(usage, PRIOR_FLOOR))``, what :func:`staged_forward`'s ``router_bias`` takes. beta = 0
    leaves routing unchanged; larger beta keeps tokens to the experts the usage favours."""
    if usage.dim() != 2 or not bool(torch.isfinite(usage).all()) or bool((usage < 0).any()):
        raise ValueError("usage must be a finite, non-negative (L, E) tensor")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    rows = usage.sum(dim=1, keepdim=True).clamp_min(PRIOR_FLOOR)  # (L, 1)
    return beta * torch.log((usage / rows).clamp_min(PRIOR_FLOOR)).to(torch.float32)  # (L, E)
