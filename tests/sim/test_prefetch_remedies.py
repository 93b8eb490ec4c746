"""Per-user router priors (issue 16 item 5): the measurement's invariants at tiny, and its CLI's errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import get_preset
from model.fractal_moe import build_model
from model.staged import router_prior, staged_forward
from sim.prefetch_live import remedies


def test_a_router_bias_moves_routing_as_added_logits():
    cfg = get_preset("tiny").model
    model = build_model(cfg, 2).eval()
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    full = torch.ones(cfg.n_layers, cfg.n_experts, dtype=torch.bool)
    bias = torch.full((cfg.n_layers, cfg.n_experts), -1e4)
    bias[:, 3] = 0.0  # every other expert all but forbidden: every token goes to expert 3
    with torch.no_grad():
        gen = staged_forward(model, ids, full, router_bias=bias)
        with pytest.raises(StopIteration) as stop:
            next(gen)
    _, wanted, _ = stop.value.value
    assert bool((wanted == 3).all())


def test_router_prior_is_beta_times_log_of_the_normalised_usage_and_refuses_bad_input():
    usage = torch.tensor([[2.0, 6.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # (L, E) counts, rows normalised inside
    bias = router_prior(usage, 0.5)
    expected = 0.5 * np.log(np.array([[0.25, 0.75, 1e-6, 1e-6], [0.25] * 4]))
    assert np.allclose(bias.numpy(), expected, rtol=1e-6)
    assert bool((router_prior(usage, 0.0) == 0).all())
    for bad_usage, beta in ((torch.tensor([1.0, 2.0]), 1.0), (torch.tensor([[1.0, -1.0]]), 1.0),
                            (torch.tensor([[1.0, float("nan")]]), 1.0), (usage, -0.1), (usage, float("inf"))):
        with pytest.raises(ValueError):
            router_prior(bad_usage, beta)


@pytest.mark.slow
def test_priors_measure_against_the_unmodified_model(tiny_suite):
    res = remedies.measure(tiny_suite, budget=16, betas=[0.0, 1.0], requests=4, history=1)
    r0, r1 = res["rows"]
    assert r0["ppl_ratio_all_experts"] == 1.0  # beta 0 is the unmodified model
    assert r0["hit_rate"] == r1["hit_rate"] == 1.0  # a plan of all 16 experts covers every use
    for r in res["rows"]:  # ... so serving the plan only changes nothing
        assert np.isclose(r["ppl_ratio_plan_substitute"], r["ppl_ratio_all_experts"])
    assert r1["distinct_experts_per_block"] < r0["distinct_experts_per_block"]
    half = remedies.measure(tiny_suite, budget=8, betas=[0.0, 2.0], requests=4, history=1)["rows"]
    assert half[0]["hit_rate"] < half[1]["hit_rate"]  # the prior keeps a user's tokens on the user's experts
    assert "| 2 |" in remedies.markdown({**res, "rows": half})


@pytest.mark.parametrize("argv", [["--betas", "a,b"], ["--budget", "17"], ["--betas", "-1"], ["--preset", "huge"]])
def test_bad_arguments_get_one_line_and_exit_2(argv, capsys):
    assert remedies.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_reliance_under_the_prior_concentrates_routing(tiny_suite):
    rows = remedies.reliance(tiny_suite, betas=[0.0, 1.0], tokens=64, history=1)
    r0, r1 = rows
    assert r0["beta"] == 0.0 and r0["users"] == len(tiny_suite.known_users) and r0["tokens"] == 64
    assert r1["routing_entropy_bits"] < r0["routing_entropy_bits"] <= 4.0  # fewer experts per user
    assert all(r["zeroed_ratio"] > 1 and r["drop_one_max"] >= r["drop_one_median"] > 0 for r in rows)
