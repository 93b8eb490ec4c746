"""What a new user of sim.run gets wrong (issue 15, item 5): each refused in one line, before any
training, and no run leaves behind a report that is not its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.pipeline import Suite
from sim.report import corpus_text_lines
from sim.run import main
from sim.scenario import ScenarioError, from_dict

REPO = Path(__file__).resolve().parents[2]


def _corpus(root: Path, *names: str, chars: int = 20_000) -> Path:
    for i, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True)
        line = f"user {i} writes about the weather and the sea, day after day.\n"
        (folder / "notes.txt").write_text(line * (chars // len(line) + 1))
    return root


def test_a_corpus_folder_that_is_not_a_user_id_is_refused_before_training(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus", "alice", "Zoë's notes")
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("report.json", "report.md", "events.jsonl", "bytes_per_node.png"):
        (out / stale).write_text("a previous run's")
    t0 = time.perf_counter()
    rc = main(["--preset", "tiny", "--nodes", "3", "--corpus", str(corpus), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Zoë's notes" in err and "user id" in err, err
    assert time.perf_counter() - t0 < 20  # nothing trained
    # the failed run left no report, neither its own nor the previous run's
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize("args,key", [(["--codec", "int4"], "model.expert_codec")])
def test_an_unknown_codec_is_refused_in_one_line(tmp_path, capsys, args, key):
    rc = main(["--preset", "tiny", "--nodes", "3", "--out", str(tmp_path / "out"), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and key in err and "int4" in err, err
    with pytest.raises(ScenarioError, match="model.other_codec: unknown codec 'int4'"):
        from_dict({"model": {"other_codec": "int4"}})


def test_corpus_chars_raise_what_a_corpus_user_trains_on_and_the_report_says_it(tmp_path):
    corpus = _corpus(tmp_path / "corpus", "alice", chars=30_000)
    default = Suite("tiny", 0, corpus_dir=corpus, progress=False)
    raised = Suite("tiny", 0, corpus_dir=corpus, corpus_chars=25_000, progress=False)
    available = default.available_chars("alice", "train")
    assert len(default.text("alice", "train")) == 10_000  # a quarter of tiny's 40,000
    assert len(raised.text("alice", "train")) == 25_000 < available
    assert default.available_chars("programmer-0", "train") is None
    with pytest.raises(ScenarioError, match="federation.corpus_chars"):
        from_dict({"federation": {"corpus_chars": 10}})
    user = {"user": "alice", "node": "node-0000", "own_ppl": 2.0, "base_ppl": 3.0, "own_bpc": 1.0,
            "bpc_floor": None, "train_chars": 25_000, "train_chars_available": available, "scored_chars": 1500}
    md = "\n".join(corpus_text_lines([user, user]))  # one line per user, however many requests
    assert md.count("alice") == 1
    assert f"alice (--corpus): adapter trained on 25,000 of {available:,} characters; 1,500 scored" in md


@pytest.mark.parametrize("content", [None, "{not json"])
def test_the_coordinator_says_in_one_line_that_its_tokenizer_is_missing_or_bad(tmp_path, content):
    tokenizer = tmp_path / "tokenizer.json"
    if content is not None:
        tokenizer.write_text(content)
    env = {**os.environ, "FRACTAL_ADMIN_TOKEN": "a" * 32, "FRACTAL_NODE_TOKEN": "n" * 32, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "coordinator", "--port", "0", "--db", str(tmp_path / "r.db"),
                           "--bundle-dir", str(tmp_path / "b"), "--tokenizer", str(tokenizer)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and str(tokenizer) in proc.stderr, proc.stderr
