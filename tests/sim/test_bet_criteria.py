"""Every bet's criteria, fed crafted measurements: each verdict where the criteria say it, and the
catalogue's own figures giving the catalogue's own verdict where the catalogue reports enough."""

from __future__ import annotations

import json
import math

import pytest

from sim.bets import all_bets, get_bet
from sim.bets.base import (
    CATASTROPHIC,
    FAILS,
    LENIENT,
    NEITHER,
    OPEN,
    STRICT,
    VERDICTS,
    WORKS,
    Bet,
    BetError,
    CatalogueResult,
    Criteria,
    geomean,
    ratio_verdict,
)
from sim.bets.runner import record, summary_markdown, to_json

BETS = all_bets()


def judge(number: int, m: dict) -> str:
    """The verdict of bet ``number`` on ``m``, after the JSON round trip the runner gives it."""
    return BETS[number].verdict(json.loads(json.dumps(to_json(m))))


# ---- the registry ---------------------------------------------------------------------------------

def test_registry_has_every_bet_of_the_issue():
    wanted = {4, 12, 13, 18, 31, 33, 38, 39, 48, 54, 55, 61, 101, 102, 103}
    assert wanted <= set(BETS)
    for n, bet in BETS.items():
        assert bet.number == n and bet.name.startswith(f"{n:02d}_")
        assert bet.in_catalogue == (n < 100)
    names = [b.name for b in BETS.values()]
    assert len(set(names)) == len(names)
    assert BETS[31].name == "31_model_soup" and BETS[38].name == "38_expert_collapse"
    assert BETS[55].name == "55_logit_ensemble" and BETS[4].name == "04_mixture_combiner"


@pytest.mark.parametrize("ident,number", [("31", 31), (31, 31), ("04", 4), ("4", 4), ("31_model_soup", 31)])
def test_get_bet(ident, number):
    assert get_bet(ident).number == number


@pytest.mark.parametrize("ident", ["99", "31_wrong_name", "soup", ""])
def test_get_bet_refuses_unknown(ident):
    with pytest.raises(BetError, match="unknown bet"):
        get_bet(ident)


def test_bet_validates_itself():
    kw = dict(slug="x", title="t", question="q", setup="s",
              criteria=Criteria(strict="a", lenient="b", catastrophic="c", source="d"),
              catalogue=CatalogueResult(verdict=OPEN, quote="q"), judge=lambda m: STRICT,
              measure=lambda ctx: {}, key_figures=lambda m: "")
    assert Bet(number=7, **kw).name == "07_x"
    with pytest.raises(BetError, match="positive"):
        Bet(number=0, **kw)
    with pytest.raises(BetError, match="slug"):
        Bet(number=7, **{**kw, "slug": "Bad Slug"})
    with pytest.raises(BetError, match="from 100"):
        Bet(number=7, in_catalogue=False, **kw)
    with pytest.raises(BetError, match="judge returned"):
        Bet(number=7, **{**kw, "judge": lambda m: "FAIL"}).verdict({})
    with pytest.raises(BetError, match="catalogue verdict"):
        CatalogueResult(verdict="MAYBE", quote="")


def test_catalogue_agreement_vocabulary():
    assert CatalogueResult(verdict=WORKS, quote="").agrees(LENIENT) is True
    assert CatalogueResult(verdict=WORKS, quote="").agrees(NEITHER) is False
    assert CatalogueResult(verdict=FAILS, quote="").agrees(CATASTROPHIC) is True
    assert CatalogueResult(verdict=FAILS, quote="").agrees(STRICT) is False
    assert CatalogueResult(verdict=CATASTROPHIC, quote="").agrees(NEITHER) is False
    assert CatalogueResult(verdict=OPEN, quote="").agrees(STRICT) is None


def test_ratio_verdict_and_geomean():
    assert ratio_verdict(1.4, 50, strict=1.5, lenient=3, catastrophic=10) == STRICT
    assert ratio_verdict(1.5, 50, strict=1.5, lenient=3, catastrophic=10) == STRICT  # "<=" is inclusive
    assert ratio_verdict(3.0, 50, strict=1.5, lenient=3, catastrophic=10) == LENIENT
    assert ratio_verdict(5.0, 50, strict=1.5, lenient=3, catastrophic=10) == NEITHER
    assert ratio_verdict(10.5, 50, strict=1.5, lenient=3, catastrophic=10) == CATASTROPHIC
    assert ratio_verdict(1.0, 4, strict=1.5, lenient=3, catastrophic=10) == CATASTROPHIC  # collapse wins
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)
    with pytest.raises(BetError):
        geomean([])


