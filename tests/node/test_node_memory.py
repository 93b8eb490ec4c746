"""python -m node.memory: a smoke test of the measurement (its figures are machine-dependent)."""

from __future__ import annotations

import json

from model.config import PRESETS
from model.fractal_moe import build_model
from node.memory import main


def test_memory_cli_reports_weights_and_per_node_cost(capsys):
    assert main(["--preset", "tiny", "--nodes", "3", "--users", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["nodes"] == 3 and r["shared_weights"] is True
    assert r["weight_bytes"] == 4 * build_model(PRESETS["tiny"].model, 0).num_params()
    # RSS is a measurement (the allocator may hand pages back between marks), so only its sanity is checked
    assert r["rss_before"] > 0 and r["rss_after"] > 0 and isinstance(r["per_additional_node_bytes"], int)


def test_memory_cli_refuses_bad_input(capsys):
    assert main(["--preset", "nope", "--nodes", "3"]) == 2
    assert main(["--nodes", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: unknown preset 'nope'") and err[1].startswith("error: need at least 2")
