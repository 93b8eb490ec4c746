"""The network model against transfer times computed by hand."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.network import (
    COORDINATOR,
    LINK_PRESETS,
    LinkProfile,
    NetworkError,
    TransferSimulator,
    VirtualClock,
    assign_links,
    expert_arrivals,
    get_link,
    link_from_dict,
    max_min_rates,
    resolve_link,
    simulate_transfers,
    write_events,
)

MB = 1_000_000  # bytes
M = 1_000_000  # bits/s


def link(down_mbit: float, up_mbit: float = 1.0, rtt_s: float = 0.0) -> LinkProfile:
    return LinkProfile(down_bps=down_mbit * M, up_bps=up_mbit * M, rtt_s=rtt_s)


def down(node: str, nbytes: int, **kw) -> dict:
    return dict(kind="bundle", src=COORDINATOR, dst=node, nbytes=nbytes, **kw)


def test_presets_say_what_the_issue_asks():
    adsl = get_link("school-adsl")
    assert (adsl.down_bps, adsl.up_bps, adsl.rtt_s) == (8e6, 0.8e6, 0.06)
    assert get_link("satellite").rtt_s == 0.6
    assert {"school-adsl", "4g", "fibre", "satellite", "loopback"} <= set(LINK_PRESETS)
    # 1 MB over ADSL: 60 ms, then 8 Mbit at 8 Mbit/s
    assert adsl.download_s(MB) == pytest.approx(1.06)
    assert adsl.upload_s(100_000) == pytest.approx(0.06 + 0.8e6 / 0.8e6)


def test_one_flow_limited_by_its_down_link_plus_rtt():
    [r] = simulate_transfers({"school": get_link("school-adsl")}, [down("school", MB)], egress_bps=100 * M)
    assert r.start == 0.0
    assert r.first_byte == pytest.approx(0.06)
    assert r.end == pytest.approx(1.06)


def test_two_equal_flows_share_the_egress():
    links = {"a": get_link("fibre"), "b": get_link("fibre")}
    ra, rb = simulate_transfers(links, [down("a", 1_250_000), down("b", 1_250_000)], egress_bps=10 * M)
    # 10 Mbit each at 5 Mbit/s = 2 s, after the 10 ms round trip
    assert ra.end == pytest.approx(2.01) and rb.end == pytest.approx(2.01)


def test_short_flow_leaves_and_the_long_one_speeds_up():
    links = {"a": link(100), "b": link(100)}
    ra, rb = simulate_transfers(links, [down("a", 1_250_000), down("b", 625_000)], egress_bps=10 * M)
    # both at 5 Mbit/s; b's 5 Mbit are done at 1 s; a's last 5 Mbit go alone at 10 Mbit/s: 0.5 s more
    assert rb.end == pytest.approx(1.0)
    assert ra.end == pytest.approx(1.5)


def test_flow_capped_by_its_down_link_leaves_the_rest_to_the_other():
    links = {"slow": link(8), "fast": link(100)}
    rs, rf = simulate_transfers(links, [down("slow", MB), down("fast", 3 * MB)], egress_bps=20 * M)
    # max-min: slow gets its 8 Mbit/s, fast the other 12: slow's 8 Mbit take 1 s; fast has 12 of 24 Mbit
    # done by then and finishes the rest alone at 20 Mbit/s in 0.6 s
    assert rs.end == pytest.approx(1.0)
    assert rf.end == pytest.approx(1.6)


def test_late_arrival_joins_the_share():
    links = {"a": link(100), "b": link(100)}
    ra, rb = simulate_transfers(links, [down("a", 1_250_000), down("b", 625_000, at=0.5)], egress_bps=10 * M)
    # a alone 0.5 s (5 Mbit), then both at 5 Mbit/s: a's other 5 Mbit and b's 5 Mbit both need 1 s
    assert ra.end == pytest.approx(1.5)
    assert rb.end == pytest.approx(1.5)
    assert rb.start == 0.5


def test_latency_of_empty_and_peer_transfers():
    links = {"sat": get_link("satellite"), "adsl": get_link("school-adsl")}
    empty, peer = simulate_transfers(
        links, [down("sat", 0), dict(kind="remote", src="adsl", dst="sat", nbytes=10_000)], egress_bps=M)
    assert empty.end == pytest.approx(0.6)
    # node to node: both RTTs, then limited by the sender's 0.8 Mbit/s upload (the egress is not involved)
    assert peer.end == pytest.approx(0.66 + 80_000 / 0.8e6)
    assert peer.node == "sat"


def test_upload_to_the_coordinator_and_its_ingress():
    links = {"a": link(100, up_mbit=4)}
    [free] = simulate_transfers(links, [dict(kind="up", src="a", dst=COORDINATOR, nbytes=MB)], egress_bps=M)
    assert free.end == pytest.approx(2.0)  # 8 Mbit at the node's 4 Mbit/s upload
    assert free.node == "a"
    [capped] = simulate_transfers(links, [dict(kind="up", src="a", dst=COORDINATOR, nbytes=MB)],
                                  egress_bps=M, ingress_bps=2 * M)
    assert capped.end == pytest.approx(4.0)


def test_chained_stream_pays_one_round_trip():
    sim = TransferSimulator({"s": get_link("school-adsl")}, egress_bps=100 * M)
    ids = sim.ship_stream("s", [(MB, {"block": 0, "expert": 3}), (MB, {"block": 1, "expert": 5})])
    first, second = sim.run()
    assert [first.id, second.id] == ids
    assert first.end == pytest.approx(1.06)
    assert second.first_byte == pytest.approx(1.06)
    assert second.end == pytest.approx(2.06)
    assert sim.events[1]["block"] == 1 and sim.events[1]["expert"] == 5


def test_chain_requested_after_its_predecessor_ended_starts_when_requested():
    sim = TransferSimulator({"a": link(8)}, egress_bps=100 * M)
    t0 = sim.submit(kind="x", src=COORDINATOR, dst="a", nbytes=MB)
    sim.wait(t0)
    t1 = sim.submit(kind="x", src=COORDINATOR, dst="a", nbytes=MB, at=3.0, after=t0)
    assert sim.wait(t1).end == pytest.approx(4.0)


def test_advance_to_leaves_unfinished_transfers_in_flight():
    sim = TransferSimulator({"a": link(8)}, egress_bps=100 * M)
    tid = sim.submit(kind="x", src=COORDINATOR, dst="a", nbytes=MB)  # 1 s
    assert sim.advance_to(0.25) == []
    assert sim.record(tid) is None and sim.clock.now == 0.25
    # 2 Mbit moved so far; a second flow to the same node halves the rate of each from now on
    other = sim.submit(kind="x", src=COORDINATOR, dst="a", nbytes=MB)
    assert sim.wait(tid).end == pytest.approx(0.25 + 6 / 4)
    assert sim.wait(other).end == pytest.approx(0.25 + 6 / 4 + 2 / 8)


def test_events_log_and_jsonl(tmp_path):
    sim = TransferSimulator({"a": link(8, rtt_s=0.1)}, egress_bps=100 * M)
    sim.submit(kind="bundle", src=COORDINATOR, dst="a", nbytes=MB, meta={"codec": "int8"})
    sim.run()
    [e] = sim.events
    assert {k: e[k] for k in ("kind", "node", "bytes", "start", "end", "codec")} == pytest.approx(
        {"kind": "bundle", "node": "a", "bytes": MB, "start": 0.0, "end": 1.1, "codec": "int8"})
    path = tmp_path / "events.jsonl"
    write_events(path, sim.events)
    assert [json.loads(line) for line in path.read_text().splitlines()] == sim.events


def test_same_submissions_give_the_same_times():
    def times():
        sim = TransferSimulator({"a": link(8, rtt_s=0.05), "b": link(30, rtt_s=0.02)}, egress_bps=12 * M)
        for i in range(6):
            sim.submit(kind="x", src=COORDINATOR, dst="ab"[i % 2], nbytes=100_000 * (i + 1), at=0.1 * i)
        sim.run()
        return [(e["id"], e["end"]) for e in sim.events]
    assert times() == times()


def test_expert_arrivals_in_shipping_order():
    sim = TransferSimulator({"n": link(8)}, egress_bps=100 * M)
    sizes = np.full((2, 4), MB)
    arrival = expert_arrivals(sim, "n", [(1, 2), (0, 0)], sizes, at=1.0)
    assert arrival[1, 2] == pytest.approx(2.0) and arrival[0, 0] == pytest.approx(3.0)
    assert np.isinf(arrival[0, 1]) and np.isinf(arrival).sum() == 6


def test_link_from_dict_names_the_bad_key():
    assert link_from_dict({"down_bps": 1e6, "up_bps": 2e5, "rtt_s": 0.3}) == LinkProfile(
        down_bps=1e6, up_bps=2e5, rtt_s=0.3)
    assert link_from_dict({"preset": "4g", "rtt_s": 0.2}).down_bps == get_link("4g").down_bps
    assert resolve_link("fibre") == get_link("fibre")
    with pytest.raises(NetworkError, match="'dwn_bps'"):
        link_from_dict({"dwn_bps": 1e6, "up_bps": 1e6, "rtt_s": 0.0}, where="nodes.a.link")
    with pytest.raises(NetworkError, match="missing key 'rtt_s'"):
        link_from_dict({"down_bps": 1e6, "up_bps": 1e6})
    with pytest.raises(NetworkError, match=r"nodes\.a\.link: rtt_s must be"):
        link_from_dict({"preset": "4g", "rtt_s": -1}, where="nodes.a.link")
    with pytest.raises(NetworkError, match=r"link\.up_bps: expected a number"):
        link_from_dict({"preset": "4g", "up_bps": "fast"})
    # the scenario's spelling in Mbit/s and ms
    assert link_from_dict({"down_mbps": 8, "up_mbps": 0.8, "rtt_ms": 60}) == get_link("school-adsl")
    with pytest.raises(NetworkError, match="'rtt_ms' sets rtt_s a second time"):
        link_from_dict({"preset": "4g", "rtt_s": 0.1, "rtt_ms": 100})
    with pytest.raises(NetworkError, match="unknown link preset 'dialup'"):
        resolve_link("dialup")


def test_assign_links_by_index_ranges_and_custom_profiles():
    village = {"down_mbps": 2, "up_mbps": 0.5, "rtt_ms": 120}
    links = assign_links(6, default="school-adsl", ranges={"0-1": "fibre", "4": "village"},
                         profiles={"village": village})
    assert links == [get_link("fibre")] * 2 + [get_link("school-adsl")] * 2 + [
        link_from_dict(village), get_link("school-adsl")]
    with pytest.raises(NetworkError, match="links.5-9: nodes 5..9"):
        assign_links(6, default="fibre", ranges={"5-9": "4g"})
    with pytest.raises(NetworkError, match="unknown link preset 'moon'"):
        assign_links(2, default="fibre", ranges={"1": "moon"})
    with pytest.raises(NetworkError, match="profiles.bad: unknown key 'speed'"):
        assign_links(2, default="bad", profiles={"bad": {"speed": 1}})


def test_bad_inputs_raise_named_errors():
    with pytest.raises(NetworkError, match="down_bps"):
        LinkProfile(down_bps=0, up_bps=1, rtt_s=0)
    clock = VirtualClock(2.0)
    with pytest.raises(NetworkError, match="cannot go back"):
        clock.advance_to(1.0)
    sim = TransferSimulator({"a": link(8)}, egress_bps=M)
    with pytest.raises(NetworkError, match="unknown node 'b'"):
        sim.submit(kind="x", src=COORDINATOR, dst="b", nbytes=1)
    with pytest.raises(NetworkError, match="nbytes"):
        sim.submit(kind="x", src=COORDINATOR, dst="a", nbytes=-1)
    with pytest.raises(NetworkError, match="reserved"):
        sim.submit(kind="x", src=COORDINATOR, dst="a", nbytes=1, meta={"end": 3})
    sim.advance_to(5.0)
    with pytest.raises(NetworkError, match="before the clock"):
        sim.submit(kind="x", src=COORDINATOR, dst="a", nbytes=1, at=4.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True), min_size=1, max_size=6),
       st.lists(st.floats(0.5, 10.0), min_size=4, max_size=4))
def test_max_min_rates_are_feasible_and_fair(paths, caps):
    demands = {i: tuple(f"r{r}" for r in p) for i, p in enumerate(paths)}
    capacity = {f"r{i}": c for i, c in enumerate(caps)}
    rates = max_min_rates(demands, capacity)
    load = {r: sum(rates[f] for f in demands if r in demands[f]) for r in capacity}
    assert all(load[r] <= capacity[r] * (1 + 1e-9) for r in capacity)
    # max-min fairness: every flow crosses a saturated resource on which no other flow gets more
    for f, path in demands.items():
        assert any(load[r] >= capacity[r] * (1 - 1e-9)
                   and all(rates[g] <= rates[f] * (1 + 1e-9) for g in demands if r in demands[g])
                   for r in path)
