"""The admin RPCs of the ``Federation`` service: users, bundles, placement, node states, soups."""

from __future__ import annotations

import contextlib
import hashlib

import grpc

from model.adapter_blob import AdapterError, check_adapter_blob
from proto import federation_pb2 as pb

from .auth import hash_token, new_token
from .core import Core, handles_errors, not_found, precondition
from .dispatch import node_error
from .limits import (
    RequestError,
    check_bundle_name,
    check_codec,
    check_enum,
    check_float,
    check_id,
    check_int,
    check_text,
    invalid,
)
from .store import BundleIntegrityError

_MAX_BUNDLE_BYTES = 1 << 40
_MAX_SOUP_DOMAINS = 256


class AdminRPCs:
    """The admin token's half of ``fractal.federation.v1.Federation`` (mixed into its servicer)."""

    core: Core

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
            try:
                # refused here, not later by every node that would be asked to install it
                check_adapter_blob(adapter.data, self.core.adapter_shapes(), fmt=adapter.format, who="adapter")
            except AdapterError as err:
                raise invalid(str(err)) from None
        existing = self.core.registry.get_user(user_id, with_adapter=False)
        token = new_token() if existing is None or request.rotate_token else ""
        user = self.core.registry.put_user(
            user_id, persona=request.persona if (request.persona or existing is None) else None,
            adapter=adapter.data if adapter is not None else None,
            adapter_format=(adapter.format or "safetensors") if adapter is not None else "safetensors",
            adapter_sha256=sha, token_hash=hash_token(token) if token else None)
        if adapter is not None and user.node_id:
            node = self.core.registry.get_node(user.node_id)
            if node is not None and node.healthy:
                with contextlib.suppress(Exception):  # the next request reinstalls it (NOT_FOUND path)
                    await self.core.install(node, user)
        return pb.PutUserReply(user=self.core.user_info(user), token=token)

    @handles_errors
    async def DeleteUser(self, request: pb.DeleteUserRequest, context) -> pb.DeleteUserReply:
        self.core.auth.admin(context.invocation_metadata())
        user = self.core.user(check_id(request.user_id, "user_id"), with_adapter=False)
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
                    check_codec(chunk.codec)
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
            raise precondition(str(err)) from None
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
            raise precondition(f"user {user.user_id!r} has no adapter to place")
        previous = user.node_id
        if request.node_id:
            node = self.core.registry.get_node(request.node_id)
            if node is None:
                raise not_found(f"unknown node {request.node_id!r}")
            if not node.healthy:
                raise precondition(f"node {node.node_id!r} is {pb.NodeState.Name(node.state)}")
            await self.core.install(node, user)
            self.core.registry.assign_user(user.user_id, node.node_id)
        else:
            node = await self.core.dispatch.place(user)
        if previous and previous != node.node_id:
            await self.core.uninstall(previous, user.user_id)
        return pb.AssignUserReply(user=self.core.user_info(self.core.user(user.user_id, with_adapter=False)),
                                  bytes_shipped=user.adapter_bytes)

    @handles_errors
    async def SetNodeState(self, request: pb.SetNodeStateRequest, context) -> pb.NodeInfo:
        self.core.auth.admin(context.invocation_metadata())
        check_id(request.node_id, "node_id")
        check_enum(request.state, "state", (pb.NODE_STATE_HEALTHY, pb.NODE_STATE_DRAINING, pb.NODE_STATE_DOWN))
        if not self.core.registry.set_node_state(request.node_id, request.state):
            raise not_found(f"unknown node {request.node_id!r}")
        return self.core.node_info(self.core.registry.existing_node(request.node_id))

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
        return self.core.stats(None)

    @handles_errors
    async def InstantiateSoup(self, request: pb.SoupRequest, context) -> pb.InstantiateSoupReply:
        self.core.auth.admin(context.invocation_metadata())
        node = self.core.registry.get_node(check_id(request.node_id, "node_id"))
        if node is None:
            raise not_found(f"unknown node {request.node_id!r}")
        if not node.healthy:
            raise precondition(f"node {node.node_id!r} is {pb.NodeState.Name(node.state)}")
        weights = list(request.domain_weights)
        if bool(weights) == bool(request.sample_text):
            raise invalid("give exactly one of domain_weights and sample_text")
        check_int(len(weights), "domain_weights count", 0, _MAX_SOUP_DOMAINS)
        for i, w in enumerate(weights):
            check_float(w, f"domain_weights[{i}]", 0.0, 1.0)
        node_request = pb.InstantiateSoupRequest(domain_weights=weights)
        if request.sample_text:
            check_text(request.sample_text, "sample_text", self.core.config.max_text_chars)
            ids = self.core.require_tokenizer().encode(request.sample_text)
            if not ids:
                raise invalid("sample_text tokenizes to no tokens")
            node_request.sample_token_ids.extend(ids)
        try:
            reply = await self.core.clients.instantiate_soup(node, node_request, timeout=self.core.timeout(context))
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
