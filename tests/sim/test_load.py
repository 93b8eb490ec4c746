"""The bounded load test: a real coordinator and real nodes on loopback, under and past its concurrency cap."""

from __future__ import annotations

import asyncio
import json

import pytest

from sim.loadtest import LoadConfig, LoadRig, LoadTestError, main, percentiles, summary_line


def test_percentiles_are_nearest_rank_in_milliseconds():
    p = percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert (p["n"], p["p50_ms"], p["p90_ms"], p["p99_ms"], p["max_ms"]) == (100, 50.0, 90.0, 99.0, 100.0)
    assert p["mean_ms"] == pytest.approx(50.5)
    assert percentiles([]) == {"n": 0}


@pytest.mark.parametrize("bad, match", [({"clients": 0}, "clients"), ({"kind": "delete"}, "kind"),
                                        ({"preset": "huge"}, "preset"), ({"cap": 0}, "cap")])
def test_bad_settings_are_refused_by_name(bad, match):
    with pytest.raises(LoadTestError, match=match):
        LoadConfig(**bad)


@pytest.mark.slow
def test_under_the_cap_nothing_fails_and_past_it_the_excess_is_shed():
    async def go():
        async with LoadRig(LoadConfig(clients=4, requests=60, nodes=2, users=4, cap=4, kind="mixed")) as rig:
            under = await rig.drive()  # 4 clients, one request each in flight: never more than the cap
            past = await rig.drive(clients=32, requests=128, kind="score")
            return under, past

    under, past = asyncio.run(go())
    assert under["codes"] == {"OK": 60} and under["errors"] == 0 and under["shed"] == 0
    assert under["coordinator"]["requests_ok"] == 60 and under["coordinator"]["requests_shed"] == 0
    lat = under["latency_ok"]
    assert lat["n"] == 60 and 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert under["throughput_rps"] == pytest.approx(60 / under["wall_s"], rel=0.01)
    # past the cap: some are served, the excess is refused with RESOURCE_EXHAUSTED, nothing else fails
    assert past["ok"] > 0 and past["shed"] > 0 and past["ok"] + past["shed"] == 128 and past["errors"] == 0
    assert past["coordinator"]["requests_shed"] == past["shed"]
    assert past["coordinator"]["requests_ok"] == past["ok"]
    assert past["alive_after"] and under["alive_after"]
    line = summary_line(past)
    assert "128 score requests from 32 clients" in line and f"{past['shed']} shed (cap 4)" in line
    assert "0 errors" in line and "alive afterwards" in line
    json.dumps(past)  # the --json output is plain data


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "RESOURCE_EXHAUSTED" in capsys.readouterr().out
    assert main(["--clients", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: clients must be") and err.count("\n") == 1
