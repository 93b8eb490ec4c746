"""Expert-use predictors behind one interface: learn from routing traces, score experts for a request.

A predictor's scores are an (L, E) array, higher meaning "more likely to be used by this request"; the
probabilistic ones return each block's expected share of tokens (rows sum to 1), so scores of different
blocks are comparable and a global byte budget can trade one block's expert against another's.

Where each predictor runs, and what it sees (only routing statistics leave a node, never its users' text):

    predictor    runs on      plans      sees
    random       coordinator  ahead      nothing (seeded)
    lru, lfu     coordinator  ahead      the node's past routes (expert ids per token)
    global       coordinator  ahead      every node's past routes
    user         coordinator  ahead      routes, tagged with the (pseudonymous) user id
    run-ahead    node         request    the user's histogram + the router's choices on the prompt's first k tokens
    keyword      node         request    the prompt's token ids and a token -> expert map learned on the node
    next-block   node         request    the prompt's hidden states and the routers' weights
    oracle       (anywhere)   ahead      the routing the request will actually take: the upper bound

"Ahead" predictors can ship experts before a request arrives; "request" ones wait for its prompt and pay
that latency. Node-side predictors ship only the experts they select (block and expert ids) to the
coordinator; the token ids, hidden states and keyword map stay on the node. ``visible_context`` and
``visible_trace`` enforce this: a coordinator-side predictor is never handed token ids or hidden states.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


class PredictorError(ValueError):
    """A predictor was given bad options or inputs of the wrong shape."""


@dataclass(frozen=True, kw_only=True)
class RoutingTrace:
    """What one finished request routed to: the statistics a predictor learns from."""

    user: str
    routes: np.ndarray  # (L, T) expert index per block and token
    token_ids: np.ndarray | None = None  # (T,) only ever handed to node-side predictors


@dataclass(frozen=True, kw_only=True)
class RequestContext:
    """What is known about a request when its experts are planned; fields a predictor may not see are None."""

    user: str
    prompt_ids: np.ndarray | None = None  # (P,) token ids of the prompt, on the node
    prompt_routes: np.ndarray | None = None  # (L, P) the router's choices on the prompt, run ahead on the node
    prompt_hidden: np.ndarray | None = None  # (L, P, C) each block's MoE input on the prompt, on the node
    routes: np.ndarray | None = None  # (L, T) the routing the request will take: for the oracle only


@runtime_checkable
class Predictor(Protocol):
    """Scores experts for a request; learns online from finished requests."""

    name: str
    runs_on: str  # "coordinator", "node" or "oracle"
    plans_at: str  # "ahead" (before the request) or "request" (needs its prompt)

    def observe(self, trace: RoutingTrace) -> None:
        """Learn from the routing of a finished request."""

    def predict(self, context: RequestContext) -> np.ndarray:
        """(L, E) scores: higher means more likely to be used."""


def visible_context(predictor: Predictor, context: RequestContext) -> RequestContext:
    """``context`` stripped of what ``predictor`` may not see where it runs."""
    if predictor.runs_on == "oracle":
        return context
    if predictor.runs_on == "node":
        return dataclasses.replace(context, routes=None)
    return RequestContext(user=context.user)


def visible_trace(predictor: Predictor, trace: RoutingTrace) -> RoutingTrace:
    """``trace`` without its token ids unless ``predictor`` runs on the node that holds the text."""
    return trace if predictor.runs_on == "node" else dataclasses.replace(trace, token_ids=None)


def route_counts(routes: np.ndarray, n_experts: int) -> np.ndarray:
    """How many tokens each block sent to each expert: routes (L, T) -> counts (L, E) float."""
    routes = np.asarray(routes)
    L = routes.shape[0]
    flat = (routes + np.arange(L)[:, None] * n_experts).ravel()  # (L*T,) offsets keep blocks apart
    return np.bincount(flat, minlength=L * n_experts).reshape(L, n_experts).astype(np.float64)


def _normalise(counts: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1; an all-zero row becomes uniform (no evidence yet)."""
    total = counts.sum(axis=1, keepdims=True)  # (L, 1)
    uniform = np.full_like(counts, 1.0 / counts.shape[1])
    return np.where(total > 0, counts / np.where(total > 0, total, 1.0), uniform)


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and ok):
        raise PredictorError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


