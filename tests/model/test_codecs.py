"""Codecs: round trips within each codec's stated bound, packing density, entropy coding, QAT.

Expected values come from independent numpy references and from first principles (bounds, floors),
never from the code under test.
"""

from __future__ import annotations

import copy
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.codec_throughput import codec_throughput
from model.codecs import (
    CODECS,
    FINITE_CODECS,
    CodecError,
    EncodedTensor,
    codec_sizes,
    decode_state_dict,
    decode_tensor,
    encode_state_dict,
    encode_tensor,
    fake_quantise,
)
from model.config import PRESETS
from model.entropy_coding import EntropyCodingError, decode_symbols, empirical_entropy_bits, encode_symbols
from model.fractal_moe import build_model, expert_of
from model.qat import ternary_qat
from proto.bundle import encode_bundle

LOG2_3 = math.log2(3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small ops on a shared 2-core machine run far faster without OpenMP's spinning second thread
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_tensor(shape: tuple[int, ...], seed: int, scale: float, heavy: bool = False) -> torch.Tensor:
    """Fresh random weights (never zeros): Gaussian, or Student-t for heavy tails."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if heavy:
        w = w / torch.sqrt(torch.distributions.Chi2(3.0).sample(shape) / 3.0).clamp_min(0.05)
    w = w * scale
    w[w == 0] = scale  # "never zeros"
    return w


shapes = st.one_of(
    st.tuples(st.integers(1, 300)),
    st.tuples(st.integers(1, 40), st.integers(1, 70)),
    st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 7)),
)
scales = st.sampled_from([1e-5, 1e-3, 0.02, 1.0, 300.0])


def as_matrix(w: torch.Tensor) -> np.ndarray:
    rows = w.shape[0] if w.dim() >= 2 else 1
    return w.double().numpy().reshape(rows, -1)


def round_trip(w: torch.Tensor, codec: str) -> torch.Tensor:
    e = encode_tensor("t", w, codec)
    d = decode_tensor(e)
    assert d.dtype == torch.float32 and d.shape == w.shape
    return d


def ternary_reference(w: np.ndarray, keep: np.ndarray) -> tuple[float, np.ndarray]:
    """numpy absmean rule over one matrix: (scale, trits)."""
    s = float(np.abs(w[keep]).mean())
    t = np.clip(np.round(w / s), -1, 1)
    t[~keep] = 0
    return s, t


def keep_reference(w: np.ndarray) -> np.ndarray:
    """50 % magnitude pruning: the floor(n/2) smallest |w| go, ties by position."""
    flat = np.abs(w).reshape(-1)
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[: flat.size // 2]] = False
    return keep.reshape(w.shape)


# ----------------------------------------------------------------------------- round trips

@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31), scale=scales)
def test_fp32_is_exact_and_fp16_within_half_an_ulp(shape, seed, scale):
    w = random_tensor(shape, seed, scale)
    assert torch.equal(round_trip(w, "fp32"), w)
    d = round_trip(w, "fp16").double()
    assert bool(((d - w.double()).abs() <= 2.0**-11 * w.double().abs() + 2.0**-25).all())
    exact = w.half().float()  # fp16-representable input: lossless
    assert torch.equal(round_trip(exact, "fp16"), exact)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31), scale=scales)
def test_int8_within_half_a_step_of_the_row_absmax_scale(shape, seed, scale):
    w = random_tensor(shape, seed, scale)
    m = as_matrix(w)
    step = np.abs(m).max(axis=1, keepdims=True) / 127.0  # (R, 1)
    d = as_matrix(round_trip(w, "int8"))
    assert (np.abs(d - m) <= step / 2 * (1 + 1e-5)).all()
    # 255 levels per row at most, and the row's extreme is reproduced to float precision
    assert np.allclose(np.abs(d).max(axis=1), np.abs(m).max(axis=1), rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31), scale=scales)
def test_int8_decodes_to_each_stored_value_times_its_row_scale_rounded_once(shape, seed, scale):
    """Read the payload by its documented layout (R float32 scales, then R x K int8 values) and
    multiply in float32 here: the decoder must give exactly that, bit for bit."""
    w = random_tensor(shape, seed, scale)
    e = encode_tensor("t", w, "int8")
    rows = w.shape[0] if w.dim() >= 2 else 1
    s = np.frombuffer(e.payload, dtype=np.float32, count=rows)
    q = np.frombuffer(e.payload, dtype=np.int8, offset=4 * rows).reshape(rows, -1)
    want = q.astype(np.float32) * s[:, None]  # float32 * float32: one rounding
    assert np.array_equal(decode_tensor(e).numpy().reshape(rows, -1), want)


def check_ternary(w: torch.Tensor, d: torch.Tensor, prune: bool) -> None:
    m, dm = as_matrix(w), as_matrix(d)
    keep = keep_reference(m) if prune else np.ones_like(m, dtype=bool)
    s, t = ternary_reference(m, keep)
    nz = np.abs(dm[dm != 0])
    assert nz.size and np.allclose(nz, s, rtol=1e-6), "every nonzero weight decodes to +-s, s = absmean"
    borderline = np.abs(np.abs(m / s) - 0.5) < 1e-5  # float rounding may tip these either way
    agree = np.round(dm / s) == t
    assert (agree | borderline).all()
    assert (dm[~keep] == 0).all()


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31), scale=scales, heavy=st.booleans())
def test_ternary_follows_the_absmean_rule(shape, seed, scale, heavy):
    w = random_tensor(shape, seed, scale, heavy)
    d = round_trip(w, "ternary")
    check_ternary(w, d, prune=False)
    assert torch.equal(round_trip(w, "ternary-ec"), d), "entropy coding is lossless on the trits"


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31), scale=scales)
def test_prune50_zeroes_the_smaller_half_and_keeps_the_rest(shape, seed, scale):
    w = random_tensor(shape, seed, scale)
    m = as_matrix(w)
    keep = keep_reference(m)
    n = m.size
    d = as_matrix(round_trip(w, "prune50"))
    assert (d[~keep] == 0).all() and int(keep.sum()) == n - n // 2
    assert (np.abs(d[keep] - m[keep]) <= 2.0**-11 * np.abs(m[keep]) + 2.0**-25).all()
    if n > 1:
        assert np.abs(m[~keep]).max(initial=0) <= np.abs(m[keep]).min()

    d8 = as_matrix(round_trip(w, "prune50+int8"))
    step = np.where(keep, np.abs(m), 0).max(axis=1, keepdims=True) / 127.0
    assert (d8[~keep] == 0).all()
    assert (np.abs(d8 - np.where(keep, m, 0)) <= step / 2 * (1 + 1e-5)).all()

    dt = round_trip(w, "prune50+ternary")
    check_ternary(w, dt, prune=True)
    assert torch.equal(round_trip(w, "prune50+ternary-ec"), dt)


@pytest.mark.parametrize("codec", CODECS)
def test_decode_equals_the_fake_quantiser_that_qat_trains_with(codec):
    w = random_tensor((48, 40), 3, 0.05, heavy=True)
    assert torch.equal(round_trip(w, codec), fake_quantise(w, codec))


# ----------------------------------------------------------------------------- density

@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256)])
def test_ternary_packs_a_30m_expert_matrix_in_at_most_1_61_bits_all_in(shape):
    name = "blocks.3.moe.experts.15.fc1.weight"
    w = random_tensor(shape, 11, 0.02)
    e = encode_tensor(name, w, "ternary")
    n = w.numel()
    assert 8 * len(e.payload) / n <= 1.6 + 64 / n  # 5 trits per byte + one fp32 scale
    bundle = encode_bundle([e])  # header, manifest with sha256, payload: everything a node receives
    assert 8 * len(bundle) / n <= 1.61
    assert 8 * len(bundle) / n < 1.6875  # llama.cpp's TQ1_0


@pytest.mark.parametrize("codec,heavy", [("ternary-ec", False), ("ternary-ec", True),
                                         ("prune50+ternary-ec", False), ("prune50+ternary-ec", True)])
def test_entropy_coded_trits_within_3_percent_of_their_empirical_entropy(codec, heavy):
    w = random_tensor((256, 1024), 5, 0.02, heavy)
    e = encode_tensor("x", w, codec)
    d = decode_tensor(e).numpy().reshape(-1)
    s = np.abs(d[d != 0]).max()
    trits = np.round(d / s).astype(np.int64) + 1  # (n,) in {0, 1, 2}
    counts = np.bincount(trits, minlength=3)
    p = counts / counts.sum()
    h = -sum(pi * math.log2(pi) for pi in p if pi > 0)
    p0 = p[1]
    assert h <= (-(p0 * math.log2(p0) + (1 - p0) * math.log2(1 - p0)) + (1 - p0)) + 1e-9  # h(p0) + (1 - p0)
    bits = 8 * len(e.payload)  # scale and counts included
    assert bits <= 1.03 * h * trits.size
    if codec.startswith("prune50"):
        assert bits / trits.size < LOG2_3 - 0.05  # >= 50 % zeros: well below the uniform floor


@pytest.mark.parametrize("probs", [(0.9, 0.05, 0.05), (0.5, 0.25, 0.25), (0.2, 0.5, 0.3), (1.0, 0.0, 0.0)])
def test_entropy_coder_round_trips_near_the_entropy(probs):
    rng = np.random.default_rng(0)
    sym = rng.choice(3, size=200_000, p=probs)
    data = encode_symbols(sym, 3)
    assert np.array_equal(decode_symbols(data, sym.size, 3), sym)
    h = empirical_entropy_bits(sym, 3)
    assert 8 * len(data) <= 1.03 * h + 200  # 200 bits: counts table and the coder's final state


def test_entropy_coder_refuses_bad_streams():
    data = encode_symbols(np.array([0, 1, 2, 1, 1, 0] * 1000), 3)
    with pytest.raises(EntropyCodingError):
        decode_symbols(data, 5999, 3)  # the counts say 6000
    with pytest.raises(EntropyCodingError):
        decode_symbols(data[:-4], 6000, 3)
    with pytest.raises(EntropyCodingError):
        encode_symbols(np.array([0, 3]), 3)


# ----------------------------------------------------------------------------- state dicts

@pytest.fixture(scope="module")
def tiny_sd():
    return build_model(PRESETS["tiny"].model, 0).state_dict()


def test_state_dict_codecs_touch_only_experts_and_keep_every_expert(tiny_sd):
    entries = encode_state_dict(tiny_sd, expert_codec="prune50+ternary-ec", other_codec="fp16")
    assert [e.name for e in entries] == list(tiny_sd)
    for e in entries:
        assert e.codec == ("prune50+ternary-ec" if expert_of(e.name) else "fp16")
    out = decode_state_dict(entries)
    assert set(out) == set(tiny_sd)
    cfg = PRESETS["tiny"].model
    for b in range(cfg.n_layers):
        fc1 = torch.stack([out[f"blocks.{b}.moe.experts.{x}.fc1.weight"].reshape(-1) for x in range(cfg.n_experts)])
        assert torch.linalg.matrix_rank(fc1) == cfg.n_experts, "16 distinct experts survive compression"
    model = build_model(cfg, 1)
    model.load_state_dict(out)  # shapes match the model
    with pytest.raises(CodecError, match="twice"):
        decode_state_dict(entries + entries[:1])


def test_codec_sizes_match_first_principles(tiny_sd):
    expert_n = sum(v.numel() for k, v in tiny_sd.items() if expert_of(k))
    other_n = sum(v.numel() for k, v in tiny_sd.items() if not expert_of(k))
    n_mats = sum(1 for k in tiny_sd if expert_of(k))
    sizes = codec_sizes(tiny_sd)
    assert list(sizes) == list(CODECS)
    assert sizes["fp32"] == {"bytes": 2 * other_n + 4 * expert_n, "bits_per_expert_weight": 32.0}
    assert sizes["fp16"]["bits_per_expert_weight"] == 16.0
    per_matrix = {v.numel() for k, v in tiny_sd.items() if expert_of(k)}  # tiny experts are 32x128 and 128x32
    assert per_matrix == {32 * 128}  # each: ceil(4096 / 5) bytes of trits + a 4-byte scale
    assert sizes["ternary"]["bytes"] == 2 * other_n + n_mats * (math.ceil(per_matrix.pop() / 5) + 4)
    assert sizes["prune50"]["bits_per_expert_weight"] == pytest.approx(1 + 16 / 2)
    # entropy coding pays ~20 bytes per matrix (counts, coder state): not worth it on 32x32 matrices
    assert sizes["prune50+ternary-ec"]["bytes"] - sizes["prune50+ternary"]["bytes"] < n_mats * 32
    with pytest.raises(CodecError, match="no expert"):
        codec_sizes({"tok_emb.weight": torch.randn(4, 4)})


def test_codec_throughput_reports_every_figure(tiny_sd):
    r = codec_throughput(tiny_sd, ("fp32", "ternary"), repeats=1)
    for v in r.values():
        assert v["decode_MBps"] > 0 and v["encode_MBps"] > 0 and v["copy_MBps"] > 0
        assert v["decode_over_copy"] == pytest.approx(v["decode_MBps"] / v["copy_MBps"])
    n = 32 * 128  # weights per tiny expert matrix: 5 trits a byte and a 4-byte scale
    assert r["ternary"]["bits_per_weight"] == pytest.approx(8 * (math.ceil(n / 5) + 4) / n)


# ----------------------------------------------------------------------------- bad input

def test_bad_input_raises_codec_errors():
    w = random_tensor((8, 10), 0, 1.0)
    with pytest.raises(CodecError, match="unknown codec 'zip'"):
        encode_tensor("w", w, "zip")
    with pytest.raises(CodecError, match="non-finite"):
        encode_tensor("w", torch.tensor([1.0, float("nan")]), "int8")
    with pytest.raises(CodecError, match="fp16 range"):
        encode_tensor("w", torch.tensor([1.0, 1e6]), "fp16")
    with pytest.raises(CodecError, match="floating-point"):
        encode_tensor("w", torch.arange(4), "fp32")
    e = encode_tensor("w", w, "ternary")
    with pytest.raises(CodecError, match="expects"):
        decode_tensor(EncodedTensor(e.name, e.codec, e.shape, e.payload[:-1], e.meta))
    with pytest.raises(CodecError, match="corrupt"):
        decode_tensor(EncodedTensor(e.name, e.codec, e.shape, e.payload[:4] + b"\xff" + e.payload[5:], e.meta))
    p = encode_tensor("w", w, "prune50")
    flipped = bytes([p.payload[0] ^ 0x01]) + p.payload[1:]  # the mask now keeps one more or one fewer
    with pytest.raises(CodecError, match="mask"):
        decode_tensor(EncodedTensor(p.name, p.codec, p.shape, flipped, p.meta))
    ec = encode_tensor("w", w, "ternary-ec")
    with pytest.raises(CodecError):
        decode_tensor(EncodedTensor(ec.name, ec.codec, ec.shape, ec.payload[:-4], ec.meta))
    with pytest.raises(CodecError, match="group_rows"):
        decode_tensor(EncodedTensor(e.name, e.codec, e.shape, e.payload, {"group_rows": 0}))


def test_empty_tensors_round_trip():
    for codec in CODECS:
        e = encode_tensor("e", torch.zeros(0, 5), codec)
        assert e.payload == b"" and decode_tensor(e).shape == (0, 5)


# ----------------------------------------------------------------------------- QAT

def distillation_task(seed: int):
    """A tiny FractalMoE teacher whose experts matter, and a sampler of its own argmax next tokens."""
    cfg = PRESETS["tiny"].model
    teacher = build_model(cfg, seed)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if expert_of(name):
                p.mul_(10.0)  # large expert outputs: ternarising them moves the logits a lot
            elif name == "lm_head.weight":
                p.mul_(10.0)
    teacher.eval()

    def sampler(s: int, batch: int = 8, length: int = 16):
        g = torch.Generator().manual_seed(s)

        def sample():
            x = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
            with torch.no_grad():
                return x, teacher(x).logits.argmax(-1)
        return sample
    return teacher, sampler


def ternary_loss(model, x, y) -> float:
    q = copy.deepcopy(model)
    q.load_state_dict(decode_state_dict(encode_state_dict(model.state_dict(), expert_codec="ternary",
                                                          other_codec="fp32")))
    q.eval()
    with torch.no_grad():
        return float(q(x, y).loss)


@pytest.mark.slow  # ~5 s on an idle machine, several times that on a busy one
def test_qat_makes_the_ternary_model_better_than_post_training_ternarisation():
    teacher, sampler = distillation_task(0)
    x, y = sampler(999, 32, 32)()
    ptq = ternary_loss(teacher, x, y)
    student = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = ternary_qat(student, sampler(1), steps=20, lr=3e-3, seed=0, progress=False)
    assert out is student
    qat = ternary_loss(student, x, y)
    assert qat < ptq - 0.1, f"QAT {qat:.3f} vs post-training {ptq:.3f}"
    after = student.state_dict()
    assert list(after) == list(before), "parametrisations are removed again"
    for k in before:
        assert torch.equal(after[k], before[k]) != bool(expert_of(k)), f"only experts train: {k}"
    assert all(p.requires_grad for p in student.parameters())


def test_qat_refuses_bad_arguments():
    model = build_model(PRESETS["tiny"].model, 0)
    def batch():
        return (torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(CodecError, match="lossy"):
        ternary_qat(model, batch, steps=1, lr=1e-3, seed=0, codec="fp32")
    with pytest.raises(CodecError, match="steps"):
        ternary_qat(model, batch, steps=-1, lr=1e-3, seed=0)
    with pytest.raises(CodecError, match="lr"):
        ternary_qat(model, batch, steps=1, lr=0.0, seed=0)


@pytest.mark.parametrize("codec", FINITE_CODECS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 3e38])
def test_codecs_that_promise_finite_weights_refuse_a_scale_that_breaks_the_promise(codec, bad):
    """int8 and ternary payloads start their values with float32 scales; a scale that is not finite
    (or would overflow once multiplied by the largest value) is refused, so that the node need not
    check every decoded weight (node.assembly skips those codecs' tensors)."""
    e = encode_tensor("w", random_tensor((8, 10), 1, 1.0), codec)
    at = math.ceil(80 / 8) if codec == "prune50+int8" else 0  # the pruning mask comes first
    payload = e.payload[:at] + struct.pack("<f", bad) + e.payload[at + 4:]
    if codec in ("int8", "prune50+int8") or bad != 3e38:  # a trit is at most 1: 3e38 is a fine ternary scale
        with pytest.raises(CodecError, match="scale is not finite"):
            decode_tensor(EncodedTensor(e.name, e.codec, e.shape, payload, e.meta))
    else:
        assert bool(torch.isfinite(decode_tensor(EncodedTensor(e.name, e.codec, e.shape, payload, e.meta))).all())
