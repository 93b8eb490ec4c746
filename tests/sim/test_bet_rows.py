"""Bets 04 and 18's per-text rows from crafted (N, T) log-probabilities: tensors in, plain figures out."""

from __future__ import annotations

import pytest
import torch

from model import mixtures
from sim.bets.bet04_mixture_combiner import _text_row
from sim.bets.bet18_glass_box_attribution import _attribution_row


def _logps() -> torch.Tensor:
    """Two specialists' log-probabilities of 10 observed tokens: (2, 10) float64, specialist 0 better."""
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(2, 10, 5, generator=g, dtype=torch.float64), dim=-1)[..., 0]  # (2, 10)
    lp[0] = lp.max(dim=0).values
    return lp


def test_bet04_text_row_names_the_best_specialist_and_bounds_the_uniform_mixture():
    lp = _logps()
    row = _text_row(lp, mixtures.uniform_mixture(lp), mixtures.posterior_mixture(lp), ("a", "b"))
    assert row["best_specialist"] == "a" and row["best_ppl"] == row["specialist_ppl"]["a"]
    assert row["tokens"] == 10
    assert row["uniform_ppl"] <= 2 * row["best_ppl"]  # a uniform mixture of 2 loses at most log 2 per token


def test_bet18_attribution_row_shares_each_token_among_the_specialists():
    row = _attribution_row(_logps(), 0, 4)
    assert sum(row["mean_responsibility"]) == pytest.approx(1.0)
    assert row["sum_error"] < 1e-9 and row["tokens"] == 10
    assert row["documents"] == 3  # 10 positions in documents of 4: two full, one rest
    assert row["document_accuracy"] == 1.0 and row["token_accuracy"] >= 0.5
    assert row["own_mean_responsibility"] == row["mean_responsibility"][0]