class _Base:
    """Shape bookkeeping and input checks shared by every predictor."""

    name = "base"
    runs_on = "coordinator"
    plans_at = "ahead"

    def __init__(self, *, n_layers: int, n_experts: int) -> None:
        if n_layers < 1 or n_experts < 1:
            raise PredictorError(f"need n_layers >= 1 and n_experts >= 1, got {n_layers} and {n_experts}")
        self.n_layers = n_layers
        self.n_experts = n_experts

    def _routes(self, routes: np.ndarray | None, what: str) -> np.ndarray:
        if routes is None:
            raise PredictorError(f"{self.name}: needs {what}, which this context does not carry")
        routes = np.asarray(routes)
        if routes.ndim != 2 or routes.shape[0] != self.n_layers:
            raise PredictorError(f"{self.name}: {what} must be (L={self.n_layers}, T), got {routes.shape}")
        if routes.size and (routes.min() < 0 or routes.max() >= self.n_experts):
            raise PredictorError(f"{self.name}: {what} hold expert ids outside [0, {self.n_experts})")
        return routes

    def observe(self, trace: RoutingTrace) -> None:
        """Learn nothing (the default for predictors that need no history)."""
        self._routes(trace.routes, "routes")


class _Counting(_Base):
    """Route counts over observed requests, optionally aged by ``decay`` per request."""

    def __init__(self, *, n_layers: int, n_experts: int, decay: float = 1.0) -> None:
        super().__init__(n_layers=n_layers, n_experts=n_experts)
        if not 0 < decay <= 1:
            raise PredictorError(f"decay must be in (0, 1], got {decay!r}")
        self.decay = decay
        self.counts = np.zeros((n_layers, n_experts))  # (L, E)

    def observe(self, trace: RoutingTrace) -> None:
        """Age the counts, then add this request's routes."""
        self.counts = self.decay * self.counts + route_counts(self._routes(trace.routes, "routes"), self.n_experts)


class GlobalFrequency(_Counting):
    """Each block's expert frequency over every request seen federation-wide (uniform before any)."""

    name = "global"

    def __init__(self, *, n_layers: int, n_experts: int) -> None:
        super().__init__(n_layers=n_layers, n_experts=n_experts)

    def predict(self, context: RequestContext) -> np.ndarray:
        """The global share of tokens per expert, (L, E), rows summing to 1."""
        return _normalise(self.counts)


class LFU(_Counting):
    """Least-frequently-used cache baseline: a node's own use counts (``decay`` < 1 ages old requests)."""

    name = "lfu"

    def predict(self, context: RequestContext) -> np.ndarray:
        """Use counts (L, E); never-used experts score 0 and are not shipped."""
        return self.counts.copy()


class LRU(_Base):
    """Least-recently-used cache baseline: scores are the (token) time each expert was last used."""

    name = "lru"

    def __init__(self, *, n_layers: int, n_experts: int) -> None:
        super().__init__(n_layers=n_layers, n_experts=n_experts)
        self.last_use = np.zeros((n_layers, n_experts))  # (L, E) 0 = never
        self.tokens = 0

    def observe(self, trace: RoutingTrace) -> None:
        """Stamp each expert with the position of its last token in the node's token stream."""
        routes = self._routes(trace.routes, "routes")
        L, T = routes.shape
        stamps = np.broadcast_to(self.tokens + 1 + np.arange(T), (L, T))  # (L, T)
        np.maximum.at(self.last_use, (np.arange(L)[:, None], routes), stamps)
        self.tokens += T

    def predict(self, context: RequestContext) -> np.ndarray:
        """Recency (L, E): the most recently used experts score highest; never-used ones 0."""
        return self.last_use.copy()


class RandomPredictor(_Base):
    """Uniformly random scores from a seeded generator: the floor any predictor must beat."""

    name = "random"

    def __init__(self, *, n_layers: int, n_experts: int, seed: int = 0) -> None:
        super().__init__(n_layers=n_layers, n_experts=n_experts)
        self.rng = np.random.default_rng(seed)

    def predict(self, context: RequestContext) -> np.ndarray:
        """Fresh random scores (L, E) in [0, 1)."""
        return self.rng.random((self.n_layers, self.n_experts))


