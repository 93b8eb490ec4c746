"""The report's ``codec_quality`` section: what the codecs on the wire cost in perplexity.

Every scoring request the workload sent to the base (each known user's ``use_base`` request and each
unknown user's) was scored by a node holding the base as the bundle shipped it: experts in
``model.expert_codec``, the rest in ``model.other_codec``. Here the same text is scored again, in this
process, by the base with every tensor uncompressed (fp32), with the nodes' rules (the coordinator's
tokenizer, windows of the model's context). The ratio served / uncompressed is the codecs' cost in
perplexity on the workload's own text; it is 1 up to float rounding when every codec is fp32.

The uncompressed perplexities depend only on the models and the text, so they are computed once per
suite and text (a sweep's points share them).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from model.evaluate import geomean, perplexity, token_logps
from model.tokenizer import encode

from .sections import Section
from .workload import held_out_slice

SECTION_KEY = "codec_quality"
# (user, request, chars) -> uncompressed base ppl, per suite
_FP32_PPL: weakref.WeakKeyDictionary[Any, dict[tuple[str, int, int], float]] = weakref.WeakKeyDictionary()


def uncompressed_ppl(suite: Any, texts: list[tuple[str, int]], chars: int) -> dict[tuple[str, int], float]:
    """Perplexity of the fp32 base on the text of each (user, request index) of ``texts``, ``chars`` long
    (scoring request k of a user sends :func:`sim.workload.held_out_slice` k)."""
    memo = _FP32_PPL.setdefault(suite, {})
    missing = [t for t in texts if (*t, chars) not in memo]
    if missing:
        model = suite.base()  # a fresh fp32 copy, built once for all the missing texts
        for user, k in missing:
            ids = torch.tensor(encode(suite.tokenizer, held_out_slice(suite, user, chars, k)))  # (n,)
            memo[(user, k, chars)] = perplexity(token_logps(model, ids))
    return {t: memo[(*t, chars)] for t in texts}


def section(suite: Any, scn: Any, users: list[dict], unknown: list[dict]) -> Section:
    """The ``codec_quality`` section from the workload's known-user rows (``base_ppl``) and unknown-user
    rows (``ppl``, served by the base), each with its ``request`` index."""
    chars = scn.workload.score_chars
    ref = uncompressed_ppl(suite, [(r["user"], r["request"]) for r in (*users, *unknown)], chars)
    texts = []
    for rows, served_key in ((users, "base_ppl"), (unknown, "ppl")):
        for r in rows:
            one = ref[(r["user"], r["request"])]
            texts.append({"user": r["user"], "request": r["request"], "served_ppl": r[served_key],
                          "uncompressed_ppl": one, "ratio": r[served_key] / one})
    served = geomean([t["served_ppl"] for t in texts])
    fp32 = geomean([t["uncompressed_ppl"] for t in texts])
    data = {"expert_codec": scn.model.expert_codec, "other_codec": scn.model.other_codec,
            "reference": "the base with every tensor in fp32, scored in the simulator's process on the same text",
            "texts": texts,
            "summary": {"texts": len(texts), "served_ppl": served, "uncompressed_ppl": fp32,
                        "codec_over_uncompressed": (served / fp32) if served and fp32 else None,
                        "worst_ratio": max((t["ratio"] for t in texts), default=None)}}
    return Section(SECTION_KEY, data, markdown)


def markdown(data: dict) -> list[str]:
    """report.md lines: the geometric means, then one row per text."""
    s = data["summary"]
    if not s["texts"]:
        return ["## Codec cost in perplexity", "", "No text was scored by the base."]
    lines = ["## Codec cost in perplexity", "",
             f"The base as shipped (experts `{data['expert_codec']}`, other tensors `{data['other_codec']}`) "
             f"against the base uncompressed (fp32), on the same {s['texts']} held-out texts: geometric mean ppl "
             f"{s['served_ppl']:.3f} against {s['uncompressed_ppl']:.3f}, ratio **{s['codec_over_uncompressed']:.4f}** "
             f"(worst text {s['worst_ratio']:.4f}).", "",
             "| user | request | served ppl | uncompressed ppl | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {t['user']} | {t['request']} | {t['served_ppl']:.3f} | {t['uncompressed_ppl']:.3f} | "
              f"{t['ratio']:.4f} |" for t in data["texts"]]
    return lines
