import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import PRESETS, ConfigError
from model.evaluate import token_logps
from model.fractal_moe import build_model
from model.soe_train import MixtureSampler, sample_domain_weights, suite_soup, train_soup
from model.soup_of_experts import (
    SoupConfig,
    SoupError,
    SoupOfExperts,
    bytes_comparison,
    estimate_domain_weights,
    one_hot,
    unigram_log_tables,
)

TINY = PRESETS["tiny"].model
DOMAINS = ("a", "b", "c")


def _soup(rank=0, n=4, seed=0):
    cfg = SoupConfig(bank_size=n, rank=rank, steps=1, seq_len=32, lr=1e-3, mlp_hidden=5)
    return SoupOfExperts(TINY, cfg, DOMAINS, seed=seed)


def _randomise_bank(soup, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in (soup.bank, soup.bank_u, soup.bank_v):
            for p in d.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_one_hot_alpha_reproduces_shared_plus_one_dense_entry_exactly():
    soup = _soup()
    _randomise_bank(soup)
    base = build_model(TINY, 0).state_dict()  # S defaults to a fresh model of the same seed
    for j in range(soup.cfg.bank_size):
        alpha = torch.zeros(soup.cfg.bank_size)
        alpha[j] = 1.0
        theta = soup.instantiate_alpha(alpha)
        for name in soup.names:
            expected = base[name] + soup.bank[name.replace(".", "/")][j]
            assert torch.equal(theta[name], expected), name


def test_one_hot_alpha_on_a_low_rank_bank_gives_shared_plus_u_v_transpose():
    soup = _soup(rank=3)
    _randomise_bank(soup)
    alpha = torch.tensor([0.0, 0.0, 1.0, 0.0])
    theta = soup.instantiate_alpha(alpha)
    s = soup.shared_state()
    n_low_rank = 0
    for name in soup.names:
        k = name.replace(".", "/")
        if k in soup.bank_u:
            n_low_rank += 1
            u, v = soup.bank_u[k][2], soup.bank_v[k][2]
            assert u.shape[1] == 3 and v.shape[1] == 3
            expected = s[name] + u @ v.T
            torch.testing.assert_close(theta[name], expected, rtol=0, atol=1e-6)
        else:
            assert s[name].dim() == 1  # only vectors keep dense entries
            assert torch.equal(theta[name], s[name] + soup.bank[k][2])
    assert n_low_rank > 0


def test_a_linear_combination_is_the_weighted_sum_of_entries():
    soup = _soup()
    _randomise_bank(soup)
    alpha = torch.tensor([0.5, -1.0, 0.25, 2.0])
    theta = soup.instantiate_alpha(alpha)
    s = soup.shared_state()
    entries = [soup.entry(j) for j in range(4)]
    for name in soup.names:
        expected = s[name] + sum(float(a) * e[name] for a, e in zip(alpha, entries))
        torch.testing.assert_close(theta[name], expected, rtol=1e-6, atol=1e-7)


def test_mlp_maps_domain_weights_to_the_expected_alpha():
    soup = _soup(n=2)
    w1 = [[0.1 * (i + 1) * (-1) ** j for j in range(3)] for i in range(5)]  # (H, D)
    b1 = [0.05 * i - 0.1 for i in range(5)]
    w2 = [[0.3, -0.2, 0.1, 0.4, -0.5], [-0.1, 0.2, 0.6, -0.3, 0.05]]  # (n, H)
    b2 = [0.01, -0.02]
    with torch.no_grad():
        soup.mlp[0].weight.copy_(torch.tensor(w1))
        soup.mlp[0].bias.copy_(torch.tensor(b1))
        soup.mlp[2].weight.copy_(torch.tensor(w2))
        soup.mlp[2].bias.copy_(torch.tensor(b2))
    h = [0.2, 0.5, 0.3]

    def gelu(x):
        return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))

    hidden = [gelu(sum(w1[i][d] * h[d] for d in range(3)) + b1[i]) for i in range(5)]
    expected = [sum(w2[j][i] * hidden[i] for i in range(5)) + b2[j] for j in range(2)]
    got = soup.alpha(torch.tensor(h))
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_a_fresh_bank_instantiates_the_shared_parameters_for_every_h():
    soup = _soup(rank=2)
    s = soup.shared_state()
    for h in ([1.0, 0.0, 0.0], [0.2, 0.3, 0.5]):
        theta = soup.instantiate(torch.tensor(h))
        assert all(torch.equal(theta[k], s[k]) for k in s)


def test_instantiated_state_loads_into_fractal_moe_and_matches_the_functional_forward():
    soup = _soup()
    _randomise_bank(soup)
    h = torch.tensor([0.6, 0.0, 0.4])
    model = soup.model_for(h)
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, soup(h, x).logits)


