import dataclasses
import math

import pytest
import torch

from model.config import PRESETS, ConfigError, ModelConfig, get_preset
from model.fractal_moe import build_model, expert_of, is_norm_param


def test_every_preset_keeps_16_experts_and_4_blocks():
    for p in PRESETS.values():
        assert p.model.n_experts == 16 and p.model.n_layers == 4 and p.model.top_k == 1


def test_30m_preset_has_the_catalogue_shape():
    cfg = PRESETS["30m"].model
    m = build_model(cfg, 0)
    assert cfg.d_model == 256
    assert 36e6 <= m.num_params() <= 40e6
    assert 7500 <= cfg.vocab_size <= 8500


def test_invalid_configs_are_refused_with_a_named_error():
    with pytest.raises(ConfigError, match="multiple of n_heads"):
        ModelConfig(vocab_size=512, d_model=30, n_heads=4, d_ff=32, context=32)
    with pytest.raises(ConfigError, match="top-1"):
        ModelConfig(vocab_size=512, d_model=32, n_heads=4, d_ff=32, context=32, top_k=2)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")


def test_forward_shapes_and_loss():
    cfg = PRESETS["tiny"].model
    m = build_model(cfg, 0)
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    out = m(x, x)
    assert out.logits.shape == (3, 20, cfg.vocab_size)
    # an untrained model is close to uniform: loss near log V
    assert abs(out.loss.item() - math.log(cfg.vocab_size)) < 0.5
    assert m.routes().shape == (cfg.n_layers, 3, 20)


def test_same_seed_same_weights_different_seed_different():
    cfg = PRESETS["tiny"].model
    a, b, c = build_model(cfg, 1), build_model(cfg, 1), build_model(cfg, 2)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


def test_every_expert_is_reachable():
    """For each expert of each block there is an input that the router sends to it."""
    cfg = PRESETS["tiny"].model
    m = build_model(cfg, 0)
    for moe in m.moes:
        x = moe.router.weight.detach().clone()  # (E, C): input e aligned with router row e
        x = x / x.norm(dim=1, keepdim=True) * 100
        moe(x[None])
        assert moe.last_route[0].tolist() == list(range(cfg.n_experts))


@pytest.mark.parametrize("gate", ["unit", "prob"])
def test_top1_output_is_the_gated_chosen_expert(gate):
    """The output is the chosen expert's, scaled by 1 (unit gate) or by the router's probability."""
    cfg = dataclasses.replace(PRESETS["tiny"].model, gate=gate)
    m = build_model(cfg, 0)
    moe = m.moes[0]
    x = torch.randn(1, 5, cfg.d_model)
    y, aux = moe(x)
    probs = torch.softmax(x[0] @ moe.router.weight.T, dim=-1)
    for t in range(5):
        e = int(probs[t].argmax())
        scale = probs[t, e] if gate == "prob" else 1.0
        expected = moe.experts[e](x[0, t:t + 1])[0] * scale
        torch.testing.assert_close(y[0, t], expected)
    assert float(aux.detach()) >= 1.0 - 1e-6  # Switch aux loss is minimised (=1) at perfect balance


def test_unit_gate_still_trains_the_router():
    """The unit gate's value is 1, but the task loss still reaches the router (straight-through)."""
    cfg = PRESETS["tiny"].model
    assert cfg.gate == "unit"
    moe = build_model(cfg, 0).moes[0]
    y, _ = moe(torch.randn(1, 7, cfg.d_model))
    y.pow(2).sum().backward()
    assert moe.router.weight.grad is not None and float(moe.router.weight.grad.abs().sum()) > 0


def test_unknown_gate_is_refused():
    with pytest.raises(ConfigError, match="gate"):
        dataclasses.replace(PRESETS["tiny"].model, gate="softmax")


def test_available_mask_substitutes_the_best_installed_expert():
    cfg = PRESETS["tiny"].model
    m = build_model(cfg, 0)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    m(x)
    full = m.routes().clone()
    mask = torch.ones(cfg.n_layers, cfg.n_experts, dtype=torch.bool)
    dropped = int(full[0, 0, 0])
    mask[0, dropped] = False
    with m.serving(available=mask):
        m(x)
    assert dropped not in m.routes()[0].unique().tolist()


def _hooks(m) -> list[tuple]:
    return [(moe.available, moe.forced_route, moe.record_input) for moe in m.moes] + [m.training]


def test_serving_sets_the_hooks_and_restores_them_after_the_block():
    cfg = PRESETS["tiny"].model
    m = build_model(cfg, 0).train()
    before = _hooks(m)
    mask = torch.ones(cfg.n_layers, cfg.n_experts, dtype=torch.bool)
    mask[:, 0] = False
    forced = torch.full((cfg.n_layers, 2 * 8), 3, dtype=torch.long)  # (L, N) for a (2, 8) batch
    with m.serving(available=mask, forced_route=forced, record_input=True) as served:
        assert served is m and not m.training
        assert all(torch.equal(moe.available, mask[b]) for b, moe in enumerate(m.moes))
        m(torch.randint(0, cfg.vocab_size, (2, 8)))
        assert bool((m.routes() == 3).all())  # forced wins over the router
        assert all(moe.last_input is not None and moe.last_input.shape == (2, 8, cfg.d_model) for moe in m.moes)
    assert _hooks(m) == before
    # per-token installed sets: (L, N, E), one row of experts per position
    per_token = mask[:, None].expand(cfg.n_layers, 2 * 8, cfg.n_experts)
    with m.serving(available=per_token):
        m(torch.randint(0, cfg.vocab_size, (2, 8)))
        assert 0 not in m.routes().unique().tolist()
    assert _hooks(m) == before


def test_serving_restores_the_hooks_after_an_exception_and_nests():
    cfg = PRESETS["tiny"].model
    m = build_model(cfg, 0).eval()
    outer = torch.ones(cfg.n_layers, cfg.n_experts, dtype=torch.bool)
    outer[:, 1] = False
    with m.serving(available=outer, record_input=True):
        with pytest.raises(RuntimeError, match="boom"), \
                m.serving(forced_route=torch.zeros(cfg.n_layers, 4, dtype=torch.long)):
            raise RuntimeError("boom")
        # the outer block's state is back, not the defaults
        assert all(torch.equal(moe.available, outer[b]) and moe.forced_route is None and moe.record_input
                   for b, moe in enumerate(m.moes))
    assert all(h == (None, None, False) for h in _hooks(m)[:-1]) and not m.training
    with pytest.raises(ValueError, match="one row per block"), m.serving(available=outer[0]):
        pass
    assert all(h == (None, None, False) for h in _hooks(m)[:-1])


def test_parameter_name_contract():
    m = build_model(PRESETS["tiny"].model, 0)
    names = list(m.state_dict())
    experts = {expert_of(n) for n in names if expert_of(n)}
    assert experts == {(b, e) for b in range(4) for e in range(16)}
    norms = [n for n in names if is_norm_param(n)]
    assert len(norms) == 4 * 4 + 2  # ln1/ln2 weight+bias per block, ln_f weight+bias
    assert expert_of("blocks.3.moe.experts.15.fc2.weight") == (3, 15)
    assert expert_of("blocks.3.moe.router.weight") is None