class UserHistogram(_Base):
    """A user's routing histogram smoothed toward the global one (Dirichlet prior centred on global use).

    p_user = (c_user + alpha * p_global) / (n_user + alpha): a new user gets the global distribution, and
    each of their tokens moves it toward their own; ``alpha`` is how many tokens the prior is worth.
    """

    name = "user"

    def __init__(self, *, n_layers: int, n_experts: int, alpha: float = 64.0) -> None:
        super().__init__(n_layers=n_layers, n_experts=n_experts)
        self.alpha = _positive("alpha", alpha)
        self.global_counts = np.zeros((n_layers, n_experts))  # (L, E)
        self.user_counts: dict[str, np.ndarray] = {}

    def observe(self, trace: RoutingTrace) -> None:
        """Add the routes to the global counts and to this user's."""
        counts = route_counts(self._routes(trace.routes, "routes"), self.n_experts)  # (L, E)
        self.global_counts += counts
        self.user_counts[trace.user] = self.user_counts.get(trace.user, 0.0) + counts

    def user_distribution(self, user: str) -> np.ndarray:
        """The smoothed histogram of ``user``, (L, E), rows summing to 1."""
        prior = _normalise(self.global_counts)
        own = self.user_counts.get(user, np.zeros_like(prior))
        return (own + self.alpha * prior) / (own.sum(axis=1, keepdims=True) + self.alpha)

    def predict(self, context: RequestContext) -> np.ndarray:
        """The user's smoothed histogram."""
        return self.user_distribution(context.user)


class RunAhead(UserHistogram):
    """The user's histogram updated with the router's choices on the request's first ``k`` tokens.

    The node runs its router ahead on the prompt (seed 001's proposal) and treats the user's smoothed
    histogram as a prior worth ``kappa`` tokens: p = (c_ahead + kappa * p_user) / (k + kappa).
    """

    name = "run-ahead"
    runs_on = "node"
    plans_at = "request"

    def __init__(self, *, n_layers: int, n_experts: int, alpha: float = 64.0, kappa: float = 16.0,
                 k: int = 16) -> None:
        super().__init__(n_layers=n_layers, n_experts=n_experts, alpha=alpha)
        self.kappa = _positive("kappa", kappa)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PredictorError(f"k must be an int >= 1, got {k!r}")
        self.k = k

    def predict(self, context: RequestContext) -> np.ndarray:
        """Posterior over experts after the first k prompt tokens' routes, (L, E)."""
        ahead = self._routes(context.prompt_routes, "prompt_routes")[:, : self.k]  # (L, k)
        counts = route_counts(ahead, self.n_experts)
        return (counts + self.kappa * self.user_distribution(context.user)) / (ahead.shape[1] + self.kappa)


class Keyword(_Base):
    """Bet 12: words of the prompt point to experts, through a token -> expert map learned on the node.

    Every token seen in a finished request is credited with that request's routing histogram, so a token
    maps to the experts of the requests it occurs in (a topic signal, not just its own position's expert).
    A prompt's prediction averages the maps of its known distinct tokens, smoothed toward global use by
    ``beta`` pseudo-tokens. The map and the prompt stay on the node; only the chosen expert ids leave it.
    """

    name = "keyword"
    runs_on = "node"
    plans_at = "request"

    def __init__(self, *, n_layers: int, n_experts: int, vocab_size: int, beta: float = 1.0) -> None:
        super().__init__(n_layers=n_layers, n_experts=n_experts)
        if vocab_size < 1:
            raise PredictorError(f"vocab_size must be >= 1, got {vocab_size!r}")
        self.beta = _positive("beta", beta, allow_zero=True)
        self.vocab_size = vocab_size
        self.assoc = np.zeros((vocab_size, n_layers, n_experts))  # (V, L, E) summed request histograms
        self.seen = np.zeros(vocab_size)  # (V,) requests each token occurred in
        self.global_counts = np.zeros((n_layers, n_experts))  # (L, E)

    def _tokens(self, ids: np.ndarray | None, what: str) -> np.ndarray:
        if ids is None:
            raise PredictorError(f"{self.name}: needs {what}; token ids are only available on the node")
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if ids.size and (ids[0] < 0 or ids[-1] >= self.vocab_size):
            raise PredictorError(f"{self.name}: {what} outside [0, {self.vocab_size})")
        return ids

    def observe(self, trace: RoutingTrace) -> None:
        """Credit each distinct token of the request with the request's routing histogram."""
        counts = route_counts(self._routes(trace.routes, "routes"), self.n_experts)  # (L, E)
        self.global_counts += counts
        ids = self._tokens(trace.token_ids, "token_ids")
        self.assoc[ids] += _normalise(counts)[None]
        self.seen[ids] += 1

    def predict(self, context: RequestContext) -> np.ndarray:
        """Mean expert histogram of the prompt's known tokens, smoothed toward global use, (L, E)."""
        ids = self._tokens(context.prompt_ids, "prompt_ids")
        known = ids[self.seen[ids] > 0]
        per_token = self.assoc[known] / self.seen[known][:, None, None]  # (K, L, E)
        prior = _normalise(self.global_counts)
        if known.size == 0 and self.beta == 0:
            return prior
        return (per_token.sum(axis=0) + self.beta * prior) / (known.size + self.beta)


