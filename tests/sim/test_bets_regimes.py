"""`python -m sim.bets.regimes`: verdicts side by side across presets, read from the records as written."""

from __future__ import annotations

import json
import subprocess
import sys

from sim.bets.regimes import load_run, regimes_markdown
from sim.bets.runner import regime_markdown, write_summary


def _record(bet: int, verdict: str, preset: str, *, agrees=True, error=None) -> dict:
    return {"bet": bet, "name": f"{bet:02d}_x", "in_catalogue": bet < 100, "verdict": verdict, "agrees": agrees,
            "catalogue_verdict": "WORKS", "key_figures": f"figure {preset}", "preset": preset, "seed": 0,
            "question": "q", "catalogue_result": "r", "notes": [], **({"error": error} if error else {})}


def _regime(zeroed: list[float]) -> dict:
    texts = {f"t{i}": {"ppl": 10.0, "zeroed_ratio": z, "averaged_ratio": z / 2, "zeroed_ppl": 10 * z,
                       "drop_one": {"median_ratio": 1.01, "max_ratio": 1.2}, "routing_entropy_bits": [3.9] * 4}
             for i, z in enumerate(zeroed)}
    return {"texts": texts, "usage_divergence": {"jsd_bits": [0.1] * 4}}


def _write(folder, preset, records, regime):
    folder.mkdir()
    for r in records:
        (folder / f"{r['name']}.json").write_text(json.dumps(r))
    write_summary(records, folder, reliance=regime)


def test_table_reads_each_runs_verdicts_and_regime(tmp_path):
    _write(tmp_path / "tiny", "tiny", [_record(4, "STRICT", "tiny"), _record(38, "LENIENT", "tiny", agrees=False)],
           _regime([1.1, 1.3]))
    _write(tmp_path / "small", "small", [_record(4, "NEITHER", "small", agrees=None)], _regime([4.5, 6.0, 5.0]))
    text = regimes_markdown([load_run(tmp_path / "tiny"), load_run(tmp_path / "small")])
    assert "x1.10-1.30" in text and "x4.50-6.00 (median x5.00)" in text
    row38 = next(line for line in text.splitlines() if line.startswith("| 38_x"))
    assert "**LENIENT** (**disagrees**): figure tiny" in row38 and row38.rstrip().endswith("not run |")
    assert "**NEITHER**: figure small" in text
    summary = (tmp_path / "small" / "summary.md").read_text()
    assert "expert reliance" in summary and "| t1 | 10.00 | x6.00 | x3.00 |" in summary
    assert "x6.00" in regime_markdown(_regime([6.0]))


def test_cli_refuses_a_folder_without_records(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sim.bets.regimes", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds no bet records" in r.stderr
