"""Perplexity under each codec, with the ternary fine-tune, at the tiny preset."""

import pytest

from model.quality import codec_quality

pytestmark = pytest.mark.slow


def test_codec_quality_rows(tiny_suite):
    rows = codec_quality(tiny_suite, codecs=("fp32", "fp16", "int8", "ternary", "ternary-ec"), qat_steps=8,
                         progress=False)
    assert rows["fp32"]["ppl_ratio"] == 1.0
    assert abs(rows["fp16"]["ppl_ratio"] - 1.0) < 0.01  # fp16 experts lose almost nothing
    assert abs(rows["int8"]["ppl_ratio"] - 1.0) < 0.05
    assert rows["ternary"]["ppl_ratio"] > rows["int8"]["ppl_ratio"]  # post-training ternary costs quality
    for codec in ("ternary", "ternary-ec"):
        assert set(rows[codec]["qat"]) >= {"ppl", "mean_ppl", "ppl_ratio", "steps", "lr"}
        assert set(rows[codec]["ppl"]) == set(tiny_suite.personas)
    # entropy coding is lossless on top of the trits: same values, same perplexity
    assert rows["ternary-ec"]["mean_ppl"] == rows["ternary"]["mean_ppl"]
    assert rows["ternary-ec"]["qat"]["mean_ppl"] == rows["ternary"]["qat"]["mean_ppl"]
