"""Score: the log-probs of a text, from one node or a mixture of them.

The service has checked the request and read its user; here a routing decision is made for the
user (or for each mixture component), :meth:`coordinator.dispatch.Dispatcher.call` sends
``Node.ScoreTokens`` down its fallback order, and the reply is assembled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import grpc
import numpy as np

from proto import federation_pb2 as pb
from proto.model_labels import BASE_MODEL, model_label

from .core import Core, first_error
from .limits import RequestError
from .mixture import score_mixture
from .registry import UserRecord
from .routing import Decision, Route


def check_logprobs(values, expected: int, node_id: str) -> np.ndarray:
    """A node's log-probs as float64 (T,), or INTERNAL when it sent the wrong number or non-finite values."""
    a = np.asarray(values, dtype=np.float64)
    if a.shape != (expected,):
        raise RequestError(grpc.StatusCode.INTERNAL, f"node {node_id} returned {a.size} log-probs, expected {expected}")
    if not np.all(np.isfinite(a)) or (a > 1e-4).any():
        raise RequestError(grpc.StatusCode.INTERNAL, f"node {node_id} returned log-probs that are not finite and <= 0")
    return a


def node_label(core: Core, route: Route) -> str:
    """What scored a single-node request, as the node itself labels it (proto.model_labels): a soup
    node's label carries the h it accepted, which the registry keeps."""
    saved = core.registry.get_soup(route.node.node_id)
    h = list(pb.InstantiateSoupRequest.FromString(saved).domain_weights) if saved is not None else None
    return model_label(route.node.model, route.adapter_user_id, soup_h=h)


async def score(core: Core, request: pb.ScoreRequest, context, *, user: UserRecord | None, ids: list[int],
                prior: list[float] | None, adapters: Mapping[str, UserRecord]) -> pb.ScoreReply:
    """The reply to a checked Score request whose text tokenized to ``ids`` (at least 2)."""
    tokenizer = core.require_tokenizer()
    scored = ids[1:]
    first_chars = 0 if core.bos_id is not None else len(tokenizer.decode(ids[:1]))
    reply = pb.ScoreReply(user_id=request.user_id, token_ids=scored,
                          scored_chars=max(1, len(request.text) - first_chars))
    if not request.omit_token_strings:
        reply.tokens.extend(tokenizer.decode([i]) for i in scored)
    if request.HasField("mixture"):
        logps = await _score_mixture(core, request, reply, ids, prior, adapters, context)
    else:
        logps = await _score_single(core, request, reply, user, ids, context)
    reply.logprobs.extend(logps.tolist())
    total = float(logps.sum())
    reply.perplexity = math.exp(-total / len(logps))
    reply.bits_per_char = -total / math.log(2) / reply.scored_chars
    return reply


async def _score_tokens(core: Core, decision: Decision, ids: list[int], kind: pb.ByteKind.ValueType, user_id: str,
                        context) -> tuple[np.ndarray, Route]:
    """``Node.ScoreTokens`` as ``decision`` routes it: the checked log-probs (T,) and the route taken."""
    async def call(route: Route) -> pb.ScoreTokensReply:
        req = pb.ScoreTokensRequest(token_ids=ids, user_id=route.adapter_user_id)
        return await core.clients.score_tokens(route.node, req, kind=kind, user_id=user_id,
                                               timeout=core.timeout(context))

    reply, route = await core.dispatch.call(decision, call, time_left=context.time_remaining)
    return check_logprobs(reply.logprobs, len(ids) - 1, route.node.node_id), route


async def _score_single(core: Core, request: pb.ScoreRequest, reply: pb.ScoreReply, user: UserRecord | None,
                        ids: list[int], context) -> np.ndarray:
    decision = core.router.for_user(user, use_base=request.use_base)
    logps, route = await _score_tokens(core, decision, ids, pb.BYTE_KIND_SCORE, request.user_id, context)
    core.note_failover(route.failed_over, request.user_id)
    reply.node_id = route.node.node_id
    reply.model = node_label(core, route)
    reply.failed_over = route.failed_over
    return logps


async def _score_mixture(core: Core, request: pb.ScoreRequest, reply: pb.ScoreReply, ids: list[int],
                         prior: list[float] | None, adapters: Mapping[str, UserRecord], context) -> np.ndarray:
    comps = list(request.mixture.components)

    async def one(comp: pb.MixtureComponent) -> tuple[np.ndarray, Route]:
        decision = core.router.for_component(comp.specialist or BASE_MODEL, comp.node_id,
                                             adapters.get(comp.adapter_user_id))
        return await _score_tokens(core, decision, ids, pb.BYTE_KIND_MIXTURE, request.user_id, context)

    results = await first_error([one(c) for c in comps])
    logps = np.stack([lp for lp, _ in results])  # (N, T)
    mixed = score_mixture(logps, request.mixture.mode, prior)
    reply.model = "mixture"
    reply.failed_over = any(route.failed_over for _, route in results)
    core.note_failover(reply.failed_over, request.user_id)
    for i, (comp, (lp, route)) in enumerate(zip(comps, results)):
        reply.components.add(component=comp, node_id=route.node.node_id, logprobs=lp.tolist(),
                             attribution=mixed.attribution[i].tolist(),
                             final_weight=float(mixed.final_weights[i]),
                             perplexity=math.exp(-float(lp.mean())))
    return mixed.logprobs
