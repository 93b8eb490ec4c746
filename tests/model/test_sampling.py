"""model.sampling: the one rule every generator (model.evaluate, nodes, the coordinator) draws tokens by."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.sampling import sample_token, sampling_probs

LOGP = torch.log_softmax(torch.tensor([0.5, 2.0, -1.0, 2.0, 0.0, 1.0], dtype=torch.float64), dim=0)  # (V,)


def test_temperature_zero_is_the_first_argmax_for_both_kinds_of_generator():
    assert sample_token(LOGP, temperature=0.0, top_k=3, rng=torch.Generator()) == 1
    assert sample_token(LOGP.numpy(), temperature=0.0, top_k=0, rng=np.random.default_rng(0)) == 1


def test_probs_are_the_tempered_softmax_over_the_top_k_ties_kept():
    p = sampling_probs(LOGP, temperature=0.5, top_k=2)
    expected = torch.zeros(6, dtype=torch.float64)
    expected[[1, 3]] = 0.5  # the two tied best
    torch.testing.assert_close(p, expected)
    p3 = sampling_probs(LOGP, temperature=2.0, top_k=3)  # 1 and 3 tie above 5: three kept
    z = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64) / 2.0
    torch.testing.assert_close(p3[[1, 3, 5]], torch.softmax(z, 0))
    assert float(p3[[0, 2, 4]].sum()) == 0.0
    torch.testing.assert_close(sampling_probs(LOGP, temperature=1.0), torch.exp(LOGP))  # top_k 0: all
    with pytest.raises(ValueError, match="temperature"):
        sampling_probs(LOGP, temperature=0.0)


@pytest.mark.parametrize("rng_of", [lambda s: torch.Generator().manual_seed(s), np.random.default_rng])
def test_draws_follow_the_probs_and_repeat_with_the_seed(rng_of):
    scores = LOGP.numpy() if not isinstance(rng_of(0), torch.Generator) else LOGP
    draws = [sample_token(scores, temperature=1.0, top_k=4, rng=rng_of(s)) for s in range(600)]
    assert draws == [sample_token(scores, temperature=1.0, top_k=4, rng=rng_of(s)) for s in range(600)]
    assert set(draws) <= {0, 1, 3, 5}
    share = draws.count(1) / len(draws)
    expected = float(sampling_probs(LOGP, temperature=1.0, top_k=4)[1])
    assert math.isclose(share, expected, abs_tol=0.06)