# ---- Bet 31 / 103: soups ---------------------------------------------------------------------------

def soup(ppls_1: list[float], ppls_2: list[float], p1=(187.0, 300.0), p2=(220.0, 150.0),
         alphas=("0.1", "0.3", "0.5", "0.7", "0.9"), sane=True) -> dict:
    """Two eval texts: t1 (specialist 1's, parents p1[0] / p2[0]) and t2 (parents p1[1] / p2[1])."""
    return {"specialist_1": "t1", "specialist_2": "t2", "eval_texts": ["t1", "t2"], "alphas": list(alphas),
            "soup_ppl": {"t1": dict(zip(alphas, ppls_1)), "t2": dict(zip(alphas, ppls_2))},
            "parent_ppl": {"t1": {"specialist_1": p1[0], "specialist_2": p2[0]},
                           "t2": {"specialist_1": p1[1], "specialist_2": p2[1]}},
            "loss_barrier_nats": {"t1": 0.1, "t2": 0.1},
            "sanity": {"alpha0_bitwise_equals_parent": sane, "alpha1_bitwise_equals_parent": True}}


def test_bet31_catalogue_figures_are_catastrophic():
    # the catalogue's own numbers on its one eval text: 224 > 220 (the worse parent) already at 0.1
    m = soup([224, 280, 351, 433, 502], [400, 400, 400, 400, 400])
    assert judge(31, {**m, "eval_texts": ["t1"]}) == CATASTROPHIC
    assert judge(31, m) == CATASTROPHIC


@pytest.mark.parametrize("t1,t2,expect", [
    ([186, 250, 300, 300, 300], [400] * 5, STRICT),       # 186 < 187 and < 220 on t1
    ([300] * 5, [400, 400, 149, 400, 400], STRICT),       # beats both on the second text only
    ([187, 250, 300, 300, 300], [400] * 5, LENIENT),      # ties the better parent
    ([200, 210, 221, 300, 300], [400] * 5, NEITHER),      # between the parents at 0.1 and 0.3
    ([221] * 5, [300.5] * 5, CATASTROPHIC),               # worse than the worse parent everywhere
    ([221] * 5, [300] * 5, NEITHER),                      # ties the worse parent once: not "worse than"
])
def test_bet31_criteria(t1, t2, expect):
    assert judge(31, soup(t1, t2)) == expect


def test_bet31_refuses_failed_sanity_checks():
    with pytest.raises(BetError, match="sanity"):
        judge(31, soup([186] * 5, [400] * 5, sane=False))


def test_bet103_uses_bet31_criteria():
    m = soup([186, 300], [400, 400], alphas=("0.05", "0.95"))
    assert judge(103, m) == STRICT
    assert judge(103, soup([230, 230], [301, 301], alphas=("0.05", "0.95"))) == CATASTROPHIC


# ---- Bet 04: mixture combiner --------------------------------------------------------------------------

def mixture(rows: dict, token_ok=True, regret_ok=True) -> dict:
    texts = {t: {"best_ppl": best, "posterior_ppl": post, "uniform_ppl": post * 1.1, "best_specialist": "a",
                 "specialist_ppl": {"a": best}, "tokens": 100} for t, (best, post) in rows.items()}
    return {"texts": texts, "per_token_bound": {"holds": token_ok, "slack_nats": 0.1},
            "regret_bound": {"holds": regret_ok, "slack_nats": 0.2, "log_n": math.log(3)}}