def test_bad_domain_weights_and_configs_raise_named_errors():
    soup = _soup()
    with pytest.raises(SoupError, match="shape"):
        soup.alpha(torch.tensor([0.5, 0.5]))
    with pytest.raises(SoupError, match="sum to 1"):
        soup.alpha(torch.tensor([0.5, 0.6, -0.1]))
    with pytest.raises(SoupError, match="sum to 1"):
        soup.alpha(torch.tensor([0.5, 0.51, 0.0]))
    # weights rounded to 4 decimals for transport are accepted and renormalised
    rounded = soup.check_h(torch.tensor([0.3333, 0.3333, 0.3333]))
    assert float(rounded.sum()) == pytest.approx(1.0, abs=1e-7) and float(rounded[0]) == pytest.approx(1 / 3)
    with pytest.raises(SoupError, match="alpha must have shape"):
        soup.instantiate_alpha(torch.zeros(3))
    with pytest.raises(ConfigError, match="bank_size"):
        SoupConfig(bank_size=0, steps=1, seq_len=8, lr=1e-3)
    with pytest.raises(ConfigError, match="lr"):
        SoupConfig(steps=1, seq_len=8, lr=0.0)
    with pytest.raises(ConfigError, match="support"):
        sample_domain_weights(3, 4, 1.0, torch.Generator())


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 8), data=st.data(), conc=st.floats(0.05, 10.0), seed=st.integers(0, 2**31))
def test_meta_distribution_draws_have_exactly_support_domains_and_sum_to_one(d, data, conc, seed):
    s = data.draw(st.integers(1, d))
    h = sample_domain_weights(d, s, conc, torch.Generator().manual_seed(seed))
    assert h.shape == (d,)
    assert (h >= 0).all() and abs(float(h.sum()) - 1.0) < 1e-5
    assert int((h > 0).sum()) <= s  # a Dirichlet weight can underflow to 0 at tiny concentrations
    assert int((h > 0).sum()) >= 1
    again = sample_domain_weights(d, s, conc, torch.Generator().manual_seed(seed))
    assert torch.equal(h, again)


def test_meta_distribution_picks_every_domain_uniformly():
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(4)
    for _ in range(2000):
        hits += (sample_domain_weights(4, 2, 1.0, g) > 0).float()
    # each domain is in the support with probability 2/4
    assert torch.allclose(hits / 2000, torch.full((4,), 0.5), atol=0.04)


def _streams():
    # three domains with disjoint token ranges: a sequence's domain is visible in its ids
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50, (3000,), generator=g) + 50 * i for i in range(3)]


def test_mixture_sampler_draws_each_sequence_from_a_domain_of_h():
    sampler = MixtureSampler(_streams(), batch_size=400, seq_len=8, seed=0)
    x, y = sampler(torch.tensor([0.0, 1.0, 0.0]))
    assert x.shape == (400, 8) and ((x >= 50) & (x < 100)).all() and torch.equal(x[:, 1:], y[:, :-1])
    x, _ = sampler(torch.tensor([0.25, 0.0, 0.75]))
    dom = x[:, 0] // 50
    assert set(dom.tolist()) <= {0, 2}
    assert abs(float((dom == 2).float().mean()) - 0.75) < 0.08


def test_domain_weight_estimate_recovers_pure_and_mixed_sources():
    streams = _streams()
    tables = unigram_log_tables(streams, 150)
    h = estimate_domain_weights(streams[2][:200], tables)
    assert float(h[2]) > 0.99
    # overlapping domains: a 30/70 mixture of two unigram sources is recovered from 4000 tokens
    g = torch.Generator().manual_seed(1)
    pa = torch.softmax(torch.randn(40, generator=g), 0)
    pb = torch.softmax(torch.randn(40, generator=g), 0)
    ta = torch.multinomial(pa, 20000, replacement=True, generator=g)
    tb = torch.multinomial(pb, 20000, replacement=True, generator=g)
    tables = unigram_log_tables([ta, tb], 40)
    which = torch.rand(4000, generator=g) < 0.3
    mix = torch.where(which, ta[:4000], tb[20000 - 4000:])
    h = estimate_domain_weights(mix, tables)
    assert abs(float(h[0]) - 0.3) < 0.06


