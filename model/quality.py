"""Model quality under each within-expert codec, with the ternary codecs' quantisation-aware fine-tune.

Post-training ternarisation costs a small model a lot; `ternary_qat` fine-tunes the experts with
a straight-through estimator so that the ternary model is usable. Both figures are reported,
beside fp32, so Bet 13's claim is measured rather than assumed.
"""

from __future__ import annotations

from . import cache
from .codecs import CODECS, decode_state_dict, encode_state_dict
from .config import config_key
from .data import WindowSampler
from .evaluate import perplexity, token_logps
from .pipeline import Suite
from .qat import ternary_qat

QAT_STEPS = 150
QAT_LR = 2e-3


def _qat_base_codec(codec: str) -> str | None:
    """The codec whose fake quantisation the fine-tune uses (entropy coding changes no value)."""
    if "ternary" not in codec:
        return None
    return codec.removesuffix("-ec")


def qat_state(suite: Suite, codec: str, *, steps: int = QAT_STEPS, lr: float = QAT_LR, progress: bool = True):
    """The base fine-tuned for ``codec`` with the straight-through estimator (cached)."""
    tc = suite.preset.base
    key = config_key("qat", suite.base_key, codec, steps, lr, tc.seed)
    path = cache.entry_path("qat", key)
    if path.exists() and suite.use_cache:
        return cache.load_weights(path)
    model = suite.base()
    sampler = WindowSampler([suite.ids(p, "train") for p in suite.personas], batch_size=tc.batch_size,
                            seq_len=tc.seq_len, seed=tc.seed + 7)
    ternary_qat(model, sampler, steps=steps, lr=lr, seed=tc.seed, progress=progress, codec=codec)
    state = model.state_dict()
    cache.save_weights(path, state, {"codec": codec, "steps": steps, "lr": lr})
    return state


def _ppl_under(suite: Suite, state, codec: str) -> dict:
    model = suite.new_model(decode_state_dict(encode_state_dict(state, expert_codec=codec, other_codec="fp16")))
    per = {p: round(perplexity(token_logps(model, suite.ids(p, "eval"))), 4) for p in suite.personas}
    return {"ppl": per, "mean_ppl": round(sum(per.values()) / len(per), 4)}


def codec_quality(suite: Suite, *, codecs=CODECS, qat_steps: int = QAT_STEPS, qat_lr: float = QAT_LR,
                  progress: bool = True) -> dict:
    """Held-out perplexity of the base under every codec (non-expert tensors in fp16).

    For ternary codecs, also after the quantisation-aware fine-tune (``qat``). Each row carries
    ``ppl_ratio``: mean perplexity over the fp32 model's.
    """
    base = suite.base_state()
    ref = _ppl_under(suite, base, "fp32")
    out = {}
    for codec in codecs:
        row = ref if codec == "fp32" else _ppl_under(suite, base, codec)
        row = {**row, "ppl_ratio": round(row["mean_ppl"] / ref["mean_ppl"], 4)}
        q = _qat_base_codec(codec)
        if q is not None:
            tuned = qat_state(suite, q, steps=qat_steps, lr=qat_lr, progress=progress)
            after = _ppl_under(suite, tuned, codec)
            row["qat"] = {**after, "ppl_ratio": round(after["mean_ppl"] / ref["mean_ppl"], 4),
                          "steps": qat_steps, "lr": qat_lr}
        out[codec] = row
    return out