@pytest.mark.parametrize("rows,token_ok,regret_ok,expect", [
    ({"a": (10, 10.4), "b": (20, 20.9), "mixed": (30, 15)}, True, True, STRICT),
    ({"a": (10, 10.4), "b": (20, 20.9), "mixed": (30, 31)}, True, True, LENIENT),   # within 5% but not better
    ({"a": (10, 10.6), "b": (20, 20.0), "mixed": (30, 15)}, True, True, NEITHER),   # 6% off on one domain
    ({"a": (10, 10.0), "b": (20, 20.0), "mixed": (30, 15)}, False, True, CATASTROPHIC),
    ({"a": (10, 10.0), "b": (20, 20.0), "mixed": (30, 15)}, True, False, CATASTROPHIC),
])
def test_bet04_criteria(rows, token_ok, regret_ok, expect):
    assert judge(4, mixture(rows, token_ok, regret_ok)) == expect


def test_bet04_needs_the_pooled_stream():
    with pytest.raises(BetError, match="mixed"):
        judge(4, mixture({"a": (10, 10)}))


# ---- Bet 18: attribution -------------------------------------------------------------------------------

@pytest.mark.parametrize("acc,err,expect", [
    (0.95, 0.0, STRICT), (0.9, 1e-9, STRICT), (0.7, 0.0, LENIENT), (0.5, 0.0, NEITHER),
    (0.25, 0.0, CATASTROPHIC), (0.95, 1e-3, CATASTROPHIC),
])
def test_bet18_criteria(acc, err, expect):
    m = {"document_accuracy": acc, "token_accuracy": acc, "chance": 0.25, "max_sum_error": err}
    assert judge(18, m) == expect


# ---- Bet 33: task vectors ------------------------------------------------------------------------------

def task(merged: dict[str, tuple[float, float]]) -> dict:
    """Specialist p on texts (p, n): (100, 300), geo-mean 173.2; specialist n: (400, 120), 219.1; base 200."""
    return {"specialists": ["p", "n"], "eval_texts": ["p", "n"], "lambdas": list(merged),
            "merged_ppl": {k: {"p": v[0], "n": v[1]} for k, v in merged.items()},
            "specialist_ppl": {"p": {"p": 100, "n": 300}, "n": {"p": 400, "n": 120}},
            "base_ppl": {"p": 200, "n": 200}}


@pytest.mark.parametrize("merged,expect", [
    ({"1,1": (104, 125), "0.5,0.5": (400, 400)}, STRICT),   # within 5% of each own specialist
    ({"1,1": (130, 140)}, LENIENT),                          # gm 134.9 < 173.2, the better specialist
    ({"1,1": (180, 180)}, NEITHER),                          # gm 180: between the specialists' 173.2 and 219.1
    ({"1,1": (400, 400), "0.5,1": (150, 160)}, LENIENT),     # one good merge is enough
    ({"1,1": (400, 400), "0.5,0.5": (230, 220)}, CATASTROPHIC),  # every gm > 219.1
])
def test_bet33_criteria(merged, expect):
    assert judge(33, task(merged)) == expect


# ---- Bets 38 / 39: collapse and recovery ----------------------------------------------------------------

def test_bet38_catalogue_figures_are_catastrophic():
    m = {"original_ppl": 89, "averaged_ppl": 46280, "ppl_ratio": 46280 / 89, "unique_tokens_original": 73,
         "unique_tokens_averaged": 2}
    assert judge(38, m) == CATASTROPHIC


@pytest.mark.parametrize("ratio,unique,expect", [
    (1.2, 60, STRICT), (2.9, 60, LENIENT), (9.0, 60, NEITHER), (10.1, 60, CATASTROPHIC), (1.2, 4, CATASTROPHIC),
])
def test_bet38_criteria(ratio, unique, expect):
    assert judge(38, {"ppl_ratio": ratio, "unique_tokens_averaged": unique}) == expect


def test_bet39_catalogue_figures_fail():
    # ~280 vs 89 is 3.15x: past LENIENT's 3x; the catalogue gives no unique-token count, so not CATASTROPHIC
    v = judge(39, {"recovery_ratio": 280 / 89, "unique_tokens_recovered": 50})
    assert v == NEITHER and BETS[39].catalogue.agrees(v)
    assert judge(39, {"recovery_ratio": 1.1, "unique_tokens_recovered": 50}) == STRICT


# ---- Bets 13 / 48: compression within experts ---------------------------------------------------------

