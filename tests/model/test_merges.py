"""Weight-space merges, checked on hand-made tensors and on the tiny FractalMoE's state dict."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import merges as G
from model.config import PRESETS
from model.fractal_moe import build_model, expert_of
from model.merges import MergeError


def sd(**tensors) -> dict[str, torch.Tensor]:
    """A state dict from keyword tensors (names with dots are spelled with double underscores)."""
    return {k.replace("__", "."): torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float32 tensor (tells -0.0 from 0.0 and compares NaNs)."""
    return t.contiguous().view(torch.int32)


@pytest.fixture(scope="module")
def tiny_states():
    cfg = PRESETS["tiny"].model
    return [build_model(cfg, seed).state_dict() for seed in (0, 1, 2)]


# ---- soups ------------------------------------------------------------------------------------------

def test_soup_endpoints_reproduce_the_parents_bitwise(tiny_states):
    a, b = tiny_states[0], tiny_states[1]
    a = {**a, "edge": torch.tensor([-0.0, math.inf, -math.inf, 1e-45, 3.0])}
    b = {**b, "edge": torch.tensor([0.0, 1.0, -1.0, 2.0, math.nan])}
    for alpha, parent in ((1.0, a), (0.0, b)):
        soup = G.linear_soup(a, b, alpha=alpha)
        assert list(soup) == list(parent)
        for k in parent:
            assert torch.equal(bits(soup[k]), bits(parent[k])), k
            assert soup[k].data_ptr() != parent[k].data_ptr()  # a copy, not the parent itself


def test_linear_soup_interpolates(tiny_states):
    a, b = tiny_states[0], tiny_states[1]
    soup = G.linear_soup(a, b, alpha=0.3)
    for k in a:
        expect = 0.3 * a[k].double() + 0.7 * b[k].double()
        assert torch.allclose(soup[k].double(), expect, atol=1e-6), k
        assert soup[k].dtype == a[k].dtype


def test_weighted_and_uniform_soups():
    x, y, z = sd(w=[1.0, 2.0]), sd(w=[3.0, 6.0]), sd(w=[5.0, -2.0])
    assert torch.equal(G.uniform_soup([x, y, z])["w"], torch.tensor([3.0, 2.0]))
    got = G.weighted_soup([x, y, z], weights=[2.0, 1.0, 1.0])  # normalised to (1/2, 1/4, 1/4)
    assert torch.allclose(got["w"], torch.tensor([2.5, 2.0]))
    got = G.weighted_soup([x, y], weights=[2.0, 1.0], normalize=False)
    assert torch.equal(got["w"], torch.tensor([5.0, 10.0]))
    got = G.weighted_soup([x, y, z], weights=[0.0, 1.0, 0.0])  # one-hot: that input exactly
    assert torch.equal(got["w"], y["w"])


def test_wise_ft_endpoints_and_midpoint():
    base, ft = sd(w=[0.0, -0.0, 4.0]), sd(w=[2.0, 2.0, 0.0])
    assert torch.equal(bits(G.wise_ft(base, ft, alpha=0.0)["w"]), bits(base["w"]))
    assert torch.equal(bits(G.wise_ft(base, ft, alpha=1.0)["w"]), bits(ft["w"]))
    assert torch.equal(G.wise_ft(base, ft, alpha=0.25)["w"], torch.tensor([0.5, 0.5, 3.0]))


def test_greedy_soup_keeps_only_what_helps():
    cands = [sd(w=[0.0]), sd(w=[2.0]), sd(w=[10.0])]
    calls = []

    def loss(state):  # distance to 1.0: solo scores 1, 1, 9
        calls.append(float(state["w"]))
        return abs(float(state["w"]) - 1.0)

    out = G.greedy_soup(cands, evaluate=loss)
    # best-first (ties by index): 0, then 1 (mean 1.0, loss 0: kept), then 2 (mean 4.0, loss 3: dropped)
    assert out.ingredients == (0, 1)
    assert out.score == 0.0 and torch.equal(out.state["w"], torch.tensor([1.0]))
    assert out.solo_scores == (1.0, 1.0, 9.0)
    assert calls == [0.0, 2.0, 10.0, 1.0, 4.0]
    up = G.greedy_soup(cands, evaluate=lambda s: float(s["w"]), maximize=True)
    # maximising w: 10 first; mean(10, 2) = 6 < 10 dropped; mean(10, 0) = 5 dropped
    assert up.ingredients == (2,) and up.score == 10.0
    with pytest.raises(MergeError, match="finite"):
        G.greedy_soup(cands, evaluate=lambda s: math.nan)


