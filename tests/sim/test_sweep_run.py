"""sim.sweep end to end at tiny: two real federation runs and a refused point, every row checked against
its own report.json, the codec-cost figure against the model scored here, and sim.compare on the two runs."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from model.evaluate import token_logps
from model.tokenizer import encode
from sim.compare import main as compare_main
from sim.sweep.cli import main

pytestmark = pytest.mark.slow

SCENARIO = """
name = "t"
[federation]
nodes = 4
preset = "tiny"
[model]
other_codec = "fp32"        # so that the fp32 point ships the base exactly
[workload]
generate_tokens = 4
score_chars = 400
generate_requests_per_user = 0
[sweep.grid]
"model.expert_codec" = ["fp32", "prune50+ternary-ec", "bogus"]  # a composed codec's name ships too
"""


@pytest.fixture(scope="module")
def sweep(tiny_suite, tmp_path_factory):
    """The sweep, run once: fp32 and prune50+ternary-ec points on satellite links (an axis from the command
    line), and a
    bogus codec refused and skipped."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "s.toml").write_text(SCENARIO)
    out = root / "out"
    rc = main(["--scenario", str(root / "s.toml"), "--grid", "network.default_link=satellite", "--skip-refused",
               "--out", str(out), "--quiet"])
    return rc, out, json.loads((out / "sweep.json").read_text())


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def test_every_row_equals_its_own_report(sweep) -> None:
    rc, out, s = sweep
    assert rc == 0
    assert [r["status"] for r in s["rows"]] == ["ok", "ok", "refused"]
    assert s["keys"] == ["model.expert_codec"]  # the link takes one value: not a varied key
    for row in s["rows"][:2]:
        rep = json.loads((out / row["folder"] / "report.json").read_text())
        assert rep["scenario"]["model"]["expert_codec"] == row["values"]["model.expert_codec"]
        assert rep["scenario"]["network"]["default_link"] == "satellite"
        assert row["bytes_total"] == rep["bytes_total"] == sum(rep["bytes_by_kind"].values())
        assert row["bytes_by_kind"] == rep["bytes_by_kind"]
        assert row["bytes_shipped"] == rep["bytes_total"] - rep["bytes_by_kind"]["CONTROL"]
        assert row["shipping_makespan_s"] == rep["virtual"]["shipping_makespan_s"]
        assert row["shipping_median_s"] == rep["virtual"]["shipping_median_s"]
        users = rep["quality"]["users"]
        assert row["own_over_base"] == pytest.approx(statistics.median(u["own_ppl"] / u["base_ppl"] for u in users),
                                                     abs=1e-4)
        post = [m["mixture_ppl"] / m["best_ppl"] for m in rep["quality"]["mixtures"] if m["mode"] == "posterior"]
        assert post and row["mixture_over_best"] == pytest.approx(statistics.median(post))
        served = [u["base_ppl"] for u in users] + [u["ppl"] for u in rep["quality"]["unknown"]]
        assert row["ppl"] == pytest.approx(geomean(served))
        assert row["requests_failed"] == rep["requests"]["failed"] == 0
        assert row["requests_total"] == len(users) * 2 + len(rep["quality"]["unknown"]) + len(post) * 2
        assert row["wall_seconds"] == rep["wall_seconds"]
    refused = s["rows"][2]
    assert refused["error"].startswith("model.expert_codec: unknown codec 'bogus'")
    assert not (out / refused["folder"]).exists()


def test_codec_cost_against_the_model_scored_here(sweep, tiny_suite) -> None:
    _, out, s = sweep
    fp32, packed = s["rows"][:2]
    # every tensor shipped in fp32: the nodes serve the base exactly, so served / uncompressed is 1
    assert fp32["codec_over_uncompressed"] == pytest.approx(1.0, abs=1e-5)
    assert packed["codec_over_uncompressed"] != pytest.approx(1.0, abs=1e-7)
    assert packed["bytes_by_kind"]["BUNDLE"] < 0.5 * fp32["bytes_by_kind"]["BUNDLE"]  # 1.5 bits a weight against 32
    # the uncompressed reference, recomputed here: the first user's first scoring text under the fp32 base
    rep = json.loads((out / packed["folder"] / "report.json").read_text())
    first = rep["codec_quality"]["texts"][0]
    text = tiny_suite.text(first["user"], "eval")[:400]
    ids = torch.tensor(encode(tiny_suite.tokenizer, text))
    expected = math.exp(-float(token_logps(tiny_suite.base(), ids).mean()))
    assert first["uncompressed_ppl"] == pytest.approx(expected, rel=1e-6)