@pytest.mark.parametrize("number", [13, 48])
@pytest.mark.parametrize("ratio,unique,unique_fp32,expect", [
    (1.0, 40, 40, STRICT), (1.05, 40, 40, STRICT), (1.2, 40, 40, LENIENT), (2.0, 40, 40, NEITHER),
    (3.5, 40, 40, CATASTROPHIC), (1.0, 3, 40, CATASTROPHIC),
    (1.0, 3, 4, STRICT),  # the fp32 sample is already degenerate: the codec did not cause it
])
def test_compression_criteria(number, ratio, unique, unique_fp32, expect):
    m = {"ppl_ratio": ratio, "unique_tokens": unique, "unique_tokens_fp32": unique_fp32, "codec": "x"}
    assert judge(number, m) == expect


# ---- Bets 54 / 55 / 61 / 102: adapters -------------------------------------------------------------------

def users(rows: dict[str, tuple[float, float, float]]) -> dict:
    """{user: (base, own, averaged)}."""
    return {"users": list(rows), "per_user": {u: {"base_ppl": b, "own_ppl": o, "averaged_ppl": a}
                                               for u, (b, o, a) in rows.items()}}


@pytest.mark.parametrize("rows,expect", [
    ({"u": (100, 80, 82), "v": (50, 40, 41)}, STRICT),
    ({"u": (100, 80, 95), "v": (50, 40, 50)}, LENIENT),
    ({"u": (100, 80, 95), "v": (50, 40, 51)}, NEITHER),
    ({"u": (100, 80, 101), "v": (50, 40, 51)}, CATASTROPHIC),
])
def test_bet54_criteria(rows, expect):
    assert judge(54, users(rows)) == expect


def test_bet55_catalogue_figures_are_catastrophic():
    assert judge(55, {"base_ppl": 1824, "ensemble_ppl": 1917, "best_adapter_ppl": 1856}) == CATASTROPHIC


@pytest.mark.parametrize("ens,expect", [(94.9, STRICT), (95.0, STRICT), (99.0, LENIENT), (100.0, LENIENT),
                                        (100.1, CATASTROPHIC)])
def test_bet55_criteria(ens, expect):
    assert judge(55, {"base_ppl": 100.0, "ensemble_ppl": ens}) == expect


@pytest.mark.parametrize("sel,expect", [(90.0, STRICT), (99.0, LENIENT), (101.0, CATASTROPHIC)])
def test_bet102_criteria(sel, expect):
    assert judge(102, {"unknown_selected_ppl": sel, "unknown_base_ppl": 100.0}) == expect


def confusion(own_vs_best_other: list[tuple[float, float]]) -> dict:
    us = [f"u{i}" for i in range(len(own_vs_best_other))]
    ppl = {a: dict.fromkeys(us, 1000.0) for a in us}
    for i, (own, other) in enumerate(own_vs_best_other):
        ppl[us[i]][us[i]] = own
        ppl[us[(i + 1) % len(us)]][us[i]] = other
    return {"users": us, "ppl": ppl}


@pytest.mark.parametrize("pairs,expect", [
    ([(95, 100), (71, 100), (90, 100)], STRICT),      # margins 5%, 29%, 10%: the catalogue's range
    ([(96, 100), (71, 100)], LENIENT),
    ([(96, 100), (101, 100)], NEITHER),
    ([(100, 100), (101, 100)], CATASTROPHIC),
])
def test_bet61_criteria(pairs, expect):
    assert judge(61, confusion(pairs)) == expect


# ---- Bet 12: keyword prefetching -------------------------------------------------------------------------

def prefetch(kw: tuple[float, float, float], glob=0.6, rand=0.5) -> dict:
    def row(r, h=0.5, p=1.5):
        return {"recall": r, "hit_rate": h, "ppl_ratio": p, "bytes_fraction": 0.5}
    return {"experts_per_block": 8, "predictors": {
        "keyword": {"recall": kw[0], "hit_rate": kw[1], "ppl_ratio": kw[2], "bytes_fraction": 0.5},
        "global": row(glob), "random": row(rand), "oracle": row(1.0, 1.0, 1.0)}}


