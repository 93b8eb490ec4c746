"""Choosing the next token from a next-token distribution: greedy, or sampled at a temperature among the top k.

One rule for every generator of the federation: ``model.evaluate.sample`` (in-process), a node's
``Generate`` and the coordinator's mixture generation. The probabilities are softmax(scores / T) over
the k highest scores (every token whose score ties the k-th is kept; all tokens when k is 0); T = 0
is greedy (the first highest score). ``scores`` may be logits or log-probabilities: the rule is
invariant to a constant shift. This module imports nothing of ours.
"""

from __future__ import annotations

import math

import numpy as np
import torch

Rng = torch.Generator | np.random.Generator


def sampling_probs(scores: torch.Tensor, *, temperature: float, top_k: int = 0) -> torch.Tensor:
    """The distribution a token is drawn from: softmax(scores / temperature) over the top ``top_k``, (V,).

    Computed in ``scores``' own dtype. ``temperature`` must be > 0 (0 is greedy: see :func:`sample_token`).
    """
    if not temperature > 0:
        raise ValueError(f"sampling needs a temperature > 0, got {temperature}")
    scaled = scores / temperature  # (V,)
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    return torch.softmax(scaled, dim=-1)


def sample_token(scores: torch.Tensor | np.ndarray, *, temperature: float, top_k: int = 0, rng: Rng) -> int:
    """The next token from ``scores`` (V,): argmax at temperature 0, else a draw from :func:`sampling_probs`.

    ``rng`` is a torch Generator (drawn with ``torch.multinomial``) or a numpy Generator (drawn with
    ``Generator.choice``): each caller keeps its own seeded stream, so a seed gives the same tokens as
    before. A numpy ``scores`` is taken as float64.
    """
    s = torch.from_numpy(np.asarray(scores, dtype=np.float64)) if isinstance(scores, np.ndarray) else scores
    if temperature == 0:
        return int(s.argmax())
    probs = sampling_probs(s, temperature=temperature, top_k=top_k)  # (V,)
    if isinstance(rng, np.random.Generator):
        p = probs.to(torch.float64).numpy()
        return int(rng.choice(p.size, p=p / p.sum()))
    return int(torch.multinomial(probs, 1, generator=rng))
