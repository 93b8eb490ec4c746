"""What partial materialisation does to the model: routing traces, run-ahead, and substitution perplexity.

These run the FractalMoE through its MoE hooks (``FractalMoE.serving``: installed experts, input recording;
``routes()``), which leave the model as they found it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch

from model.evaluate import target_logps
from model.fractal_moe import FractalMoE


class QualityError(ValueError):
    """Tokens or a mask that do not fit the model."""


@contextmanager
def _serving(model: FractalMoE, mask: torch.Tensor | None, *, record_input: bool = False) -> Iterator[None]:
    """No grad, eval mode, the given installed mask and input recording; everything restored afterwards."""
    with torch.no_grad(), model.serving(available=mask, record_input=record_input):
        yield


@overload
def _mask_tensor(model: FractalMoE, mask: None) -> None: ...
@overload
def _mask_tensor(model: FractalMoE, mask: np.ndarray | torch.Tensor) -> torch.Tensor: ...
def _mask_tensor(model: FractalMoE, mask: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    t = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    shape = (model.cfg.n_layers, model.cfg.n_experts)
    if tuple(t.shape) != shape:
        raise QualityError(f"mask must be (L, E) = {shape}, got {tuple(t.shape)}")
    if not t.any(dim=1).all():
        raise QualityError(f"block {int((~t.any(dim=1)).nonzero()[0])} has no installed expert to substitute with")
    return t


@overload
def route_trace(model: FractalMoE, token_ids: np.ndarray | torch.Tensor, *, mask: np.ndarray | None = None,
                hidden: Literal[True]) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def route_trace(model: FractalMoE, token_ids: np.ndarray | torch.Tensor, *, mask: np.ndarray | None = None,
                hidden: Literal[False] = False) -> tuple[np.ndarray, None]: ...
@overload
def route_trace(model: FractalMoE, token_ids: np.ndarray | torch.Tensor, *, mask: np.ndarray | None = None,
                hidden: bool) -> tuple[np.ndarray, np.ndarray | None]: ...
def route_trace(model: FractalMoE, token_ids: np.ndarray | torch.Tensor, *, mask: np.ndarray | None = None,
                hidden: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Run one sequence and return its routes (L, T) and, if asked, each block's MoE input (L, T, C).

    With ``mask`` (L, E) the model serves with only those experts (substitution), as a node running the
    router ahead with what it has installed would; without, this is the full model's routing.
    """
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0:
        raise QualityError(f"token_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    with _serving(model, _mask_tensor(model, mask), record_input=hidden):
        model(ids[None])  # (1, T)
        routes = model.routes()[:, 0].numpy()  # (L, T)
        states = torch.stack([m.recorded_input()[0] for m in model.moes]).numpy() if hidden else None  # (L, T, C)
    return routes, states


def router_weights(model: FractalMoE) -> np.ndarray:
    """Every block's router weight matrix, stacked: (L, E, C) float32."""
    return torch.stack([m.router.weight.detach() for m in model.moes]).cpu().numpy()


@dataclass(frozen=True, kw_only=True)
class PplComparison:
    """Perplexity of the same tokens with all experts and with only the installed ones (substitution)."""

    nll_full: float  # summed next-token negative log-likelihood, nats
    nll_substituted: float
    tokens: int  # predicted tokens
    missing_share: float  # share of the full model's (block, token) expert uses that were not installed

    @property
    def ppl_full(self) -> float:
        """Perplexity of the fully materialised model."""
        return math.exp(self.nll_full / self.tokens)

    @property
    def ppl_substituted(self) -> float:
        """Perplexity with misses substituted by the best installed expert."""
        return math.exp(self.nll_substituted / self.tokens)

    @property
    def ppl_ratio(self) -> float:
        """ppl_substituted / ppl_full (1.0 when nothing was substituted)."""
        return math.exp((self.nll_substituted - self.nll_full) / self.tokens)


def _position_nll(model: FractalMoE, ids: torch.Tensor, upto: int) -> torch.Tensor:
    """NLL (B, upto) of tokens 1..upto, each predicted from the tokens before it."""
    return -target_logps(model(ids[:, :upto]).logits, ids[:, 1 : upto + 1])  # (B, upto)


def _as_tokens(tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] < 2:
        raise QualityError(f"tokens must be (B, T) with T >= 2, got shape {tuple(t.shape)}")
    return t


def substitution_ppl(model: FractalMoE, tokens: np.ndarray | torch.Tensor,
                     mask: np.ndarray | torch.Tensor) -> PplComparison:
    """Perplexity of ``tokens`` (B, T) with misses substituted (``model.serving(available=mask)``) vs the full model.

    Each row predicts its tokens 1..T-1 from the ones before. The model is left as it was found.
    """
    t = _as_tokens(tokens)
    return segmented_substitution_ppl(model, t, [(0, t.shape[1], np.asarray(mask))])


def coarsen_segments(segments: Sequence[tuple[int, int, np.ndarray]],
                     max_passes: int) -> list[tuple[int, int, np.ndarray]]:
    """At most ``max_passes`` runs of consecutive segments, each served by its first segment's mask.

    Installed sets only grow during a request, so this is pessimistic: an expert arriving inside a merged
    run counts as missing until the run ends.
    """
    if max_passes < 1:
        raise QualityError(f"max_passes must be >= 1, got {max_passes}")
    if len(segments) <= max_passes:
        return list(segments)
    groups = np.array_split(np.arange(len(segments)), max_passes)
    return [(segments[g[0]][0], segments[g[-1]][1], segments[g[0]][2]) for g in groups]


def segmented_substitution_ppl(model: FractalMoE, tokens: np.ndarray | torch.Tensor,
                               segments: Sequence[tuple[int, int, np.ndarray]], *,
                               max_passes: int | None = None) -> PplComparison:
    """Like ``substitution_ppl``, with the installed experts changing along the sequence as they arrive.

    ``segments`` (first, end, mask (L, E)) say which experts served positions first..end-1 (as
    ``policies.RequestOutcome.segments`` gives them). Each segment's positions are scored by a pass over
    the prefix with that segment's mask: earlier positions are recomputed with it too, as a node without a
    KV cache would, so a late expert helps the context of the tokens after it arrives. ``max_passes``
    bounds the forward passes (``coarsen_segments``: pessimistic) when experts arrive one by one.
    """
    if max_passes is not None:
        segments = coarsen_segments(segments, max_passes)
    t = _as_tokens(tokens)
    n = t.shape[1] - 1  # positions that predict a next token
    with _serving(model, None):
        full = _position_nll(model, t, n)  # (B, n)
        routes = model.routes()  # (L, B, n)
    sub = full.new_zeros(full.shape)  # (B, n)
    scored = torch.zeros(n, dtype=torch.bool)
    missing = 0
    for first, end, mask in segments:
        end = min(end, n)
        if first >= end:
            continue
        m = _mask_tensor(model, mask)
        with _serving(model, m):
            sub[:, first:end] = _position_nll(model, t, end)[:, first:end]
        scored[first:end] = True
        used = routes[:, :, first:end].reshape(routes.shape[0], -1)  # (L, B*(end-first))
        missing += int((~torch.gather(m, 1, used)).sum())
    if not scored.all():
        raise QualityError("segments must cover every position of the sequence")
    return PplComparison(nll_full=float(full.sum()), nll_substituted=float(sub.sum()), tokens=int(full.numel()),
                         missing_share=missing / routes.numel())