def test_bytes_of_a_dense_bank_are_n_plus_one_models_plus_the_mlp():
    soup = _soup(n=4)
    n_model = build_model(TINY, 0).num_params()
    n_mlp = (3 * 5 + 5) + (5 * 4 + 4)  # Linear(D=3, H=5) then Linear(5, n=4)
    b = bytes_comparison(soup, ks=(1, 3, 10))
    assert b["specialist"] == 2 * n_model
    assert b["bank"]["total"] == 2 * (5 * n_model + n_mlp)
    assert b["specialists"]["10"] == 20 * n_model
    assert b["break_even_k"] == 6  # 6 specialists cost more than S + 4 entries + a small MLP
    low = bytes_comparison(_soup(rank=2, n=4))
    assert low["bank"]["entries"] < b["bank"]["entries"] / 4


# ---- on the tiny suite's real personas ------------------------------------------------------------

def test_estimate_from_a_few_hundred_tokens_of_a_persona_puts_most_weight_on_it(tiny_suite):
    tables = unigram_log_tables([tiny_suite.ids(p, "train") for p in tiny_suite.personas],
                                tiny_suite.preset.model.vocab_size)
    for i, p in enumerate(tiny_suite.personas):
        h = estimate_domain_weights(tiny_suite.ids(p, "eval")[:300], tables)
        assert int(h.argmax()) == i and float(h[i]) > 0.5, (p, h.tolist())


@pytest.mark.slow
def test_training_the_bank_at_tiny_lowers_held_out_loss_of_the_instantiated_specialist(tiny_suite):
    cfg = SoupConfig(bank_size=3, support=1, steps=40, seq_len=64, lr=3e-3, seed=0)
    soup = SoupOfExperts(tiny_suite.preset.model, cfg, tiny_suite.personas, shared=tiny_suite.base_state())
    persona = tiny_suite.personas[0]
    h = one_hot(tiny_suite.personas, persona)
    ids = tiny_suite.ids(persona, "eval")
    before = -float(token_logps(soup.model_for(h), ids).mean())
    assert before == pytest.approx(-float(token_logps(tiny_suite.base(), ids).mean()), abs=1e-9)
    losses = train_soup(soup, [tiny_suite.ids(p, "train") for p in tiny_suite.personas])
    assert len(losses) == 40
    after = -float(token_logps(soup.model_for(h), ids).mean())
    assert after < before - 0.01, (before, after)


def test_trained_bank_is_cached_and_reloaded(tiny_suite):
    from model.pipeline import Suite

    cfg = SoupConfig(bank_size=2, support=1, steps=3, seq_len=32, lr=1e-3, seed=5)
    key = f"soup:{cfg.kind}:n{cfg.bank_size}:s{cfg.support}"
    first = suite_soup(tiny_suite, cfg)
    timing = dict(tiny_suite.timings[key])
    # the same suite hands back the same bank, and keeps the timing of the call that made it
    assert suite_soup(tiny_suite, cfg) is first and tiny_suite.timings[key] == timing
    # a fresh suite (another process, say) loads it from the cache
    fresh = Suite("tiny", seed=0, progress=False)
    second = suite_soup(fresh, cfg)
    assert fresh.timings[key]["cached"] is True
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="support"):
        suite_soup(tiny_suite, SoupConfig(support=99, steps=1, seq_len=32, lr=1e-3))


def test_bank_and_mlp_take_their_scaled_learning_rates():
    cfg = SoupConfig(bank_size=2, steps=1, seq_len=16, lr=1e-3, warmup=0, weight_decay=0.0, grad_clip=0.0,
                     bank_lr_scale=3.0, mlp_lr_scale=10.0)
    soup = SoupOfExperts(TINY, cfg, DOMAINS, seed=0)
    _randomise_bank(soup)  # a zero bank gives the MLP no gradient on the first step
    before = {k: v.detach().clone() for k, v in soup.state_dict().items()}
    train_soup(soup, _streams())
    moved = {part: max(float((v - before[k]).abs().max()) for k, v in soup.state_dict().items()
                       if k.startswith(part + ".")) for part in ("shared", "bank", "mlp")}
    # Adam's first step moves every weight with a gradient by lr (times its group's scale)
    assert moved["shared"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["bank"] == pytest.approx(3e-3, rel=1e-3)
    assert moved["mlp"] == pytest.approx(1e-2, rel=1e-3)


@pytest.mark.parametrize("rank", [0, 2])
def test_bank_bytes_through_the_fp16_codec_match_the_plain_fp16_count(rank):
    pytest.importorskip("model.codecs")
    soup = _soup(rank=rank)
    _randomise_bank(soup)
    b = bytes_comparison(soup, expert_codec="fp16")
    assert b["codec"]["specialist"] == b["specialist"]
    assert b["codec"]["bank_total"] == b["bank"]["total"]
    ternary = bytes_comparison(soup, expert_codec="ternary")["codec"]
    assert ternary["specialist"] < b["specialist"] and ternary["bank_total"] < b["bank"]["total"]
