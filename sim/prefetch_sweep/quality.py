"""Substitution perplexity of the sweep's requests, batched over requests, arrival segments and masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from coordinator.prefetch import Request, coarsen_segments
from model.evaluate import target_logps
from model.fractal_moe import FractalMoE

from .inputs import SweepError

TOKENS_PER_PASS = 1 << 22  # logits cells (rows * T * V) per batched forward pass: bounds its memory


def masked_nll(model: FractalMoE, tokens: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Next-token NLL (B, T-1) of ``tokens`` (B, T), row i served with only the experts ``masks[i]`` (L, E)
    installed (a missed expert is substituted by the installed one the router scores highest).

    One forward pass serves many masks at once: the installed experts are given per token (``model.serving``),
    which the router's masked argmax broadcasts over; this is what lets the sweep score every request and
    arrival segment of a row in a few passes rather than one pass per segment. The model is restored after.
    """
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)  # (B, T)
    m = torch.as_tensor(np.asarray(masks), dtype=torch.bool)  # (B, L, E)
    B, T = t.shape
    if m.shape != (B, model.cfg.n_layers, model.cfg.n_experts) or not m.any(dim=2).all():
        raise SweepError(f"masks must be (B={B}, L, E) with an installed expert in every block, got {tuple(m.shape)}")
    out = torch.empty(B, T - 1, dtype=torch.float64)  # (B, T-1)
    step = max(1, TOKENS_PER_PASS // (T * model.cfg.vocab_size))
    with torch.no_grad():
        for lo in range(0, B, step):
            chunk = t[lo:lo + step]  # (b, T)
            per_token = m[lo:lo + step].repeat_interleave(T - 1, dim=0).transpose(0, 1)  # (L, b*(T-1), E)
            with model.serving(available=per_token):
                out[lo:lo + step] = -target_logps(model(chunk[:, :-1]).logits, chunk[:, 1:])  # (b, T-1)
    return out.numpy()


def covers(mask: np.ndarray, routes: np.ndarray) -> bool:
    """Whether ``mask`` (L, E) holds every expert ``routes`` (L, t) use: then, over those positions, the model
    served with ``mask`` computes exactly what the full model does (each block sees the same input, so its
    router picks the same, installed, expert), and no forward pass is needed."""
    return bool(np.take_along_axis(np.asarray(mask, dtype=bool), np.asarray(routes), axis=1).all())


class QualityMeter:
    """Substitution perplexity of the sweep's requests, batched across requests and arrival segments.

    The full model's NLL of each request is computed once for the whole sweep. A segment (positions
    first..end-1 served with one installed set; at most ``max_passes`` per request, merged pessimistically
    as ``coordinator.prefetch.coarsen_segments`` does) is scored by a pass over the whole request with its
    mask (causal: later positions do not change earlier ones), skipped when the mask covers the full
    model's routes up to ``end``. Same figures as ``coordinator.prefetch.segmented_substitution_ppl``.
    """

    def __init__(self, model: FractalMoE, requests: Sequence[Request], *, max_passes: int) -> None:
        self.model = model
        self.requests = list(requests)
        self.max_passes = max_passes
        L, E = model.cfg.n_layers, model.cfg.n_experts
        tokens = np.stack([np.asarray(r.token_ids) for r in self.requests])  # (R, T)
        self.full = masked_nll(model, tokens, np.ones((len(self.requests), L, E), dtype=bool))  # (R, T-1)

    def nll(self, segments: dict[int, Sequence[tuple[int, int, np.ndarray]]]) -> tuple[float, float, int]:
        """(full NLL, substituted NLL, predicted tokens) summed over requests {index: outcome segments}."""
        jobs: list[tuple[int, int, int, np.ndarray]] = []  # (request, first, end, mask) needing a pass
        sub = {i: self.full[i].copy() for i in segments}
        for i, segs in segments.items():
            routes = np.asarray(self.requests[i].routes)
            n = self.full.shape[1]
            for first, end, mask in coarsen_segments(segs, self.max_passes):
                end = min(end, n)
                if first < end and not covers(mask, routes[:, :end]):
                    jobs.append((i, first, end, mask))
        if jobs:
            tokens = np.stack([np.asarray(self.requests[i].token_ids) for i, *_ in jobs])
            nll = masked_nll(self.model, tokens, np.stack([m for *_, m in jobs]))  # (J, T-1)
            for (i, first, end, _), row in zip(jobs, nll):
                sub[i][first:end] = row[first:end]
        full = float(sum(self.full[i].sum() for i in segments))
        return full, float(sum(v.sum() for v in sub.values())), int(sum(v.size for v in sub.values()))
