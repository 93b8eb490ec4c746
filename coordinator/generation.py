"""Generate: a stream of tokens from one node, resumed on another if it dies, or from a mixture.

The service has checked the request and read its user. A single-node generation is routed and
dispatched like a score (failed over before its first token); when its node dies mid-stream the
rest is asked of the next node a fresh decision gives. A mixture generation asks every component
for its next-token distribution at each step and mixes them here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping

import grpc
import numpy as np

from model.mixtures import normalised_prior
from model.sampling import sample_token
from proto import federation_pb2 as pb
from proto.model_labels import BASE_MODEL

from .core import Core, first_error
from .dispatch import node_down, node_error
from .limits import RequestError
from .mixture import distribution_from_reply, mix_step, update_log_weights
from .registry import UserRecord
from .routing import Route
from .tokens import IncrementalDecoder


async def generate_single(core: Core, request: pb.GenerateRequest, user: UserRecord | None, ids: list[int],
                          context) -> AsyncIterator[pb.GenerateChunk]:
    """One node's generation, failed over before the first token like any call, and resumed on
    another node when its node dies mid-stream: the new node continues from the prompt and the
    tokens already sent (``GenerateChunk.node_id`` shows the switch). A greedy continuation is
    the one the first node would have produced; a sampled one draws with seed ``seed + index``."""
    tokenizer = core.require_tokenizer()
    node_request = pb.NodeGenerateRequest(token_ids=ids, max_new_tokens=request.max_new_tokens,
                                          temperature=request.temperature, top_k=request.top_k, seed=request.seed)
    dead: set[str] = set()  # nodes that died mid-stream: not resumed on

    async def first(route: Route):
        node_request.user_id = route.adapter_user_id
        stream = core.clients.generate(route.node, node_request, user_id=request.user_id,
                                       timeout=core.timeout(context))
        return stream, await anext(stream, None)

    async def start(exclude: Collection[str]):
        decision = core.router.for_user(user, use_base=request.use_base, exclude=exclude)
        return await core.dispatch.call(decision, first, time_left=context.time_remaining)

    (stream, token), route = await start(dead)
    core.note_failover(route.failed_over, request.user_id)
    decoder = IncrementalDecoder(tokenizer)
    generated: list[int] = []
    try:
        while token is not None:
            if token.token_id >= tokenizer.vocab_size:
                raise RequestError(grpc.StatusCode.INTERNAL,
                                   f"node {route.node.node_id} produced token id {token.token_id}")
            index = len(generated)
            text = decoder.push(token.token_id)
            last = token.finish_reason != pb.FINISH_REASON_UNSPECIFIED or index + 1 == request.max_new_tokens
            if last:
                text += decoder.flush()
            yield pb.GenerateChunk(index=index, token_id=token.token_id, text=text, logprob=token.logprob,
                                   node_id=route.node.node_id, finish_reason=token.finish_reason)
            generated.append(token.token_id)
            if last:
                break
            try:
                token = await anext(stream, None)
            except grpc.aio.AioRpcError as err:
                if not node_down(err) or len(dead) >= core.config.max_failover:
                    raise
                # the node died mid-stream: resume the rest on another node
                await stream.aclose()
                await core.dispatch.take_out(route.node)
                dead.add(route.node.node_id)
                user = route.adapter or user  # where the adapter sits now, if the first call moved it
                node_request.token_ids[:] = (ids + generated)[-core.config.max_tokens:]
                node_request.max_new_tokens = request.max_new_tokens - len(generated)
                node_request.seed = request.seed + len(generated)
                (stream, token), route = await start(dead)
                core.note_failover(True, request.user_id)
    except grpc.aio.AioRpcError as err:
        raise node_error(route.node, err) from None
    finally:
        await stream.aclose()


async def generate_mixture(core: Core, request: pb.GenerateRequest, ids: list[int], prior: list[float] | None,
                           adapters: Mapping[str, UserRecord], context) -> AsyncIterator[pb.GenerateChunk]:
    """A mixture's generation: each step mixes every component's next-token distribution."""
    tokenizer = core.require_tokenizer()
    comps = list(request.mixture.components)
    adapters = dict(adapters)  # updated when a step moves an adapter, so the next step finds it there
    mode = request.mixture.mode
    log_w = np.log(normalised_prior(prior, len(comps)))  # (N,)
    rng = np.random.default_rng(request.seed)
    decoder = IncrementalDecoder(tokenizer)
    prefix = list(ids)
    max_ctx = core.config.max_tokens

    async def call(route: Route) -> pb.NextTokenReply:
        req = pb.NextTokenRequest(token_ids=prefix[-max_ctx:], user_id=route.adapter_user_id,
                                  top_k=request.wire_top_k)
        return await core.clients.next_token_distribution(route.node, req, user_id=request.user_id,
                                                          timeout=core.timeout(context))

    async def one(comp: pb.MixtureComponent) -> np.ndarray:
        decision = core.router.for_component(comp.specialist or BASE_MODEL, comp.node_id,
                                             adapters.get(comp.adapter_user_id))
        reply, route = await core.dispatch.call(decision, call, time_left=context.time_remaining)
        if route.adapter is not None:
            adapters[route.adapter.user_id] = route.adapter
        try:
            return distribution_from_reply(reply, tokenizer.vocab_size)
        except ValueError as err:
            raise RequestError(grpc.StatusCode.INTERNAL, f"node {route.node.node_id}: {err}") from None

    for index in range(request.max_new_tokens):
        dists = np.stack(await first_error([one(c) for c in comps]))  # (N, V)
        mixed = mix_step(dists, log_w)  # (V,)
        token = sample_token(mixed, temperature=request.temperature, top_k=request.top_k, rng=rng)
        log_w = update_log_weights(log_w, dists[:, token], mode)
        prefix.append(token)
        last = index + 1 == request.max_new_tokens
        text = decoder.push(token) + (decoder.flush() if last else "")
        yield pb.GenerateChunk(index=index, token_id=token, text=text, logprob=float(mixed[token]),
                               finish_reason=pb.FINISH_REASON_LENGTH if last else pb.FINISH_REASON_UNSPECIFIED)