class NextBlockRouter(_Base):
    """mixtral-offloading's speculation: block b+1's router applied to block b's MoE input.

    The residual stream changes little from one block to the next, so block b's hidden state, fed to the
    next block's router, guesses that block's expert before block b has finished. Block 0's MoE input
    depends on no expert (embedding and attention only), so its own router gives block 0 exactly.
    Scores are the share of prompt tokens whose speculated expert is each one, plus ``soft`` times the
    router's mean probability, which ranks the experts no prompt token picked (so a generous budget still
    ships them) without reordering the ones that were picked.
    """

    name = "next-block"
    runs_on = "node"
    plans_at = "request"

    def __init__(self, *, router_weights: np.ndarray, soft: float = 1e-3) -> None:
        w = np.asarray(router_weights, dtype=np.float64)
        if w.ndim != 3:
            raise PredictorError(f"router_weights must be (L, E, C), got shape {w.shape}")
        super().__init__(n_layers=w.shape[0], n_experts=w.shape[1])
        self.router_weights = w  # (L, E, C)
        self.soft = _positive("soft", soft, allow_zero=True)

    def predict(self, context: RequestContext) -> np.ndarray:
        """Share of prompt tokens speculated to go to each expert (+ soft * mean router probability), (L, E)."""
        if context.prompt_hidden is None:
            raise PredictorError(f"{self.name}: needs prompt_hidden, which this context does not carry")
        h = np.asarray(context.prompt_hidden, dtype=np.float64)  # (L, P, C)
        L, E, C = self.router_weights.shape
        if h.ndim != 3 or h.shape[0] != L or h.shape[2] != C or h.shape[1] == 0:
            raise PredictorError(f"{self.name}: prompt_hidden must be (L={L}, P>0, C={C}), got {h.shape}")
        source = np.concatenate([h[:1], h[:-1]])  # (L, P, C): block b reads block b-1's input; block 0 its own
        logits = np.einsum("lpc,lec->lpe", source, self.router_weights)  # (L, P, E)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)  # (L, P, E)
        return _normalise(route_counts(logits.argmax(axis=-1), E)) + self.soft * probs.mean(axis=1)


class Oracle(_Base):
    """The routing the request actually takes: the upper bound on any predictor."""

    name = "oracle"
    runs_on = "oracle"

    def predict(self, context: RequestContext) -> np.ndarray:
        """Each expert's true share of the request's tokens, (L, E); unused experts score 0."""
        return _normalise(route_counts(self._routes(context.routes, "routes"), self.n_experts))


PREDICTORS: dict[str, type] = {
    cls.name: cls
    for cls in (RandomPredictor, LRU, LFU, GlobalFrequency, UserHistogram, RunAhead, Keyword, NextBlockRouter, Oracle)
}


def build_predictor(name: str, *, n_layers: int, n_experts: int, vocab_size: int | None = None,
                    router_weights: np.ndarray | None = None, seed: int = 0, **options: object) -> Predictor:
    """A fresh predictor by name (see PREDICTORS) with its ``options`` (e.g. alpha, kappa, k, beta, decay).

    Shared arguments a predictor does not use are ignored; an option it does not take is a PredictorError.
    """
    try:
        cls = PREDICTORS[name]
    except KeyError:
        raise PredictorError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}") from None
    accepted = set(inspect.signature(cls).parameters)  # the constructor's, without self
    bad = sorted(set(options) - accepted)
    if bad:
        raise PredictorError(f"predictor {name!r} takes no option {bad[0]!r}")
    shared = {"n_layers": n_layers, "n_experts": n_experts, "vocab_size": vocab_size,
              "router_weights": router_weights, "seed": seed}
    kwargs = {k: v for k, v in shared.items() if k in accepted}
    missing = [k for k, v in kwargs.items() if v is None]
    if missing:
        raise PredictorError(f"predictor {name!r} needs {missing[0]}")
    return cls(**kwargs, **options)
