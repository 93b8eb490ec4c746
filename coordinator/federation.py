"""The client-facing ``Federation`` service: scoring, generation, listings, statistics, admin."""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator, Collection

import grpc
import numpy as np

from model.mixtures import normalised_prior
from model.sampling import sample_token
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc

from .auth import Principal, hash_token, new_token, require_user_access
from .core import Core, first_error, handles_errors, handles_stream_errors, node_down, node_error
from .limits import (RequestError, check_bundle_name, check_enum, check_float, check_id, check_int, check_prior,
                     check_text, check_token_count, invalid)
from .mixture import distribution_from_reply, mix_step, score_mixture, update_log_weights
from .registry import UserRecord
from .routing import BASE_MODEL, Route
from .store import BundleIntegrityError
from .tokens import IncrementalDecoder

_MODES = (pb.MIXTURE_MODE_UNSPECIFIED, pb.MIXTURE_MODE_UNIFORM, pb.MIXTURE_MODE_POSTERIOR)
_MAX_TEMPERATURE = 10.0
_MAX_BUNDLE_BYTES = 1 << 40
_MAX_SOUP_DOMAINS = 256


def _not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)


def _precondition(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, message)


def _check_logprobs(values, expected: int, node_id: str) -> np.ndarray:
    """A node's log-probs as float64 (T,), or INTERNAL when it sent the wrong number or non-finite values."""
    a = np.asarray(values, dtype=np.float64)
    if a.shape != (expected,):
        raise RequestError(grpc.StatusCode.INTERNAL, f"node {node_id} returned {a.size} log-probs, expected {expected}")
    if not np.all(np.isfinite(a)) or (a > 1e-4).any():
        raise RequestError(grpc.StatusCode.INTERNAL, f"node {node_id} returned log-probs that are not finite and <= 0")
    return a


def _model_label(route: Route) -> str:
    """What scored a single-node request: "base", "adapter:<user>", "specialist:<name>[+adapter:<user>]"."""
    model, adapter = route.node.model, route.adapter_user_id
    if model == BASE_MODEL:
        return f"adapter:{adapter}" if adapter else "base"
    return f"specialist:{model}" + (f"+adapter:{adapter}" if adapter else "")


