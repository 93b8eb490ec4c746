"""Expert reliance: how much of what a trained FractalMoE knows lives in its experts.

The federation's premise (every expert is load-bearing) is a property of a trained model, so every
trained model reports it. For each held-out text:

* ``zeroed_ratio``: perplexity with every expert of every block set to zero, over the model's own;
* ``averaged_ratio``: perplexity with each block's 16 experts replaced by their average (Bet 38);
* ``drop_one``: the perplexity ratio of removing one expert at a time (its tokens fall to the router's
  next choice, exactly as a node missing that expert would serve them), summarised as a distribution;
* ``routing_entropy_bits``: per block, the entropy of the text's expert usage (4 bits = uniform over 16).

Across texts, ``usage_divergence`` gives how different the texts' expert usage is: per block the
generalised Jensen-Shannon divergence of the texts' usage distributions (bits; 0 = identical usage).

This module imports nothing else of ours outside ``model``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch

from .evaluate import perplexity, routing_counts, token_logps
from .fractal_moe import FractalMoE, expert_of
from .merges import average_experts

DROP_ONE_TOKENS = 2048  # tokens per text scored for each of the L x E single-expert removals


def zeroed_experts(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``sd`` with every expert weight set to zero (router, attention and embeddings kept)."""
    return {k: (torch.zeros_like(v) if expert_of(k) else v.clone()) for k, v in sd.items()}


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits along the last axis of distributions ``p`` (..., E)."""
    p = p.double()
    return -(p * torch.log2(p.clamp(min=1e-300))).where(p > 0, torch.zeros_like(p)).sum(dim=-1)


def usage_shares(model: FractalMoE, ids: torch.Tensor) -> torch.Tensor:
    """Each block's expert usage over ``ids`` as shares: (L, E) float64, rows sum to 1."""
    counts = routing_counts(model, ids).double()  # (L, E)
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def jensen_shannon_bits(dists: torch.Tensor) -> float:
    """Generalised Jensen-Shannon divergence (bits) of ``dists`` (K, E), equal weights:
    H(mean) - mean(H). 0 when all K distributions are equal; at most log2(K)."""
    return float(_entropy_bits(dists.double().mean(dim=0)) - _entropy_bits(dists.double()).mean())


@torch.no_grad()
def _ppl_with_unavailable(model: FractalMoE, ids: torch.Tensor, block: int, expert: int) -> float:
    mask = torch.ones(model.cfg.n_layers, model.cfg.n_experts, dtype=torch.bool)  # (L, E)
    mask[block, expert] = False
    with model.serving(available=mask):
        return perplexity(token_logps(model, ids))


def text_reliance(model: FractalMoE, zeroed: FractalMoE, averaged: FractalMoE, ids: torch.Tensor,
                  shares: torch.Tensor, *, drop_one_tokens: int = DROP_ONE_TOKENS) -> dict:
    """Reliance figures of ``model`` on one held-out text ``ids`` ((N,) long).

    ``zeroed`` and ``averaged`` are the same model with its experts zeroed / averaged per block, and
    ``shares`` ((L, E)) the text's expert usage (:func:`usage_shares`), all computed once by
    :func:`expert_reliance`, which also needs the usage for the divergence across texts.
    """
    ppl = perplexity(token_logps(model, ids))
    zeroed_ppl = perplexity(token_logps(zeroed, ids))
    averaged_ppl = perplexity(token_logps(averaged, ids))
    head = ids[: drop_one_tokens + 1]
    head_ppl = perplexity(token_logps(model, head))
    ratios = [_ppl_with_unavailable(model, head, b, e) / head_ppl
              for b in range(model.cfg.n_layers) for e in range(model.cfg.n_experts)]
    entropy = _entropy_bits(shares)  # (L,)
    return {
        "ppl": round(ppl, 4),
        "zeroed_ppl": round(zeroed_ppl, 4),
        "zeroed_ratio": round(zeroed_ppl / ppl, 4),
        "averaged_ppl": round(averaged_ppl, 4),
        "averaged_ratio": round(averaged_ppl / ppl, 4),
        "drop_one": {"median_ratio": round(statistics.median(ratios), 4), "max_ratio": round(max(ratios), 4),
                     "min_ratio": round(min(ratios), 4), "tokens": int(head.numel() - 1)},
        "routing_entropy_bits": [round(float(h), 4) for h in entropy],
    }


def expert_reliance(model: FractalMoE, texts: Mapping[str, torch.Tensor], *,
                    drop_one_tokens: int = DROP_ONE_TOKENS) -> dict:
    """Reliance of ``model`` on every held-out text of ``texts`` (name -> (N,) token ids).

    Returns ``{"texts": {name: text_reliance(...)}, "usage_divergence": {...}}``; the divergence is
    the per-block Jensen-Shannon divergence of the texts' expert usage, and the mean over blocks.
    """
    sd = model.state_dict()
    zeroed = type(model)(model.cfg)
    zeroed.load_state_dict(zeroed_experts(sd))
    zeroed.eval()
    averaged = type(model)(model.cfg)
    averaged.load_state_dict(average_experts(sd))
    averaged.eval()
    usage = {name: usage_shares(model, ids) for name, ids in texts.items()}  # name -> (L, E)
    out = {name: text_reliance(model, zeroed, averaged, ids, usage[name], drop_one_tokens=drop_one_tokens)
           for name, ids in texts.items()}
    shares = torch.stack(list(usage.values()))  # (K, L, E)
    per_block = [jensen_shannon_bits(shares[:, b]) for b in range(model.cfg.n_layers)] if len(texts) > 1 else []
    return {"texts": out, "usage_divergence": {
        "jsd_bits": [round(v, 4) for v in per_block],
        "mean_jsd_bits": round(sum(per_block) / len(per_block), 4) if per_block else None,
        "max_possible_bits": round(math.log2(len(texts)), 4) if texts else None,
        "texts": list(texts)}}


def reliance_rows(reliance: dict) -> list[dict]:
    """One flat row per text (name, ppl, zeroed and averaged ratios, drop-one median/max): for tables."""
    return [{"text": name, "ppl": r["ppl"], "zeroed_ratio": r["zeroed_ratio"], "averaged_ratio": r["averaged_ratio"],
             "drop_one_median": r["drop_one"]["median_ratio"], "drop_one_max": r["drop_one"]["max_ratio"],
             "entropy_bits": r["routing_entropy_bits"]}
            for name, r in reliance["texts"].items()]
