"""The ``Node`` gRPC service of proto/federation.proto, served by every virtual node on its own port.

:class:`NodeService` maps the service onto a :class:`node.runtime.VirtualNode`: it checks the
caller's ``authorization: Bearer <node token>`` (UNAUTHENTICATED otherwise, compared in constant
time), turns the runtime's errors into their status codes (INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, DATA_LOSS, UNAVAILABLE...) and keeps the in-flight count.
:func:`start_node_server` starts a grpc.aio server for one node on ``host:port`` (port 0: a free
one) with byte counting on every message (``node.counting``).

One server per virtual node, not one shared server routing on a node-id header: a server costs
about 50 KB and one listening socket, the coordinator needs nothing beyond the address a node
registered (as with a real peer), and a node's traffic is separable by construction.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import torch

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.auth_metadata import AUTH_HEADER, bearer_value
from proto.message_limits import message_size_options

from .counting import add_counted_servicer
from .errors import InvalidRequest, NodeError, Unsupported
from .inference import top_k
from .runtime import VirtualNode

log = logging.getLogger(__name__)

MAX_CONCURRENT_RPCS = 64


def token_matches(metadata, token: str) -> bool:
    """True when the first ``authorization`` entry of ``metadata`` is exactly ``Bearer <token>``
    (constant-time compare; stricter than the coordinator's parse, since only the coordinator calls)."""
    expected = bearer_value(token).encode()
    for key, value in metadata or ():
        if key == AUTH_HEADER:
            got = value.encode() if isinstance(value, str) else bytes(value)
            return hmac.compare_digest(got, expected)
    return False


class NodeService(rpc.NodeServicer):
    """The Node service of one virtual node."""

    def __init__(self, node: VirtualNode, node_token: str) -> None:
        if not node_token:
            raise ValueError("a node needs a node token to check its callers against")
        self.node = node
        self._token = node_token

    @asynccontextmanager
    async def _call(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        if not token_matches(context.invocation_metadata(), self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong node token")
        self.node.inflight += 1
        try:
            yield
        except NodeError as exc:
            await context.abort(exc.code, str(exc))
        except (ValueError, RuntimeError) as exc:
            log.exception("node %s: unexpected error", self.node.node_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            self.node.inflight -= 1

    async def ScoreTokens(self, request: pb.ScoreTokensRequest, context) -> pb.ScoreTokensReply:
        """Log-probs of the observed tokens (n - 1 values), optionally the routes."""
        async with self._call(context):
            logps, routes = await self.node.score(request.token_ids, request.user_id)
            reply = pb.ScoreTokensReply(logprobs=logps.float().tolist(), node_id=self.node.node_id,
                                        model=self.node.label(request.user_id))
            if request.return_routes:
                reply.routes = routes.to(torch.uint8).contiguous().numpy().tobytes()  # (L, n) row-major
            return reply

    async def NextTokenDistribution(self, request: pb.NextTokenRequest, context) -> pb.NextTokenReply:
        """The next-token distribution: full (V log-probs) or top-k plus the log of the rest's mass."""
        async with self._call(context):
            self.node.check_top_k(request.top_k)
            logps = await self.node.next_token(request.token_ids, request.user_id)
            reply = pb.NextTokenReply(vocab_size=logps.numel(), node_id=self.node.node_id)
            if request.top_k == 0:
                reply.logprobs.extend(logps.float().tolist())
            else:
                ids, vals, rest = top_k(logps, request.top_k)
                reply.top_ids.extend(ids.tolist())
                reply.top_logprobs.extend(vals.float().tolist())
                reply.rest_logmass = rest
            return reply

    async def Generate(self, request: pb.NodeGenerateRequest, context) -> AsyncIterator[pb.NodeToken]:
        """Sampled tokens, one message each; the last carries the finish reason."""
        async with self._call(context):
            stream = await self.node.generate(
                request.token_ids, user_id=request.user_id, max_new_tokens=request.max_new_tokens,
                temperature=request.temperature, k=request.top_k, seed=request.seed, stop_ids=request.stop_ids)
            async for tok, logp, finish in stream:
                yield pb.NodeToken(token_id=tok, logprob=logp, finish_reason=finish)

    async def LoadUser(self, request: pb.LoadUserRequest, context) -> pb.LoadUserReply:
        """Install a user's adapter: the one sent, or (empty data) fetched from the coordinator."""
        async with self._call(context):
            a = request.adapter
            if not a.user_id:
                raise InvalidRequest("LoadUser needs adapter.user_id")
            if a.data:
                installed = self.node.load_adapter(a.user_id, a.data, fmt=a.format, sha256=a.sha256)
            else:
                installed = await self.node.fetch_user(a.user_id)
            return pb.LoadUserReply(user_id=installed.user_id, bytes=installed.nbytes)

    async def UnloadUser(self, request: pb.UnloadUserRequest, context) -> pb.UnloadUserReply:
        """Drop a user's adapter."""
        async with self._call(context):
            return pb.UnloadUserReply(unloaded=self.node.unload_user(request.user_id))

    async def InstallBundles(self, request: pb.InstallBundlesRequest, context) -> pb.InstallBundlesReply:
        """Fetch, verify and install whole bundles (all or nothing); returns when done."""
        async with self._call(context):
            if request.ranges and self.node.partial is None:
                raise Unsupported("byte ranges are installed by partial nodes only (a node started with a "
                                  "prefetch budget); ship whole bundles to this one")
            fetched = 0
            if request.ranges:
                assert self.node.partial is not None
                fetched += (await self.node.partial.apply_plan(list(request.ranges)))["bytes"]
            if request.bundles or not request.ranges:  # an empty request is refused by install
                fetched += (await self.node.install(list(request.bundles))).bytes_fetched
            return pb.InstallBundlesReply(installed=self.node.installed_names(), bytes_fetched=fetched)

    async def RunExpert(self, request: pb.RunExpertRequest, context) -> pb.RunExpertReply:
        """One expert on hidden states sent by a partial node that lacks it (its remote miss policy)."""
        async with self._call(context):
            return pb.RunExpertReply(output=await self.node.run_expert(request.block, request.expert, request.rows,
                                                                       request.hidden))

    async def InstantiateSoup(self, request: pb.InstantiateSoupRequest, context) -> pb.InstantiateSoupReply:
        """Serve the specialist of the node's Soup-of-Experts bank for the given or estimated h."""
        async with self._call(context):
            inst = await self.node.instantiate_soup(request.domain_weights, request.sample_token_ids)
            return pb.InstantiateSoupReply(node_id=self.node.node_id, bank=inst.bank, domains=inst.domains,
                                           domain_weights=inst.domain_weights, alpha=inst.alpha, model=inst.label)

    async def Status(self, request: pb.NodeStatusRequest, context) -> pb.NodeStatus:
        """What the node holds and its counters."""
        async with self._call(context):
            return self.node.status()


@dataclass
class NodeServer:
    """A running grpc.aio server of one virtual node."""

    server: grpc.aio.Server
    address: str
    port: int

    async def stop(self, grace: float | None = 0.5) -> None:
        """Stop serving (in-flight RPCs get ``grace`` seconds)."""
        await self.server.stop(grace)


async def start_node_server(node: VirtualNode, node_token: str, *, host: str = "127.0.0.1", port: int = 0,
                            max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
                            tls: tuple[bytes, bytes] | None = None) -> NodeServer:
    """Serve ``node``'s Node service on ``host:port`` (0: a free port), every message counted; with
    ``tls`` = (private key PEM, certificate chain PEM), over TLS only."""
    server = grpc.aio.server(
        options=[*message_size_options(), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    add_counted_servicer(rpc.add_NodeServicer_to_server, NodeService(node, node_token), server, node.counter)
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([tls]))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"node {node.node_id}: cannot bind {host}:{port}")
    await server.start()
    return NodeServer(server=server, address=f"{host}:{bound}", port=bound)
