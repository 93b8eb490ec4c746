"""What a node computes: observed-token log-probs, next-token distributions, sampling.

Blocking functions over a FractalMoE module, run by ``ServedModel.run`` (which holds the module's
lock and sets the node's expert mask). A user's adapter is passed as ``adapter`` ({norm name:
tensor}) and substituted for one forward pass by ``torch.func.functional_call``; the module's own
(base) norms are never written. All log-probabilities are float64 log-softmaxes of the logits.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call

from model.fractal_moe import FractalMoE

Adapter = dict[str, torch.Tensor] | None


def forward(module: FractalMoE, idx: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """Logits (B, T, V) of ``idx`` (B, T) with ``adapter``'s norms in place of the module's."""
    if adapter:
        return functional_call(module, adapter, (idx,), strict=False).logits
    return module(idx).logits


def score_tokens(module: FractalMoE, ids: torch.Tensor, adapter: Adapter, *,
                 batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_{i+1} | window prefix) for i < n-1, and the expert each block chose at every position.

    ``ids`` (n,) long, n >= 2. Longer than the context, the sequence is cut into non-overlapping
    windows of the context, as ``model.evaluate.token_logps`` does, so both give the same numbers.
    Returns logps (n-1,) float64 and routes (L, n) long.
    """
    n = ids.numel()
    ctx = module.cfg.context
    w = -(-n // ctx)
    x = torch.zeros(w * ctx, dtype=torch.long)
    x[:n] = ids
    y = torch.full((w * ctx,), -100, dtype=torch.long)
    y[:n - 1] = ids[1:]
    x, y = x.view(w, ctx), y.view(w, ctx)  # (W, T), (W, T)
    logps, routes = [], []
    for i in range(0, w, batch):
        logits = forward(module, x[i:i + batch], adapter)  # (b, T, V)
        lp = torch.log_softmax(logits.double(), dim=-1)  # (b, T, V)
        tgt = y[i:i + batch]
        keep = tgt != -100
        logps.append(lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0][keep])
        routes.append(module.routes().reshape(module.cfg.n_layers, -1))  # (L, b*T)
    return torch.cat(logps), torch.cat(routes, dim=1)[:, :n]


def next_logprobs(module: FractalMoE, ids: torch.Tensor, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token log-probs (V,) float64 after ``ids`` (n,) (its last ``context`` tokens, as
    ``model.evaluate.sample`` does), and the route of the last position (L,) long."""
    ctx = ids[-module.cfg.context:][None]  # (1, T)
    logits = forward(module, ctx, adapter)[0, -1]  # (V,)
    return torch.log_softmax(logits.double(), dim=-1), module.routes()[:, 0, -1]


def top_k(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The k most likely ids (most likely first), their log-probs, and the log of the rest's mass.

    The rest is a logsumexp over the other tokens (not log(1 - sum p), which cancels badly when
    the top k hold almost everything); -inf when k covers the vocabulary.
    """
    k = min(k, logprobs.numel())
    vals, ids = torch.topk(logprobs, k)  # (k,), (k,)
    if k == logprobs.numel():
        return ids, vals, -math.inf
    rest = torch.ones_like(logprobs, dtype=torch.bool)
    rest[ids] = False
    return ids, vals, float(torch.logsumexp(logprobs[rest], dim=0))


def choose(logprobs: torch.Tensor, *, temperature: float, k: int, gen: torch.Generator) -> int:
    """Pick the next token: greedy when ``temperature`` is 0, else a sample at that temperature
    among the ``k`` most likely tokens (all when 0), drawn from ``gen``."""
    if temperature == 0:
        return int(logprobs.argmax())
    scaled = logprobs / temperature  # (V,)
    if 0 < k < scaled.numel():
        kth = torch.topk(scaled, k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