@pytest.mark.parametrize("kw,expect", [
    ((0.97, 0.96, 1.01), STRICT), ((0.7, 0.8, 1.05), LENIENT), ((0.55, 0.8, 1.05), NEITHER),
    ((0.7, 0.8, 1.2), NEITHER), ((0.5, 0.96, 1.0), CATASTROPHIC),
])
def test_bet12_criteria(kw, expect):
    assert judge(12, prefetch(kw)) == expect


# ---- Bet 101: weight space against output space --------------------------------------------------------

def weight_space(ws: dict[str, float], spec=(20.0, 30.0), base=40.0, post=15.0) -> dict:
    def flat(v):
        return {"a": v, "b": v}  # the same ppl on both texts: gm = v
    ppl = {"base": flat(base), "mixture:posterior": flat(post), "mixture:uniform": flat(post + 1),
           "specialist:a": flat(spec[0]), "specialist:b": flat(spec[1]), **{k: flat(v) for k, v in ws.items()}}
    return {"personas": ["a", "b"], "weight_space_methods": list(ws), "specialists": ["specialist:a", "specialist:b"],
            "ppl": ppl}


@pytest.mark.parametrize("ws,expect", [
    ({"soup": 14.0, "ties": 50.0}, STRICT), ({"soup": 18.0}, LENIENT), ({"soup": 25.0}, NEITHER),
    ({"soup": 31.0, "ties": 50.0}, CATASTROPHIC),
])
def test_bet101_criteria(ws, expect):
    assert judge(101, weight_space(ws)) == expect


# ---- every criterion refuses measurements that lack what it needs --------------------------------------

@pytest.mark.parametrize("number", [n for n in BETS if n != 100])
def test_missing_measurements_are_a_bet_error(number):
    with pytest.raises(BetError, match="measurements lack"):
        BETS[number].verdict({})


# ---- records and the summary ---------------------------------------------------------------------------

def test_record_is_judged_as_written_and_carries_the_required_keys():
    m = {"ppl_ratio": 1.0500000001, "unique_tokens_averaged": 60, "unique_tokens_original": 70, "original_ppl": 10.0,
         "averaged_ppl": 10.5}
    rec = record(BETS[38], m, preset="tiny", seed=3)
    for key in ("bet", "criteria", "measurements", "verdict", "catalogue_verdict", "agrees", "preset", "seed"):
        assert key in rec
    assert rec["bet"] == 38 and rec["preset"] == "tiny" and rec["seed"] == 3
    assert rec["measurements"]["ppl_ratio"] == 1.05  # rounded to 8 significant digits, then judged
    assert rec["verdict"] == STRICT == BETS[38].verdict(rec["measurements"])
    assert rec["agrees"] is False and rec["catalogue_verdict"] == CATASTROPHIC
    assert set(rec["criteria"]) >= set(VERDICTS)
    json.dumps(rec, allow_nan=False)


def test_to_json_handles_tensors_numpy_and_infinities():
    import numpy as np
    import torch

    out = to_json({"t": torch.tensor([1.0, 2.0]), "n": np.float32(0.1), "i": np.int64(3), "b": np.bool_(True),
                   "inf": math.inf, "tuple": (1, 2), 5: "x"})
    assert out == {"t": [1.0, 2.0], "n": 0.1, "i": 3, "b": True, "inf": "inf", "tuple": [1, 2], "5": "x"}
    assert judge(38, {"ppl_ratio": math.inf, "unique_tokens_averaged": 60}) == CATASTROPHIC


def test_summary_table_has_a_row_per_bet_and_escapes_pipes():
    recs = [record(BETS[38], {"ppl_ratio": 500.0, "unique_tokens_averaged": 2, "unique_tokens_original": 70,
                              "original_ppl": 1.0, "averaged_ppl": 500.0}, preset="tiny", seed=0),
            record(BETS[55], {"base_ppl": 10.0, "ensemble_ppl": 9.0, "best_adapter_ppl": 9.5,
                              "posterior_ensemble_ppl": 9.1, "unknown_user": "a|b", "known": {}},
                   preset="tiny", seed=0)]
    md = summary_markdown(recs)
    rows = [line for line in md.splitlines() if line.startswith(("| 38_", "| 55_"))]
    assert len(rows) == 2
    assert "| CATASTROPHIC | yes |" in rows[0]
    assert "| STRICT | **no** |" in rows[1] and "a\\|b" in rows[1]