def test_frontier_marks_and_report_files(sweep) -> None:
    _, out, s = sweep
    a, b = s["rows"][:2]

    def dominated(x, y, key):
        return x[key] <= y[key] and x["ppl"] <= y["ppl"] and (x[key], x["ppl"]) != (y[key], y["ppl"])
    for key, flag in (("bytes_shipped", "frontier_bytes"), ("shipping_makespan_s", "frontier_time")):
        assert a[flag] == (not dominated(b, a, key)) and b[flag] == (not dominated(a, b, key))
    assert b["frontier_bytes"]  # the fewest bytes is always on the bytes frontier
    md = (out / "sweep.md").read_text()
    assert md.count("\n| 1 | `fp32` |") == 1 and md.count("\n| 2 | `prune50+ternary-ec` |") == 1
    assert "- point 3 (refused): model.expert_codec: unknown codec 'bogus'" in md
    for name in ("sweep_frontier.png", "sweep_by_model.expert_codec.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in s["plots"]
    t = s["timing"]
    assert t["overhead_seconds"] == pytest.approx(t["wall_seconds"] - t["models_seconds"] - t["points_seconds"],
                                                  abs=0.02)
    assert s["shared"][0].startswith("models") and s["shared"][1].startswith("bundles") and s["shared"][2] == "Ray"


def test_compare_two_points(sweep, capsys) -> None:
    _, out, s = sweep
    a, b = (out / r["folder"] for r in s["rows"][:2])
    assert compare_main([str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "  model.expert_codec: fp32 -> prune50+ternary-ec" in text
    ratio = s["rows"][1]["bytes_total"] / s["rows"][0]["bytes_total"]
    line = next(line for line in text.splitlines() if line.startswith("| bytes, total |"))
    assert line.endswith(f"| {ratio:.4f} |")
    assert compare_main([str(a / "report.json"), str(b), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    by = {f["figure"]: f for f in got["figures"]}
    assert by["bytes, BUNDLE"]["b_over_a"] == pytest.approx(
        s["rows"][1]["bytes_by_kind"]["BUNDLE"] / s["rows"][0]["bytes_by_kind"]["BUNDLE"])
    assert by["served / uncompressed ppl"]["a"] == pytest.approx(1.0, abs=1e-5)
    assert got["changes"] == [{"key": "model.expert_codec", "a": "fp32", "b": "prune50+ternary-ec"}]


def test_a_shared_bundle_is_the_bundle_a_run_of_its_own_writes(tiny_suite, tmp_path) -> None:
    """Points that ship the same model in the same codecs share its bundle: the file the first wrote,
    byte for byte what a federation of its own writes."""
    from sim.federation import LocalFederation
    from sim.run import link_names
    from sim.scenario import from_dict

    scn = from_dict({"federation": {"nodes": 4, "preset": "tiny"}, "model": {"expert_codec": "int8"}})
    names, _ = link_names(scn)
    cache: dict = {}
    first, second, alone = (LocalFederation(scn, tiny_suite, tmp_path / w, link_names=names, progress=False,
                                            bundle_cache=c) for w, c in (("a", cache), ("b", cache), ("c", None)))
    for fed in (first, second, alone):
        fed.write_bundles()
    assert set(first.bundles) == set(second.bundles) == set(alone.bundles) and len(cache) == len(first.bundles)
    for name, info in second.bundles.items():
        assert info is first.bundles[name] and info.path.parent == tmp_path / "a" / "bundles"
        own = alone.bundles[name]
        assert info.sha256 == own.sha256 and info.path.read_bytes() == own.path.read_bytes()
    assert not (tmp_path / "b" / "bundles").exists() or not any((tmp_path / "b" / "bundles").iterdir())
