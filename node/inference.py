"""What a node computes: observed-token log-probs and next-token distributions.

Blocking functions over a FractalMoE module, run by ``ServedModel.run`` (which holds the module's
lock and sets the node's expert mask). The rules are model's: windows (``model.evaluate``), top-k
(``model.mixtures``), sampling (``model.sampling``). A user's adapter is passed as ``adapter``
({norm name: tensor}) and substituted for one forward pass by ``torch.func.functional_call``; the
module's own (base) norms are never written. All log-probabilities are float64 log-softmaxes of
the logits.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call

from model.evaluate import window_logps
from model.fractal_moe import FractalMoE
from model.mixtures import topk_split

Adapter = dict[str, torch.Tensor] | None


def forward(module: FractalMoE, idx: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """Logits (B, T, V) of ``idx`` (B, T) with ``adapter``'s norms in place of the module's."""
    if adapter:
        return functional_call(module, adapter, (idx,), strict=False).logits
    return module(idx).logits


def score_tokens(module: FractalMoE, ids: torch.Tensor, adapter: Adapter, *,
                 batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_{i+1} | window prefix) for i < n-1, and the expert each block chose at every position.

    ``ids`` (n,) long, n >= 2. Longer than the context, the sequence is scored in windows by
    ``model.evaluate.window_logps``, the rule of ``model.evaluate.token_logps``.
    Returns logps (n-1,) float64 and routes (L, n) long.
    """
    routes = []

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        logits = forward(module, x, adapter)  # (b, T, V)
        routes.append(module.routes().reshape(module.cfg.n_layers, -1))  # (L, b*T)
        return logits

    logps = window_logps(logits_of, ids, module.cfg.context, batch=batch)  # (n-1,)
    return logps, torch.cat(routes, dim=1)[:, :ids.numel()]


def next_logprobs(module: FractalMoE, ids: torch.Tensor, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token log-probs (V,) float64 after ``ids`` (n,) (its last ``context`` tokens, as
    ``model.evaluate.sample`` does), and the route of the last position (L,) long."""
    ctx = ids[-module.cfg.context:][None]  # (1, T)
    logits = forward(module, ctx, adapter)[0, -1]  # (V,)
    return torch.log_softmax(logits.double(), dim=-1), module.routes()[:, 0, -1]


def top_k(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The k most likely ids (most likely first), their log-probs, and the log of the rest's mass.

    ``model.mixtures.topk_split``'s rule (the rest is 1 - the top k's mass); -inf when k covers the
    vocabulary.
    """
    ids, vals, rest = topk_split(logprobs, min(k, logprobs.numel()))  # (k,), (k,), ()
    return ids, vals, math.log(float(rest)) if float(rest) > 0 else -math.inf

