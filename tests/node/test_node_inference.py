"""node.inference computes with model's rules: windows, top-k with its remaining mass, sampling."""

from __future__ import annotations

import math

import torch
from node_support import TINY, tiny_model

from model import mixtures
from model.evaluate import window_logps
from node.inference import score_tokens, top_k

MODEL = tiny_model(0)


def test_top_k_rest_is_compress_topks_complement():
    # the node used to measure the rest by a logsumexp over the other tokens, another rule than
    # model.mixtures.compress_topk's; on log-probs carrying rounding the two disagree
    g = torch.Generator().manual_seed(0)
    for row in torch.log_softmax(torch.randn(20, TINY.vocab_size, generator=g) * 3, dim=-1).double():
        for k in (1, 7, 100):
            ids, vals, rest_log = top_k(row, k)
            ref_ids, ref_vals, ref_rest = mixtures.topk_split(row, k)
            assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals)
            assert rest_log == (math.log(float(ref_rest)) if float(ref_rest) > 0 else -math.inf)
            shipped = float(torch.exp(vals).sum())
            assert math.isclose(shipped + math.exp(rest_log), max(shipped, 1.0), abs_tol=1e-15)
            c = mixtures.compress_topk(row, k=k)
            assert torch.equal(c.indices, ids) and float(c.rest) == float(torch.tensor(math.exp(rest_log)).half())
        assert top_k(row, TINY.vocab_size)[2] == -math.inf


def test_score_tokens_is_the_model_window_rule_and_routes_every_token():
    ids = torch.randint(0, TINY.vocab_size, (2 * TINY.context + 1,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logps, routes = score_tokens(MODEL, ids, None)
        expected = window_logps(lambda x: MODEL(x).logits, ids, TINY.context)
    assert torch.equal(logps, expected) and logps.shape == (ids.numel() - 1,)
    assert routes.shape == (TINY.n_layers, ids.numel())  # the last token's route too