# ---- task vectors, TIES, DARE --------------------------------------------------------------------------

def test_task_arithmetic_by_hand():
    base, ft1, ft2 = sd(w=[1.0, 1.0]), sd(w=[2.0, 1.0]), sd(w=[1.0, 3.0])
    got = G.task_arithmetic(base, [ft1, ft2], lambdas=[1.0, 0.5])
    assert torch.equal(got["w"], torch.tensor([2.0, 2.0]))
    assert torch.equal(G.task_arithmetic(base, [ft1, ft2])["w"], torch.tensor([2.0, 3.0]))
    assert torch.equal(bits(G.task_arithmetic(base, [ft1], lambdas=0.0)["w"]), bits(base["w"]))
    assert torch.equal(G.task_vector(base, ft2)["w"], torch.tensor([0.0, 2.0]))


def test_ties_trim_elect_disjoint_mean_by_hand():
    base = sd(w=[1.0, 1.0, 1.0, 1.0])
    deltas = [[1.0, -2.0, 0.1, 3.0], [-0.5, -1.0, 0.2, -4.0], [2.0, 0.1, -0.4, 1.5]]
    fts = [sd(w=[1.0 + d for d in ds]) for ds in deltas]
    # density 0.5 keeps 2 of 4 per model: [0,-2,0,3], [0,-1,0,-4], [2,0,0,1.5]
    # elected signs of the sums [2,-3,0,0.5]: +,-,0,+; agreeing means: 2, -1.5, 0, (3+1.5)/2
    got = G.ties_merge(base, fts, density=0.5)
    assert torch.allclose(got["w"], torch.tensor([3.0, -0.5, 1.0, 3.25]))
    got = G.ties_merge(base, fts, density=0.5, scale=2.0)
    assert torch.allclose(got["w"], torch.tensor([5.0, -2.0, 1.0, 5.5]))
    # density 1 keeps everything: sums [2.5, -2.9, -0.1, 0.5]; agreeing means 1.5, -1.5, -0.4, 2.25
    full = G.ties_merge(base, fts, density=1.0)
    assert torch.allclose(full["w"], torch.tensor([2.5, -0.5, 0.6, 3.25]))


def test_dare_drops_rescales_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(20_000, generator=g)}
    delta = torch.randn(20_000, generator=g)
    ft = {"w": base["w"] + delta}
    out = G.dare_merge(base, [ft], drop_p=0.9, seed=7)
    got = out["w"] - base["w"]
    kept = got.abs() > 1e-6
    assert 0.09 < kept.float().mean() < 0.11  # ~10% survive
    assert torch.allclose(got[kept], delta[kept] / 0.1, rtol=1e-4, atol=1e-4)  # rescaled by 1/(1-p)
    assert torch.equal(G.dare_merge(base, [ft], drop_p=0.9, seed=7)["w"], out["w"])
    assert not torch.equal(G.dare_merge(base, [ft], drop_p=0.9, seed=8)["w"], out["w"])
    # p = 0 is task arithmetic; the rescaling keeps the expected delta
    assert torch.allclose(G.dare_merge(base, [ft], drop_p=0.0, seed=1)["w"], ft["w"], atol=1e-6)
    mean = torch.stack([G.dare_merge(base, [ft], drop_p=0.5, seed=s)["w"] for s in range(200)]).mean(0)
    assert (mean - ft["w"]).abs().mean() < 0.12 * delta.abs().mean()


# ---- experts and adapters ------------------------------------------------------------------------------

def test_average_experts_makes_every_expert_the_block_mean(tiny_states, tmp_path):
    state = tiny_states[0]
    out = G.average_experts(state)
    assert list(out) == list(state)
    n_layers, n_experts = PRESETS["tiny"].model.n_layers, PRESETS["tiny"].model.n_experts
    for b in range(n_layers):
        for part in ("fc1.weight", "fc2.weight"):
            names = [f"blocks.{b}.moe.experts.{e}.{part}" for e in range(n_experts)]
            mean = sum(state[n].double() for n in names) / n_experts
            for n in names:
                assert out[n].shape == state[n].shape
                assert torch.allclose(out[n].double(), mean, atol=1e-7)
                assert torch.equal(out[n], out[names[0]])  # 16 identical copies
    for k in state:
        if expert_of(k) is None:
            assert torch.equal(bits(out[k]), bits(state[k])), k  # untouched
    assert G.expert_spread(state)[0] > 0.5 and max(G.expert_spread(out)) < 1e-12
    assert len(G.expert_spread(state)) == n_layers
    save_file(out, str(tmp_path / "avg.safetensors"))  # no shared storage between the copies
    assert torch.equal(load_file(str(tmp_path / "avg.safetensors"))[names[3]], out[names[3]])
    # and the model still loads them
    m = build_model(PRESETS["tiny"].model, 0)
    m.load_state_dict(out)


