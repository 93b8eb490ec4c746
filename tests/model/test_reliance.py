"""Expert reliance on constructed models: figures that must come out exactly, and ones that must move."""

from __future__ import annotations

import torch

from model.config import get_preset
from model.fractal_moe import build_model, expert_of
from model.reliance import expert_reliance, jensen_shannon_bits, zeroed_experts

IDS = (torch.arange(700) * 7 % 301).long()  # (N,) a fixed token stream inside the tiny vocabulary


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny").model, seed)
    model.eval()
    return model


def test_identical_experts_average_to_the_same_model():
    model = _tiny()
    sd = model.state_dict()
    for k in sd:
        e = expert_of(k)
        if e is not None and e[1] != 0:  # every expert of a block becomes a copy of its expert 0
            sd[k] = sd[k.replace(f".experts.{e[1]}.", ".experts.0.")].clone()
    model.load_state_dict(sd)
    r = expert_reliance(model, {"a": IDS}, drop_one_tokens=128)["texts"]["a"]
    assert abs(r["averaged_ratio"] - 1.0) < 1e-4
    assert abs(r["drop_one"]["max_ratio"] - 1.0) < 1e-3  # a removed copy is replaced by an equal copy...
    assert r["zeroed_ratio"] != 1.0  # ...but zeroing them all still changes the model


def test_zero_experts_are_unaffected_by_zeroing():
    model = _tiny()
    model.load_state_dict(zeroed_experts(model.state_dict()))
    r = expert_reliance(model, {"a": IDS}, drop_one_tokens=128)["texts"]["a"]
    assert r["zeroed_ratio"] == 1.0
    assert r["averaged_ratio"] == 1.0


def test_random_model_depends_on_its_experts_and_reports_every_field():
    model = _tiny(3)
    out = expert_reliance(model, {"a": IDS, "b": IDS.flip(0)}, drop_one_tokens=128)
    r = out["texts"]["a"]
    assert r["zeroed_ratio"] != 1.0 and r["averaged_ratio"] != 1.0
    assert r["drop_one"]["min_ratio"] <= r["drop_one"]["median_ratio"] <= r["drop_one"]["max_ratio"]
    assert len(r["routing_entropy_bits"]) == 4 and all(0 <= h <= 4 for h in r["routing_entropy_bits"])
    assert len(out["usage_divergence"]["jsd_bits"]) == 4


def test_jensen_shannon():
    same = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert abs(jensen_shannon_bits(same)) < 1e-12
    disjoint = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert abs(jensen_shannon_bits(disjoint) - 1.0) < 1e-12  # log2(2) bits: the most two texts can differ
