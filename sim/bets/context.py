"""What a bet's ``measure`` may ask of the world: the :class:`BetContext` protocol, and its
implementation on the model pipeline (:class:`SuiteContext`).

Bets see models, texts and a few operations (score, sample, train, compress, prefetch), never the
cache, the tokenizer or the corpora directly, so a test can hand them a fake context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from model.config import TrainConfig
from model.fractal_moe import FractalMoE

StateDict = dict[str, torch.Tensor]

# The catalogue's specialists train for 1000 steps; step counts the catalogue gives (Bet 39's 200
# recovery steps, say) are scaled by the preset's specialist steps over this.
CATALOGUE_SPECIALIST_STEPS = 1000

PREFETCH_TRAIN_REQUESTS = 16  # training requests per known user that a prefetch predictor learns from


@runtime_checkable
class BetContext(Protocol):
    """Everything a bet measures with. Texts are named by source: a persona or a user."""

    preset: str  # the preset's name
    seed: int

    def personas(self) -> tuple[str, ...]:
        """Training personas, each with a specialist (the catalogue's programmer, novelist, ... )."""

    def held_out_persona(self) -> str:
        """The persona no model was trained on."""

    def known_users(self) -> tuple[str, ...]:
        """Users with a norm-only adapter."""

    def unknown_users(self) -> tuple[str, ...]:
        """Users of the held-out persona: no adapter."""

    def persona_of(self, source: str) -> str:
        """The persona a user (or persona) source belongs to."""

    def base_state(self) -> StateDict:
        """Weights of the base model (read-only: copy before changing)."""

    def specialist_state(self, persona: str) -> StateDict:
        """Weights of ``persona``'s specialist, a full fine-tune of the base (read-only)."""

    def adapter_state(self, user: str) -> StateDict:
        """``user``'s norm-only adapter (read-only)."""

    def model(self, state: StateDict, adapter: StateDict | None = None) -> FractalMoE:
        """A fresh model in eval mode holding ``state``, with ``adapter`` applied on top when given."""

    def context_length(self) -> int:
        """The model's context: evaluation windows (and so mixture documents) are this long."""

    def tokens(self, source: str, split: str = "eval") -> torch.Tensor:
        """Token ids of a source's "eval" (held-out) or "train" text: (N,) long."""

    def token_logps(self, model: FractalMoE, tokens: torch.Tensor) -> torch.Tensor:
        """log p(x_t | x_<t) for every token but the first, in windows of the context: (N-1,) float64."""

    def sample(self, model: FractalMoE, prompt: torch.Tensor, n: int, *, greedy: bool = True) -> torch.Tensor:
        """``n`` new tokens continuing ``prompt`` (greedy, or sampled with the context's seed): (n,) long."""

    def budget(self, steps: int) -> int:
        """A catalogue step count scaled to this preset (>= 1)."""

    def train_steps(self, model: FractalMoE, sources: Sequence[str], *, steps: int, lr: float,
                    params: Sequence[str] | None = None) -> list[float]:
        """Train ``model`` in place on the sources' train text (AdamW); returns the loss of each step."""

    def compress(self, model: FractalMoE, codec: str, *, qat_steps: int = 0) -> tuple[FractalMoE, dict]:
        """``model`` with its experts encoded and decoded by ``codec`` (after ``qat_steps`` steps of
        quantisation-aware fine-tuning), and {"bits_per_expert_weight", "bytes", "fp32_bytes", "qat_steps"}."""

    def prefetch_eval(self, predictor: str, *, experts_per_block: int) -> dict:
        """Serve the known users' held-out requests with ``experts_per_block`` experts per block chosen by
        ``predictor``; returns {"recall", "hit_rate", "ppl_ratio", "bytes_fraction", "requests"}."""


class SuiteContext:
    """:class:`BetContext` on :class:`model.pipeline.Suite` (trained and cached per preset and seed)."""

    def __init__(self, suite) -> None:
        self.suite = suite
        self.preset = suite.preset.name
        self.seed = suite.seed
        self._request_cache: tuple[FractalMoE, list, list] | None = None

    # ---- who and what ----
    def personas(self) -> tuple[str, ...]:
        """Training personas."""
        return tuple(self.suite.personas)

    def held_out_persona(self) -> str:
        """The persona held out of all training."""
        return self.suite.held_out

    def known_users(self) -> tuple[str, ...]:
        """Users with adapters."""
        return tuple(self.suite.known_users)

    def unknown_users(self) -> tuple[str, ...]:
        """Users without adapters."""
        return tuple(self.suite.unknown_users)

    def persona_of(self, source: str) -> str:
        """Persona of a source."""
        return self.suite.sources[source].persona

    # ---- weights and models ----
    def base_state(self) -> StateDict:
        """Base weights."""
        return self.suite.base_state()

    def specialist_state(self, persona: str) -> StateDict:
        """Specialist weights."""
        return self.suite.specialist_state(persona)

    def adapter_state(self, user: str) -> StateDict:
        """A user's adapter."""
        return self.suite.adapter_state(user)

    def model(self, state: StateDict, adapter: StateDict | None = None) -> FractalMoE:
        """A fresh model holding ``state`` (+ ``adapter``)."""
        from model.train import apply_adapter

        m = self.suite.new_model(state)
        return apply_adapter(m, adapter) if adapter is not None else m

    def context_length(self) -> int:
        """The model's context."""
        return self.suite.preset.model.context

    # ---- text and scoring ----
    def tokens(self, source: str, split: str = "eval") -> torch.Tensor:
        """Token ids of a source's split."""
        return self.suite.ids(source, split)

    def token_logps(self, model: FractalMoE, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token log-probabilities."""
        from model.evaluate import token_logps

        return token_logps(model, tokens)

    def sample(self, model: FractalMoE, prompt: torch.Tensor, n: int, *, greedy: bool = True) -> torch.Tensor:
        """A continuation of ``prompt``."""
        from model.evaluate import sample

        return sample(model, prompt, n, greedy=greedy, seed=self.seed)

    # ---- training ----
    def budget(self, steps: int) -> int:
        """Catalogue steps scaled by the preset's specialist steps over the catalogue's 1000."""
        scale = self.suite.preset.specialist.steps / CATALOGUE_SPECIALIST_STEPS
        return max(1, round(steps * scale))

    def _sampler(self, sources: Sequence[str], tc: TrainConfig):
        from model.data import WindowSampler

        return WindowSampler([self.tokens(s, "train") for s in sources], batch_size=tc.batch_size,
                             seq_len=tc.seq_len, seed=tc.seed)

    def _train_config(self, steps: int, lr: float) -> TrainConfig:
        spec = self.suite.preset.specialist
        return TrainConfig(steps=steps, batch_size=spec.batch_size, seq_len=spec.seq_len, lr=lr,
                           warmup=0, weight_decay=spec.weight_decay, seed=self.seed + 7)

    def train_steps(self, model: FractalMoE, sources: Sequence[str], *, steps: int, lr: float,
                    params: Sequence[str] | None = None) -> list[float]:
        """AdamW from the pipeline's training loop (no warm-up; cosine decay to 10% of ``lr``)."""
        from model.train import train

        tc = self._train_config(steps, lr)
        return train(model, self._sampler(sources, tc), tc, params=params, desc="bet training",
                     progress=self.suite.progress)

    # ---- compression (issue 3's codecs) ----
    def compress(self, model: FractalMoE, codec: str, *, qat_steps: int = 0) -> tuple[FractalMoE, dict]:
        """Experts through ``codec`` (QAT first when asked); the rest in fp32 so only experts differ."""
        from model import codecs
        from model.qat import ternary_qat

        out = self.model(model.state_dict())
        if qat_steps:
            tc = self._train_config(qat_steps, self.suite.preset.specialist.lr)
            ternary_qat(out, self._sampler(self.personas(), tc), steps=qat_steps, lr=tc.lr,
                        seed=tc.seed, progress=self.suite.progress, codec=codec)
        sd = out.state_dict()
        entries = codecs.encode_state_dict(sd, expert_codec=codec, other_codec="fp32")
        out.load_state_dict(codecs.decode_state_dict(entries))
        out.eval()
        from model.fractal_moe import expert_of

        expert = [e for e in entries if expert_of(e.name) is not None]
        n_weights = sum(e.numel for e in expert)
        payload = sum(len(e.payload) for e in expert)
        return out, {"bits_per_expert_weight": 8 * payload / n_weights, "bytes": payload,
                     "fp32_bytes": 4 * n_weights, "qat_steps": qat_steps}

    # ---- prefetching (issue 5's predictors) ----
    def _requests(self) -> tuple[FractalMoE, list, list]:
        """The base, and the known users' training and held-out requests with the base's routing,
        computed once and shared by every predictor. A request is one context window of a user's text."""
        if self._request_cache is None:
            from coordinator.prefetch import quality

            base = self.model(self.base_state())
            ctx_len = base.cfg.context
            prompt_len = max(1, ctx_len // 4)

            def windows(ids: torch.Tensor) -> list[np.ndarray]:
                return [ids[i * ctx_len:(i + 1) * ctx_len].numpy() for i in range(ids.numel() // ctx_len)]

            train, held = [], []
            for user in self.known_users():
                for w in windows(self.tokens(user, "train"))[:PREFETCH_TRAIN_REQUESTS]:
                    train.append((user, w, quality.route_trace(base, w)[0]))
                for w in windows(self.tokens(user, "eval")):
                    routes, hidden = quality.route_trace(base, w, hidden=True)
                    held.append((user, w, routes, hidden[:, :prompt_len], prompt_len))
            self._request_cache = (base, train, held)
        return self._request_cache

    def prefetch_eval(self, predictor: str, *, experts_per_block: int) -> dict:
        """Learn from the known users' training requests, then plan each held-out request's experts.

        The predictor sees the first quarter of a request (the prompt) where it runs on the node, is
        scored on the routing of the whole request, and learns from each request once it is served.
        """
        from coordinator.prefetch import metrics, predictors, quality

        base, train, held = self._requests()
        cfg = base.cfg
        pred = predictors.build_predictor(predictor, n_layers=cfg.n_layers, n_experts=cfg.n_experts,
                                          vocab_size=cfg.vocab_size, router_weights=quality.router_weights(base),
                                          seed=self.seed)

        def learn(user: str, w: np.ndarray, routes: np.ndarray) -> None:
            trace = predictors.RoutingTrace(user=user, routes=routes, token_ids=w)
            pred.observe(predictors.visible_trace(pred, trace))

        for user, w, routes in train:
            learn(user, w, routes)
        recalls, hits, nll_full, nll_sub, n_tok = [], [], 0.0, 0.0, 0
        for user, w, routes, p_hidden, p_len in held:
            rc = predictors.RequestContext(user=user, prompt_ids=w[:p_len], prompt_routes=routes[:, :p_len],
                                           prompt_hidden=p_hidden, routes=routes)
            scores = pred.predict(predictors.visible_context(pred, rc))
            mask = metrics.top_k_mask(scores, experts_per_block)
            recalls.append(float(metrics.recall_at_k(scores, routes, experts_per_block, weighted=True).mean()))
            hits.append(metrics.hit_rate(routes, mask))
            cmp = quality.substitution_ppl(base, w, mask)
            nll_full, nll_sub, n_tok = nll_full + cmp.nll_full, nll_sub + cmp.nll_substituted, n_tok + cmp.tokens
            learn(user, w, routes)
        return {"recall": float(np.mean(recalls)), "hit_rate": float(np.mean(hits)),
                "ppl_ratio": math.exp((nll_sub - nll_full) / max(n_tok, 1)),
                "bytes_fraction": experts_per_block / cfg.n_experts, "requests": len(held)}