def test_average_experts_refuses_a_state_without_experts():
    with pytest.raises(MergeError, match="no expert"):
        G.average_experts(sd(w=[1.0]))
    bad = {"blocks.0.moe.experts.0.fc1.weight": torch.ones(2), "blocks.0.moe.experts.2.fc1.weight": torch.ones(2)}
    with pytest.raises(MergeError, match="numbered"):
        G.average_experts(bad)


def test_average_adapters():
    a = sd(blocks__0__ln1__weight=[1.0, 2.0], ln_f__bias=[0.0, 0.0])
    b = sd(blocks__0__ln1__weight=[3.0, 2.0], ln_f__bias=[1.0, -1.0])
    got = G.average_adapters([a, b])
    assert torch.equal(got["blocks.0.ln1.weight"], torch.tensor([2.0, 2.0]))
    assert torch.equal(got["ln_f.bias"], torch.tensor([0.5, -0.5]))
    got = G.average_adapters([a, b], weights=[3.0, 1.0])
    assert torch.equal(got["ln_f.bias"], torch.tensor([0.25, -0.25]))
    with pytest.raises(MergeError, match="non-adapter"):
        G.average_adapters([{**a, "lm_head.weight": torch.ones(2)}, {**b, "lm_head.weight": torch.ones(2)}])


# ---- loss barrier ---------------------------------------------------------------------------------------

def test_loss_barrier():
    assert G.loss_barrier([1.0, 3.0, 1.0]) == pytest.approx(2.0)
    assert G.loss_barrier([1.0, 1.5, 2.0]) == pytest.approx(0.0)  # on the straight line
    assert G.loss_barrier([2.0, 0.0, 2.0]) == 0.0  # below the line: no barrier (endpoints give 0)
    assert G.loss_barrier([0.0, 2.0, 4.0], alphas=[0.0, 0.25, 1.0]) == pytest.approx(1.0)
    with pytest.raises(MergeError, match="rise strictly"):
        G.loss_barrier([0.0, 1.0, 2.0], alphas=[0.0, 0.6, 0.5])
    with pytest.raises(MergeError, match="both endpoints"):
        G.loss_barrier([1.0])


# ---- bad input -----------------------------------------------------------------------------------------

def test_mismatched_inputs_raise_merge_error():
    a = sd(w=[1.0, 2.0], v=[0.0])
    with pytest.raises(MergeError, match="different keys"):
        G.linear_soup(a, sd(w=[1.0, 2.0]), alpha=0.5)
    with pytest.raises(MergeError, match="shape"):
        G.linear_soup(a, sd(w=[1.0, 2.0, 3.0], v=[0.0]), alpha=0.5)
    with pytest.raises(MergeError, match="dtype"):
        G.linear_soup(a, {"w": torch.ones(2, dtype=torch.float64), "v": torch.zeros(1)}, alpha=0.5)
    with pytest.raises(MergeError, match="not a tensor"):
        G.linear_soup(a, {"w": [1.0, 2.0], "v": torch.zeros(1)}, alpha=0.5)
    with pytest.raises(MergeError, match="finite"):
        G.linear_soup(a, a, alpha=math.nan)
    with pytest.raises(MergeError, match="non-empty"):
        G.uniform_soup([])
    with pytest.raises(MergeError, match="sequence of state dicts"):
        G.task_arithmetic(a, a)
    with pytest.raises(MergeError, match="2 values for 1"):
        G.task_arithmetic(a, [a], lambdas=[1.0, 2.0])
    with pytest.raises(MergeError, match="density"):
        G.ties_merge(a, [a], density=0.0)
    with pytest.raises(MergeError, match="drop_p"):
        G.dare_merge(a, [a], drop_p=1.0, seed=0)
    with pytest.raises(MergeError, match="differs"):
        G.uniform_soup([{"n": torch.tensor([1])}, {"n": torch.tensor([2])}])
    assert torch.equal(G.uniform_soup([{"n": torch.tensor([1])}, {"n": torch.tensor([1])}])["n"], torch.tensor([1]))
