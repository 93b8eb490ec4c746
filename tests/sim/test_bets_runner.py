"""Every bet measured end to end on a fake suite of untrained tiny models (seconds, no training), and
the command line. The verdicts here mean nothing; what is checked is that each bet runs, writes
JSON with the required keys, and that its verdict is what its criteria give its written measurements."""

from __future__ import annotations

import dataclasses
import json
import zlib
from types import SimpleNamespace

import pytest
import torch

from model.config import PRESETS
from model.fractal_moe import build_model, is_norm_param
from sim.bets import all_bets
from sim.bets.__main__ import main
from sim.bets.context import BetContext, SuiteContext
from sim.bets.runner import run_bet, write_record, write_summary

REQUIRED = ("bet", "criteria", "measurements", "verdict", "catalogue_verdict", "agrees", "preset", "seed")
# bet 100 (Soup-of-Experts) trains its own bank and has its own tests (issue 9)
OURS = [b for b in all_bets().values() if b.number != 100]


class FakeSuite:
    """What SuiteContext reads from model.pipeline.Suite, with untrained models and random text."""

    def __init__(self, seed: int = 0) -> None:
        tiny = PRESETS["tiny"]
        # 10 specialist steps scale the catalogue's step counts to 1% (Bet 39: 2 steps; Bet 13's QAT: 5)
        self.preset = dataclasses.replace(tiny, specialist=dataclasses.replace(tiny.specialist, steps=10, batch_size=4))
        self.seed = seed
        self.progress = False
        self.personas = ("programmer", "novelist", "scientist")
        self.held_out = "chef"
        self.known_users = ["programmer-0", "novelist-0", "scientist-0"]
        self.unknown_users = ["chef-0"]
        self.sources = {n: SimpleNamespace(persona=n.split("-")[0])
                        for n in (*self.personas, self.held_out, *self.known_users, *self.unknown_users)}
        base = self.new_model().state_dict()
        self._base = base
        self._specs = {p: self._perturb(base, f"spec:{p}", 0.02, lambda k: True) for p in self.personas}
        self._adapters = {u: {k: v for k, v in self._perturb(base, f"ad:{u}", 0.1, is_norm_param).items()
                              if is_norm_param(k)} for u in self.known_users}

    def _gen(self, label: str) -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{label}".encode()))

    def _perturb(self, sd: dict, label: str, scale: float, which) -> dict:
        g = self._gen(label)
        return {k: (v + scale * torch.randn(v.shape, generator=g)) if which(k) else v.clone() for k, v in sd.items()}

    def new_model(self, state=None):
        m = build_model(self.preset.model, self.seed)
        if state is not None:
            m.load_state_dict(state)
        return m.eval()

    def base_state(self):
        return self._base

    def specialist_state(self, persona):
        return self._specs[persona]

    def adapter_state(self, user):
        return self._adapters[user]

    def ids(self, name: str, split: str) -> torch.Tensor:
        n = 200 if split == "eval" else 400
        # each persona favours its own band of the vocabulary, so texts differ
        band = zlib.crc32(self.sources[name].persona.encode()) % 300
        g = self._gen(f"{name}:{split}")
        ids = torch.randint(0, 384, (n,), generator=g)
        own = torch.rand(n, generator=g) < 0.6
        return torch.where(own, band + torch.randint(0, 80, (n,), generator=g), ids)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads spin against each other
    (measured: a tiny forward pass 12x slower in CPU time at a load of 12)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class FastContext(SuiteContext):
    """SuiteContext with samples cut to 12 tokens (repeated to length): 100 greedy steps of an untrained
    model cost seconds and tell nothing here."""

    def sample(self, model, prompt, n, *, greedy=True):
        head = super().sample(model, prompt, min(n, 12), greedy=greedy)
        return head.repeat(-(-n // head.numel()))[:n]


@pytest.fixture(scope="module")
def ctx():
    return FastContext(FakeSuite(seed=0))


def test_suite_context_satisfies_the_protocol(ctx):
    assert isinstance(ctx, BetContext)
    assert ctx.budget(200) == 2  # 10 specialist steps / the catalogue's 1000
    assert ctx.budget(1) == 1


@pytest.mark.parametrize("bet", OURS, ids=lambda b: b.name)
def test_every_bet_runs_end_to_end(bet, ctx, tmp_path):
    rec = run_bet(bet, ctx)
    assert rec.get("error") is None, rec.get("traceback")
    for key in REQUIRED:
        assert key in rec
    assert rec["bet"] == bet.number and rec["preset"] == "tiny" and rec["seed"] == 0
    path = write_record(rec, tmp_path)
    assert path.name == f"{bet.name}.json"
    back = json.loads(path.read_text())
    assert back["verdict"] == bet.verdict(back["measurements"])  # computed, not written by hand
    assert back["agrees"] == bet.catalogue.agrees(back["verdict"])


def test_soup_endpoints_reproduce_the_parents(ctx):
    rec = run_bet(all_bets()[31], ctx)
    sanity = rec["measurements"]["sanity"]
    assert sanity == {"alpha0_bitwise_equals_parent": True, "alpha1_bitwise_equals_parent": True,
                      "endpoint_ppl_equal_parents": True}
    m = rec["measurements"]
    for t in m["eval_texts"]:
        assert m["endpoints_ppl"][t]["1"] == m["parent_ppl"][t]["specialist_1"]
        assert m["endpoints_ppl"][t]["0"] == m["parent_ppl"][t]["specialist_2"]


def test_results_are_deterministic_for_a_seed():
    a = run_bet(all_bets()[39], FastContext(FakeSuite(seed=0)))  # training and sampling included
    b = run_bet(all_bets()[39], FastContext(FakeSuite(seed=0)))
    assert a["measurements"] == b["measurements"]


def test_a_failing_measurement_is_reported_not_hidden(tmp_path):
    class Broken(FastContext):
        def specialist_state(self, persona):
            raise RuntimeError("no specialist here")

    rec = run_bet(all_bets()[31], Broken(FakeSuite()))
    assert rec["verdict"] is None and rec["agrees"] is None
    assert "no specialist here" in rec["error"]
    write_record(rec, tmp_path)
    md = write_summary([rec], tmp_path).read_text()
    assert "| 31_model_soup |" in md and "no specialist here" in md


def test_cli_list_and_bad_input(capsys):
    assert main(["--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {row["bet"] for row in listed} == set(all_bets())
    assert main(["--list", "31", "4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("31_model_soup") and "04_mixture_combiner" in out
    assert main(["99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown bet '99'") and len(err.strip().splitlines()) == 1
    assert main(["--preset", "huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


@pytest.mark.slow
def test_every_bet_on_the_trained_tiny_suite(tiny_suite, tmp_path):
    """The real pipeline at tiny (trained once per session by conftest): every bet runs, its JSON carries
    the required keys, its verdict follows from its measurements, and Bet 31's alpha = 0 / 1 soups are
    its parents, bitwise."""
    ctx = SuiteContext(tiny_suite)
    records = []
    for bet in OURS:
        rec = run_bet(bet, ctx)
        assert rec.get("error") is None, f"{bet.name}: {rec.get('traceback')}"
        back = json.loads(write_record(rec, tmp_path).read_text())
        assert all(key in back for key in REQUIRED)
        assert back["verdict"] == bet.verdict(back["measurements"])
        records.append(back)
    soup = next(r for r in records if r["bet"] == 31)["measurements"]
    assert all(soup["sanity"].values())
    mix = next(r for r in records if r["bet"] == 4)["measurements"]
    assert mix["per_token_bound"]["holds"] and mix["regret_bound"]["holds"]
    summary = write_summary(records, tmp_path).read_text()
    assert all(f"| {r['name']}" in summary for r in records)