class FederationService(rpc.FederationServicer):
    """Implements ``fractal.federation.v1.Federation``."""

    def __init__(self, core: Core) -> None:
        self.core = core

    # --- helpers -------------------------------------------------------------------------------

    def _principal_for(self, context, user_id: str) -> tuple[Principal, UserRecord | None]:
        """Authenticate; check the token reaches ``user_id`` ("" = none) and return the user."""
        principal = self.core.auth.client(context.invocation_metadata())
        check_id(user_id, "user_id", allow_empty=True)
        if not user_id:
            return principal, None
        require_user_access(principal, user_id)
        return principal, self.core.user(user_id)

    def _encode(self, text: str, what: str, *, min_tokens: int) -> list[int]:
        codec = self.core.require_codec()
        ids = codec.encode(text)
        if self.core.bos_id is not None:
            ids = [self.core.bos_id, *ids]
        if min_tokens >= 2:
            check_token_count(len(ids), self.core.config.max_tokens, what)
        elif not ids:
            raise invalid(f"{what} tokenizes to no tokens")
        elif len(ids) > self.core.config.max_tokens:
            raise invalid(f"{what} tokenizes to {len(ids)} tokens; the limit is {self.core.config.max_tokens}")
        return ids

    def _check_mixture(self, mixture: pb.MixtureSpec, principal: Principal) -> list[float] | None:
        n = len(mixture.components)
        check_int(n, "mixture.components count", 1, self.core.config.max_mixture_components)
        check_enum(mixture.mode, "mixture.mode", _MODES)
        for i, comp in enumerate(mixture.components):
            check_id(comp.specialist, f"components[{i}].specialist", allow_empty=True)
            check_id(comp.node_id, f"components[{i}].node_id", allow_empty=True)
            check_id(comp.adapter_user_id, f"components[{i}].adapter_user_id", allow_empty=True)
            if comp.adapter_user_id:
                require_user_access(principal, comp.adapter_user_id)
                if not self.core.user(comp.adapter_user_id).has_adapter:
                    raise _precondition(f"user {comp.adapter_user_id!r} has no adapter")
        return check_prior(list(mixture.prior), n)

    def _component_resolver(self, comp: pb.MixtureComponent):
        model = comp.specialist or BASE_MODEL

        async def resolve(excluded: Collection[str]) -> Route:
            if comp.adapter_user_id and not comp.node_id and model == BASE_MODEL:
                # The adapter's own node, where it already sits (placed there if it has none).
                user = self.core.user(comp.adapter_user_id)
                return await self.core.router.route_user(user, exclude=excluded)
            try:
                node = self.core.router.route_model(model, comp.node_id, excluded)
            except KeyError:
                raise _not_found(f"unknown node {comp.node_id!r}") from None
            return Route(node, comp.adapter_user_id)
        return resolve

    def _user_resolver(self, user: UserRecord | None, use_base: bool):
        async def resolve(excluded: Collection[str]) -> Route:
            fresh = self.core.registry.get_user(user.user_id) if user is not None else None
            return await self.core.router.route_user(fresh, use_base=use_base, exclude=excluded)
        return resolve

    def _note_failover(self, failed_over: bool, user_id: str) -> None:
        if failed_over:
            self.core.traffic.failed_over(user_id)

    # --- scoring -------------------------------------------------------------------------------

    @handles_errors
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreReply:
        principal, user = self._principal_for(context, request.user_id)
        text = check_text(request.text, "text", self.core.config.max_text_chars)
        prior = self._check_mixture(request.mixture, principal) if request.HasField("mixture") else None
        ids = self._encode(text, "text", min_tokens=2)
        codec = self.core.codec
        scored = ids[1:]
        first_chars = 0 if self.core.bos_id is not None else len(codec.decode(ids[:1]))
        reply = pb.ScoreReply(user_id=request.user_id, token_ids=scored,
                              scored_chars=max(1, len(text) - first_chars))
        if not request.omit_token_strings:
            reply.tokens.extend(codec.decode([i]) for i in scored)
        if request.HasField("mixture"):
            logps = await self._score_mixture(request, reply, ids, prior, context)
        else:
            logps = await self._score_single(request, reply, user, ids, context)
        reply.logprobs.extend(logps.tolist())
        total = float(logps.sum())
        reply.perplexity = math.exp(-total / len(logps))
        reply.bits_per_char = -total / math.log(2) / reply.scored_chars
        return reply

    async def _score_single(self, request: pb.ScoreRequest, reply: pb.ScoreReply, user: UserRecord | None,
                            ids: list[int], context) -> np.ndarray:
        async def call(route: Route) -> pb.ScoreTokensReply:
            req = pb.ScoreTokensRequest(token_ids=ids, user_id=route.adapter_user_id)
            return await self.core.clients.unary(route.node, "ScoreTokens", req, kind=pb.BYTE_KIND_SCORE,
                                                 user_id=request.user_id, timeout=self.core.timeout(context))

        result, route, failed_over = await self.core.with_failover(self._user_resolver(user, request.use_base), call,
                                                                   time_left=context.time_remaining)
        self._note_failover(failed_over, request.user_id)
        reply.node_id = route.node.node_id
        reply.model = _model_label(route)
        reply.failed_over = failed_over
        return _check_logprobs(result.logprobs, len(ids) - 1, route.node.node_id)

    async def _score_mixture(self, request: pb.ScoreRequest, reply: pb.ScoreReply, ids: list[int],
                             prior: list[float] | None, context) -> np.ndarray:
        comps = list(request.mixture.components)

        async def one(comp: pb.MixtureComponent) -> tuple[np.ndarray, Route, bool]:
            async def call(route: Route) -> pb.ScoreTokensReply:
                req = pb.ScoreTokensRequest(token_ids=ids, user_id=route.adapter_user_id)
                return await self.core.clients.unary(route.node, "ScoreTokens", req, kind=pb.BYTE_KIND_MIXTURE,
                                                     user_id=request.user_id, timeout=self.core.timeout(context))
            result, route, failed_over = await self.core.with_failover(self._component_resolver(comp), call,
                                                                       time_left=context.time_remaining)
            return _check_logprobs(result.logprobs, len(ids) - 1, route.node.node_id), route, failed_over

        results = await first_error([one(c) for c in comps])
        logps = np.stack([r[0] for r in results])  # (N, T)
        mixed = score_mixture(logps, request.mixture.mode, prior)
        reply.model = "mixture"
        reply.failed_over = any(r[2] for r in results)
        self._note_failover(reply.failed_over, request.user_id)
        for i, (comp, (lp, route, _)) in enumerate(zip(comps, results)):
            reply.components.add(component=comp, node_id=route.node.node_id, logprobs=lp.tolist(),
                                 attribution=mixed.attribution[i].tolist(),
                                 final_weight=float(mixed.final_weights[i]),
                                 perplexity=math.exp(-float(lp.mean())))
        return mixed.logprobs

    # --- generation ----------------------------------------------------------------------------

    @handles_stream_errors
    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        principal, user = self._principal_for(context, request.user_id)
        cfg = self.core.config
        check_text(request.prompt, "prompt", cfg.max_text_chars)
        check_int(request.max_new_tokens, "max_new_tokens", 1, cfg.max_new_tokens)
        check_float(request.temperature, "temperature", 0.0, _MAX_TEMPERATURE)
        codec = self.core.require_codec()
        check_int(request.top_k, "top_k", 0, codec.vocab_size)
        check_int(request.wire_top_k, "wire_top_k", 0, codec.vocab_size)
        prior = self._check_mixture(request.mixture, principal) if request.HasField("mixture") else None
        ids = self._encode(request.prompt, "prompt", min_tokens=1)
        if request.HasField("mixture"):
            stream = self._generate_mixture(request, ids, prior, context)
        else:
            stream = self._generate_single(request, user, ids, context)
        async for chunk in stream:
            yield chunk

    async def _generate_single(self, request: pb.GenerateRequest, user: UserRecord | None, ids: list[int],
                               context) -> AsyncIterator[pb.GenerateChunk]:
        """One node's generation, failed over before the first token like any call, and resumed on
        another node when its node dies mid-stream: the new node continues from the prompt and the
        tokens already sent (``GenerateChunk.node_id`` shows the switch). A greedy continuation is
        the one the first node would have produced; a sampled one draws with seed ``seed + index``."""
        codec = self.core.codec
        node_request = pb.NodeGenerateRequest(token_ids=ids, max_new_tokens=request.max_new_tokens,
                                              temperature=request.temperature, top_k=request.top_k,
                                              seed=request.seed)
        dead: set[str] = set()  # nodes that died mid-stream: not resumed on

        async def first(route: Route):
            node_request.user_id = route.adapter_user_id
            stream = self.core.clients.generate(route.node, node_request, user_id=request.user_id,
                                                timeout=self.core.timeout(context))
            return stream, await anext(stream, None)

        resolver = self._user_resolver(user, request.use_base)

        async def resolve(excluded: Collection[str]) -> Route:
            return await resolver(set(excluded) | dead)

        (stream, token), route, failed_over = await self.core.with_failover(resolve, first,
                                                                            time_left=context.time_remaining)
        self._note_failover(failed_over, request.user_id)
        decoder = IncrementalDecoder(codec)
        generated: list[int] = []
        try:
            while token is not None:
                if token.token_id >= codec.vocab_size:
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
                    if not node_down(err) or len(dead) >= self.core.config.max_failover:
                        raise
                    # the node died mid-stream: resume the rest on another node
                    await stream.aclose()
                    await self.core.take_out(route.node)
                    dead.add(route.node.node_id)
                    node_request.token_ids[:] = (ids + generated)[-self.core.config.max_tokens:]
                    node_request.max_new_tokens = request.max_new_tokens - len(generated)
                    node_request.seed = request.seed + len(generated)
                    (stream, token), route, _ = await self.core.with_failover(resolve, first,
                                                                              time_left=context.time_remaining)
                    self._note_failover(True, request.user_id)
        except grpc.aio.AioRpcError as err:
            raise node_error(route.node, err) from None
        finally:
            await stream.aclose()

    async def _generate_mixture(self, request: pb.GenerateRequest, ids: list[int], prior: list[float] | None,
                                context) -> AsyncIterator[pb.GenerateChunk]:
        codec = self.core.codec
        comps = list(request.mixture.components)
        mode = request.mixture.mode
        log_w = np.log(normalised_prior(prior, len(comps)))  # (N,)
        rng = np.random.default_rng(request.seed)
        decoder = IncrementalDecoder(codec)
        prefix = list(ids)
        max_ctx = self.core.config.max_tokens

        async def one(comp: pb.MixtureComponent) -> np.ndarray:
            async def call(route: Route) -> pb.NextTokenReply:
                req = pb.NextTokenRequest(token_ids=prefix[-max_ctx:], user_id=route.adapter_user_id,
                                          top_k=request.wire_top_k)
                return await self.core.clients.unary(route.node, "NextTokenDistribution", req,
                                                     kind=pb.BYTE_KIND_GENERATE, user_id=request.user_id,
                                                     timeout=self.core.timeout(context))
            reply, route, _ = await self.core.with_failover(self._component_resolver(comp), call,
                                                            time_left=context.time_remaining)
            try:
                return distribution_from_reply(reply, codec.vocab_size)
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

    # --- listings and statistics ---------------------------------------------------------------

    @handles_errors
    async def ListNodes(self, request: pb.ListNodesRequest, context) -> pb.ListNodesReply:
        principal = self.core.auth.client(context.invocation_metadata())
        check_enum(request.state, "state", pb.NodeState.values())
        visible = None if principal.is_admin else principal.user_id
        nodes = self.core.registry.nodes(request.state or None)
        return pb.ListNodesReply(nodes=[self.core.node_info(n, visible) for n in nodes])

    @handles_errors
    async def ListUsers(self, request: pb.ListUsersRequest, context) -> pb.ListUsersReply:
        principal = self.core.auth.client(context.invocation_metadata())
        check_id(request.persona, "persona", allow_empty=True)
        if principal.is_admin:
            users = self.core.registry.users(request.persona)
        else:
            own = self.core.registry.get_user(principal.user_id)
            users = [own] if own is not None and request.persona in ("", own.persona) else []
        return pb.ListUsersReply(users=[self.core.user_info(u) for u in users])

    @handles_errors
    async def GetStats(self, request: pb.GetStatsRequest, context) -> pb.Stats:
        principal = self.core.auth.client(context.invocation_metadata())
        check_id(request.user_id, "user_id", allow_empty=True)
        if principal.is_admin:
            return self._stats(request.user_id or None)
        if request.user_id and request.user_id != principal.user_id:
            require_user_access(principal, request.user_id)
        return self._stats(principal.user_id)

    def _stats(self, user_id: str | None) -> pb.Stats:
        stats = self.core.traffic.stats(user_id)
        if user_id is None:
            counters = self.core.guard.counters
            stats.requests_ok = counters.ok.get("Federation", 0)
            stats.requests_failed = counters.failed.get("Federation", 0)
            stats.requests_shed = counters.shed.get("Federation", 0)
            stats.requests_failed_over = self.core.traffic.requests_failed_over
        else:
            stats.requests_failed_over = self.core.traffic.requests_failed_over_by_user.get(user_id, 0)
        return stats

    @handles_errors
    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.Adapter:
        _, user = self._principal_for(context, request.user_id)
        if user is None:
            raise invalid("user_id is empty")
        if not user.has_adapter:
            raise _not_found(f"user {user.user_id!r} has no adapter")
        return pb.Adapter(user_id=user.user_id, format=user.adapter_format, data=user.adapter,
                          sha256=user.adapter_sha256 or b"")

    # --- admin ---------------------------------------------------------------------------------

    @handles_errors
    async def PutUser(self, request: pb.PutUserRequest, context) -> pb.PutUserReply:
        self.core.auth.admin(context.invocation_metadata())
        user_id = check_id(request.user_id, "user_id")
        check_id(request.persona, "persona", allow_empty=True)
        adapter = request.adapter if request.HasField("adapter") and request.adapter.data else None
        sha = None
        if adapter is not None:
            if adapter.user_id and adapter.user_id != user_id:
                raise invalid(f"adapter.user_id {adapter.user_id!r} differs from user_id {user_id!r}")
            sha = hashlib.sha256(adapter.data).digest()
            if adapter.sha256 and adapter.sha256 != sha:
                raise invalid("adapter.sha256 does not match the adapter's data")
            check_id(adapter.format, "adapter.format", allow_empty=True)
        existing = self.core.registry.get_user(user_id)
        token = new_token() if existing is None or request.rotate_token else ""
        user = self.core.registry.put_user(
            user_id, persona=request.persona if (request.persona or existing is None) else None,
            adapter=adapter.data if adapter is not None else None,
            adapter_format=(adapter.format or "safetensors") if adapter is not None else "safetensors",
            adapter_sha256=sha, token_hash=hash_token(token) if token else None)
        if adapter is not None and user.node_id:
            node = self.core.registry.get_node(user.node_id)
            if node is not None and node.healthy:
                try:
                    await self.core.install(node, user)
                except Exception:  # noqa: BLE001 - the next request reinstalls it (NOT_FOUND path)
                    pass
        return pb.PutUserReply(user=self.core.user_info(user), token=token)

    @handles_errors
    async def DeleteUser(self, request: pb.DeleteUserRequest, context) -> pb.DeleteUserReply:
        self.core.auth.admin(context.invocation_metadata())
        user = self.core.user(check_id(request.user_id, "user_id"))
        await self.core.uninstall(user.node_id, user.user_id)
        return pb.DeleteUserReply(deleted=self.core.registry.delete_user(user.user_id))

    @handles_errors
    async def PutBundle(self, request_iterator, context) -> pb.BundleRef:
        self.core.auth.admin(context.invocation_metadata())
        writer = None
        try:
            async for chunk in request_iterator:
                if writer is None:
                    name = check_bundle_name(chunk.name)
                    check_int(chunk.total_size, "total_size", 0, _MAX_BUNDLE_BYTES)
                    if len(chunk.sha256) != 32:
                        raise invalid("the first chunk must carry the bundle's 32-byte sha256")
                    check_id(chunk.model, "model", allow_empty=True)
                    check_id(chunk.codec, "codec", allow_empty=True)
                    writer = self.core.store.writer(name, size=chunk.total_size, sha256=chunk.sha256,
                                                    model=chunk.model, codec=chunk.codec)
                elif chunk.name and chunk.name != writer.name:
                    raise invalid(f"chunk names bundle {chunk.name!r} in a stream for {writer.name!r}")
                writer.write(chunk.offset, chunk.data)
            if writer is None:
                raise invalid("PutBundle stream carried no chunk")
            meta = writer.commit()
            writer = None
        except BundleIntegrityError as err:
            raise _precondition(str(err)) from None
        finally:
            if writer is not None:
                writer.abort()
        return pb.BundleRef(name=meta.name, size=meta.size, sha256=meta.sha256, model=meta.model, codec=meta.codec)

    @handles_errors
    async def ListBundles(self, request: pb.ListBundlesRequest, context) -> pb.ListBundlesReply:
        self.core.auth.admin(context.invocation_metadata())
        return pb.ListBundlesReply(bundles=[
            pb.BundleRef(name=b.name, size=b.size, sha256=b.sha256, model=b.model, codec=b.codec)
            for b in self.core.store.list()])

    @handles_errors
    async def AssignUser(self, request: pb.AssignUserRequest, context) -> pb.AssignUserReply:
        self.core.auth.admin(context.invocation_metadata())
        user = self.core.user(check_id(request.user_id, "user_id"))
        check_id(request.node_id, "node_id", allow_empty=True)
        if not user.has_adapter:
            raise _precondition(f"user {user.user_id!r} has no adapter to place")
        previous = user.node_id
        if request.node_id:
            node = self.core.registry.get_node(request.node_id)
            if node is None:
                raise _not_found(f"unknown node {request.node_id!r}")
            if not node.healthy:
                raise _precondition(f"node {node.node_id!r} is {pb.NodeState.Name(node.state)}")
            await self.core.install(node, user)
            self.core.registry.assign_user(user.user_id, node.node_id)
        else:
            node = await self.core.router.place(user)
        if previous and previous != node.node_id:
            await self.core.uninstall(previous, user.user_id)
        return pb.AssignUserReply(user=self.core.user_info(self.core.user(user.user_id)),
                                  bytes_shipped=len(user.adapter))

    @handles_errors
    async def SetNodeState(self, request: pb.SetNodeStateRequest, context) -> pb.NodeInfo:
        self.core.auth.admin(context.invocation_metadata())
        check_id(request.node_id, "node_id")
        check_enum(request.state, "state", (pb.NODE_STATE_HEALTHY, pb.NODE_STATE_DRAINING, pb.NODE_STATE_DOWN))
        if not self.core.registry.set_node_state(request.node_id, request.state):
            raise _not_found(f"unknown node {request.node_id!r}")
        return self.core.node_info(self.core.registry.get_node(request.node_id))

    @handles_errors
    async def GetRoutingStats(self, request: pb.GetRoutingStatsRequest, context) -> pb.RoutingStats:
        self.core.auth.admin(context.invocation_metadata())
        check_id(request.node_id, "node_id", allow_empty=True)
        records = self.core.registry.routing(request.node_id)
        reply = pb.RoutingStats()
        total = None
        for r in records:
            reply.histograms.add(node_id=r.node_id, n_blocks=r.counts.shape[0], n_experts=r.counts.shape[1],
                                 counts=r.counts.ravel().tolist(), tokens=r.tokens)
            if total is None:
                total, tokens = r.counts.copy(), r.tokens
            elif total.shape == r.counts.shape:
                total += r.counts
                tokens += r.tokens
        if total is not None:
            reply.total.CopyFrom(pb.RoutingHistogram(n_blocks=total.shape[0], n_experts=total.shape[1],
                                                     counts=total.ravel().tolist(), tokens=tokens))
        return reply

    @handles_errors
    async def ResetStats(self, request: pb.ResetStatsRequest, context) -> pb.Stats:
        self.core.auth.admin(context.invocation_metadata())
        self.core.traffic.reset()
        return self._stats(None)

    @handles_errors
    async def InstantiateSoup(self, request: pb.SoupRequest, context) -> pb.InstantiateSoupReply:
        self.core.auth.admin(context.invocation_metadata())
        node = self.core.registry.get_node(check_id(request.node_id, "node_id"))
        if node is None:
            raise _not_found(f"unknown node {request.node_id!r}")
        if not node.healthy:
            raise _precondition(f"node {node.node_id!r} is {pb.NodeState.Name(node.state)}")
        weights = list(request.domain_weights)
        if bool(weights) == bool(request.sample_text):
            raise invalid("give exactly one of domain_weights and sample_text")
        check_int(len(weights), "domain_weights count", 0, _MAX_SOUP_DOMAINS)
        for i, w in enumerate(weights):
            check_float(w, f"domain_weights[{i}]", 0.0, 1.0)
        node_request = pb.InstantiateSoupRequest(domain_weights=weights)
        if request.sample_text:
            check_text(request.sample_text, "sample_text", self.core.config.max_text_chars)
            ids = self.core.require_codec().encode(request.sample_text)
            if not ids:
                raise invalid("sample_text tokenizes to no tokens")
            node_request.sample_token_ids.extend(ids)
        try:
            reply = await self.core.clients.unary(node, "InstantiateSoup", node_request, kind=pb.BYTE_KIND_CONTROL,
                                                  timeout=self.core.timeout(context))
            # kept, so that the node serves the same specialist again after a restart
            self.core.registry.set_soup(node.node_id, pb.InstantiateSoupRequest(
                domain_weights=reply.domain_weights).SerializeToString())
            return reply
        except grpc.aio.AioRpcError as err:
            # the node judges h against its bank (domain count, sum) and whether it holds one: the
            # caller's mistakes, so they keep their code; anything else is the node's failure
            if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                raise RequestError(err.code(), f"node {node.node_id}: {err.details()}") from None
            raise node_error(node, err) from None
