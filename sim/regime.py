"""The report's ``model_regime`` section: which regime a run's model is in.

The federation's premise is that every expert is load-bearing, so every run says how much its base
relies on its experts (`model.reliance`, computed once per base and cached) and which texts the base
pretrained on, with the base's bits per character beside zlib's on the real texts.
"""

from __future__ import annotations

from typing import Any

from .sections import Section

SECTION_KEY = "model_regime"


def section(suite: Any) -> Section:
    """The ``model_regime`` section of a run on ``suite`` (a `model.pipeline.Suite`)."""
    reliance = suite.reliance()
    base = suite.base()
    real = {}
    for name in suite.pretrain:
        if suite.floor_bpc(name) is None:  # real text: compare with zlib on the same characters
            m = suite.score(base, name)
            real[name] = {"bpc": m["bpc"], "zlib_bpc": m["zlib_bpc"], "beats_zlib": m["bpc"] < m["zlib_bpc"]}
    data = {"preset": suite.preset.name, "pretrained_on": list(suite.pretrain),
            "expert_reliance": reliance["texts"], "usage_divergence": reliance["usage_divergence"],
            "real_text_bpc": real}
    return Section(SECTION_KEY, data, markdown)


def markdown(data: dict) -> list[str]:
    """report.md lines: a reliance table per pretraining text, then real text against zlib."""
    lines = ["## Model regime: how much the base relies on its experts", "",
             f"Preset `{data['preset']}`, base pretrained on: {', '.join(data['pretrained_on'])}. "
             "Ratios are held-out perplexity with the experts changed over the base's own.", "",
             "| text | base ppl | all experts zeroed | each block's experts averaged | drop one (median / max) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in data["expert_reliance"].items():
        lines.append(f"| {name} | {r['ppl']:.2f} | x{r['zeroed_ratio']:.2f} | x{r['averaged_ratio']:.2f} | "
                     f"x{r['drop_one']['median_ratio']:.3f} / x{r['drop_one']['max_ratio']:.3f} |")
    div = data["usage_divergence"]
    if div.get("jsd_bits"):
        lines += ["", "Expert usage across these texts, Jensen-Shannon divergence per block (bits, 0 = identical): "
                  + ", ".join(f"{v:.3f}" for v in div["jsd_bits"]) + "."]
    if data["real_text_bpc"]:
        lines += ["", "| real text | base bpc | zlib -9 bpc | beats zlib |", "| --- | ---: | ---: | --- |"]
        for name, r in data["real_text_bpc"].items():
            lines.append(f"| {name} | {r['bpc']:.3f} | {r['zlib_bpc']:.3f} | {'yes' if r['beats_zlib'] else 'no'} |")
    return lines
