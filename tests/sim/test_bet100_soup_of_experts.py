"""Bet 100 (Soup-of-Experts): its criteria on crafted measurements, and one reduced run end to end at tiny
that writes the JSON the runner writes for every bet."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from sim.bets import get_bet
from sim.bets.base import CATASTROPHIC, LENIENT, NEITHER, STRICT, VERDICTS, BetError
from sim.bets.bet100_soup_of_experts import BET, Plan, judge_soe, measure_soe, predictions
from sim.bets.context import SuiteContext
from sim.bets.runner import run_bet, write_record

PERSONAS = ["p1", "p2", "p3", "p4"]


def crafted(soe, *, base=10.0, generic=9.6, soup=9.9, mixture=9.7, finetune=9.0):
    """Measurements with the same base, generic, soup, mixture and fine-tune ppl on every persona."""
    return {"personas": PERSONAS,
            "ppl": {p: {"soe": s, "base": base, "soe_generic": generic, "soup": soup, "uniform_mixture": mixture,
                        "finetune_same_compute": finetune} for p, s in zip(PERSONAS, soe)}}


def test_bet_100_is_registered_outside_the_catalogue_with_an_open_catalogue_verdict():
    assert get_bet(100) is BET
    assert BET.name == "100_soup_of_experts" and not BET.in_catalogue and BET.catalogue.agrees(STRICT) is None
    assert any("outside the catalogue" in n for n in BET.notes)


def test_strict_needs_every_persona_better_than_base_and_generic_and_near_the_finetune():
    assert judge_soe(crafted([9.3, 9.4, 9.2, 9.4])) == STRICT
    # one persona no better than its generic instantiation: not STRICT, still LENIENT on the means
    assert judge_soe(crafted([9.3, 9.4, 9.2, 9.7])) == LENIENT
    # 9.5 > 1.05 * 9.0: too far from the fine-tune of the same compute
    assert judge_soe(crafted([9.5, 9.5, 9.5, 9.5])) == LENIENT


def test_lenient_needs_the_specialisation_to_be_real_and_to_beat_the_soup():
    # better than the base but not than the generic instantiation on the mean
    assert judge_soe(crafted([9.7, 9.7, 9.7, 9.7])) == NEITHER
    # beats base and generic, but the soup is better
    assert judge_soe(crafted([9.5, 9.5, 9.5, 9.5], soup=9.4, finetune=8.0)) == NEITHER
    # only 1 of 4 personas beats the base: not half
    assert judge_soe(crafted([8.0, 10.1, 10.1, 10.1], generic=10.5, soup=10.5)) == NEITHER
    # 2 of 4 beat the base and the means favour SoE
    assert judge_soe(crafted([8.0, 8.0, 10.1, 10.1], generic=10.5, soup=10.5)) == LENIENT


def test_catastrophic_when_no_persona_beats_the_base():
    assert judge_soe(crafted([10.0, 10.5, 12.0, 11.0])) == CATASTROPHIC


def test_judge_refuses_measurements_that_lack_a_method():
    m = crafted([9.0] * 4)
    del m["ppl"]["p2"]["soup"]
    with pytest.raises(BetError, match="p2.soup"):
        judge_soe(m)


def test_predictions_follow_their_definitions():
    m = {"bank_kind": {"dense": {"soe": 0.90}, "rank-4": {"soe": 0.95}},
         "support": {"1": {"soe": 0.85, "soe_generic": 0.99}, "2": {"soe": 0.88, "soe_generic": 0.97},
                     "4": {"soe": 0.90, "soe_generic": 0.96}},
         "samples": {"256": {"min_weight_on_true": 0.85, "ratio_to_oracle": 1.005}}}
    assert predictions(m) == {"dense_beats_low_rank": True, "sparsest_support_best_specialist": True,
                              "widest_support_best_generic": True, "few_tokens_suffice": True}
    m["bank_kind"]["rank-4"]["soe"] = 0.80
    m["support"]["4"]["soe"] = 0.80
    m["samples"]["256"]["min_weight_on_true"] = 0.5
    assert predictions(m) == {"dense_beats_low_rank": False, "sparsest_support_best_specialist": False,
                              "widest_support_best_generic": True, "few_tokens_suffice": False}


def test_plan_validation():
    with pytest.raises(ValueError, match="support"):
        Plan(support=3, supports=(1, 2))
    with pytest.raises(ValueError, match="est_tokens"):
        Plan(est_tokens=2048)


@pytest.mark.slow
def test_reduced_run_at_tiny_writes_json_whose_verdict_follows_from_its_measurements(tiny_suite, tmp_path):
    plan = Plan(bank_size=2, rank=2, support=2, supports=(1, 2), catalogue_steps=250, est_tokens=64,
                est_sweep=(16, 64))
    bet = dataclasses.replace(BET, measure=lambda ctx: measure_soe(ctx, plan))
    rec = run_bet(bet, SuiteContext(tiny_suite))
    assert rec.get("error") is None, rec.get("traceback")
    path = write_record(rec, tmp_path)
    assert path.name == "100_soup_of_experts.json"
    written = json.loads(path.read_text())
    for key in ("bet", "criteria", "measurements", "verdict", "catalogue_verdict", "agrees", "preset", "seed"):
        assert key in written
    assert written["bet"] == 100 and written["preset"] == "tiny" and written["agrees"] is None
    m = written["measurements"]
    assert written["verdict"] in VERDICTS and written["verdict"] == judge_soe(m)
    assert m["plan"]["bank_steps"] == 10  # 250 catalogue steps at tiny's 40 / 1000 specialist steps
    for p in tiny_suite.personas:
        row = m["ppl"][p]
        assert set(row) >= {"soe", "soe_oracle", "soe_generic", "base", "finetune_same_compute", "specialist",
                            "soup", "uniform_mixture", "posterior_mixture"}
        assert all(math.isfinite(v) and v > 1 for v in row.values())
        assert abs(sum(m["h_estimate"][p]) - 1) < 1e-3
        # the per-token bound of the uniform mixture: never worse than the best specialist by more than log N
        assert math.log(row["uniform_mixture"]) <= math.log(row["specialist"]) + math.log(len(tiny_suite.personas))
    assert set(m["support"]) == {"1", "2"} and set(m["bank_kind"]) == {"dense", "rank-2"}
    assert set(m["predictions"]) >= {"dense_beats_low_rank", "sparsest_support_best_specialist"}
    assert m["bytes"]["dense"]["bank"]["total"] > m["bytes"]["low_rank"]["bank"]["total"]
