"""The client-facing ``Federation`` service: its entry points, listings and statistics.

Score and Generate check the request, authenticate, read the user once (without the adapter
blob), tokenize, and hand over to :mod:`coordinator.scoring` and :mod:`coordinator.generation`;
the admin RPCs live in :mod:`coordinator.admin`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc

from .admin import AdminRPCs
from .auth import Principal, require_user_access
from .core import Core, handles_errors, handles_stream_errors, not_found, precondition
from .generation import generate_mixture, generate_single
from .limits import (
    attribute_call,
    check_enum,
    check_float,
    check_id,
    check_int,
    check_prior,
    check_text,
    check_token_count,
    invalid,
)
from .registry import UserRecord
from .scoring import score

_MODES = (pb.MIXTURE_MODE_UNSPECIFIED, pb.MIXTURE_MODE_UNIFORM, pb.MIXTURE_MODE_POSTERIOR)
_MAX_TEMPERATURE = 10.0


class FederationService(AdminRPCs, rpc.FederationServicer):
    """Implements ``fractal.federation.v1.Federation``."""

    def __init__(self, core: Core) -> None:
        self.core = core

    # --- what every request does first ------------------------------------------------------------

    def _principal_for(self, context, user_id: str, *,
                       with_adapter: bool = False) -> tuple[Principal, UserRecord | None]:
        """Authenticate; check the token reaches ``user_id`` ("" = none) and read the user, once;
        without its adapter blob unless asked (a request that moves the adapter reads it then)."""
        principal = self.core.auth.client(context.invocation_metadata())
        check_id(user_id, "user_id", allow_empty=True)
        if not user_id:
            return principal, None
        require_user_access(principal, user_id)
        attribute_call(user_id)
        return principal, self.core.user(user_id, with_adapter=with_adapter)

    def _encode(self, text: str, what: str, *, min_tokens: int) -> list[int]:
        ids = self.core.require_tokenizer().encode(text)
        if self.core.bos_id is not None:
            ids = [self.core.bos_id, *ids]
        if min_tokens >= 2:
            check_token_count(len(ids), self.core.config.max_tokens, what)
        elif not ids:
            raise invalid(f"{what} tokenizes to no tokens")
        elif len(ids) > self.core.config.max_tokens:
            raise invalid(f"{what} tokenizes to {len(ids)} tokens; the limit is {self.core.config.max_tokens}")
        return ids

    def _check_mixture(self, mixture: pb.MixtureSpec, principal: Principal,
                       user: UserRecord | None) -> tuple[list[float] | None, dict[str, UserRecord]]:
        """The mixture's prior, and the users whose adapters its components apply (each read once;
        the request's own user is not read again)."""
        n = len(mixture.components)
        check_int(n, "mixture.components count", 1, self.core.config.max_mixture_components)
        check_enum(mixture.mode, "mixture.mode", _MODES)
        adapters = {user.user_id: user} if user is not None else {}
        for i, comp in enumerate(mixture.components):
            check_id(comp.specialist, f"components[{i}].specialist", allow_empty=True)
            check_id(comp.node_id, f"components[{i}].node_id", allow_empty=True)
            check_id(comp.adapter_user_id, f"components[{i}].adapter_user_id", allow_empty=True)
            if comp.adapter_user_id:
                require_user_access(principal, comp.adapter_user_id)
                owner = adapters.get(comp.adapter_user_id) or self.core.user(comp.adapter_user_id, with_adapter=False)
                if not owner.has_adapter:
                    raise precondition(f"user {comp.adapter_user_id!r} has no adapter")
                adapters[owner.user_id] = owner
        return check_prior(list(mixture.prior), n), adapters

    # --- scoring and generation -------------------------------------------------------------------

    @handles_errors
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreReply:
        principal, user = self._principal_for(context, request.user_id)
        check_text(request.text, "text", self.core.config.max_text_chars)
        prior, adapters = (self._check_mixture(request.mixture, principal, user) if request.HasField("mixture")
                           else (None, {}))
        ids = self._encode(request.text, "text", min_tokens=2)
        return await score(self.core, request, context, user=user, ids=ids, prior=prior, adapters=adapters)

    @handles_stream_errors
    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        principal, user = self._principal_for(context, request.user_id)
        cfg = self.core.config
        check_text(request.prompt, "prompt", cfg.max_text_chars)
        check_int(request.max_new_tokens, "max_new_tokens", 1, cfg.max_new_tokens)
        check_float(request.temperature, "temperature", 0.0, _MAX_TEMPERATURE)
        tokenizer = self.core.require_tokenizer()
        check_int(request.top_k, "top_k", 0, tokenizer.vocab_size)
        check_int(request.wire_top_k, "wire_top_k", 0, tokenizer.vocab_size)
        if request.HasField("mixture"):
            prior, adapters = self._check_mixture(request.mixture, principal, user)
            ids = self._encode(request.prompt, "prompt", min_tokens=1)
            stream = generate_mixture(self.core, request, ids, prior, adapters, context)
        else:
            ids = self._encode(request.prompt, "prompt", min_tokens=1)
            stream = generate_single(self.core, request, user, ids, context)
        async for chunk in stream:
            yield chunk

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
            if request.user_id:
                self.core.user(request.user_id, with_adapter=False)  # NOT_FOUND, as every other RPC
            return self.core.stats(request.user_id or None)
        if request.user_id and request.user_id != principal.user_id:
            require_user_access(principal, request.user_id)
        return self.core.stats(principal.user_id)

    @handles_errors
    async def GetAdapter(self, request: pb.GetAdapterRequest, context) -> pb.Adapter:
        _, user = self._principal_for(context, request.user_id, with_adapter=True)
        if user is None:
            raise invalid("user_id is empty")
        if not user.has_adapter:
            raise not_found(f"user {user.user_id!r} has no adapter")
        assert user.adapter is not None  # read with_adapter=True, and has_adapter
        return pb.Adapter(user_id=user.user_id, format=user.adapter_format, data=user.adapter,
                          sha256=user.adapter_sha256 or b"")
