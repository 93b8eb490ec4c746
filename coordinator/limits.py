"""Input validation with precise status codes, and the guard every RPC passes through.

Validators raise :class:`RequestError` (a status code and a one-line message); the servicers turn
it into the gRPC status. :class:`GuardInterceptor` caps concurrent RPCs per service (excess gets
RESOURCE_EXHAUSTED), turns undecodable requests into INVALID_ARGUMENT instead of gRPC's INTERNAL,
and counts outcomes.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import grpc

from proto.ids import BUNDLE_NAME_PATTERN, CODEC_PATTERN, ID_PATTERN, is_valid_bundle_name, is_valid_codec, is_valid_id


class RequestError(Exception):
    """A request the coordinator refuses: a gRPC status code and a one-line message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    """An INVALID_ARGUMENT error."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _show(value: object, limit: int = 40) -> str:
    """A short, printable rendering of client input for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_id(value: str, what: str, *, allow_empty: bool = False) -> str:
    """``value`` if it is a valid user/node id (or empty when allowed), else INVALID_ARGUMENT."""
    if value == "" and allow_empty:
        return value
    if not value:
        raise invalid(f"{what} is empty")
    if not is_valid_id(value):
        raise invalid(f"{what} {_show(value)} is not a valid id ({ID_PATTERN})")
    return value


def check_codec(value: str, what: str = "codec") -> str:
    """``value`` if it is empty or a valid codec name (proto.ids.CODEC_PATTERN), else INVALID_ARGUMENT."""
    if value and not is_valid_codec(value):
        raise invalid(f"{what} {_show(value)} is not a valid codec name ({CODEC_PATTERN})")
    return value


def check_bundle_name(name: str) -> str:
    """``name`` if it is a valid bundle name (never a path), else INVALID_ARGUMENT."""
    if not is_valid_bundle_name(name):
        raise invalid(f"bundle name {_show(name)} is not valid ({BUNDLE_NAME_PATTERN})")
    return name


def check_text(text: str, what: str, max_chars: int) -> str:
    """``text`` if it is non-empty and at most ``max_chars`` characters, else INVALID_ARGUMENT."""
    if not text:
        raise invalid(f"{what} is empty")
    if len(text) > max_chars:
        raise invalid(f"{what} has {len(text)} characters; the limit is {max_chars}")
    return text


def check_float(value: float, what: str, lo: float, hi: float) -> float:
    """``value`` if finite and in [lo, hi], else INVALID_ARGUMENT."""
    if not math.isfinite(value):
        raise invalid(f"{what} must be finite, got {value}")
    if not lo <= value <= hi:
        raise invalid(f"{what} must be in [{lo}, {hi}], got {value}")
    return value


def check_int(value: int, what: str, lo: int, hi: int) -> int:
    """``value`` if in [lo, hi], else INVALID_ARGUMENT."""
    if not lo <= value <= hi:
        raise invalid(f"{what} must be in [{lo}, {hi}], got {value}")
    return value


def check_enum(value: int, what: str, allowed: Iterable[int]) -> int:
    """``value`` if it is one of ``allowed`` enum numbers, else INVALID_ARGUMENT."""
    allowed = set(allowed)
    if value not in allowed:
        raise invalid(f"{what} {value} is not one of {sorted(allowed)}")
    return value


def check_prior(prior: list[float], n_components: int) -> list[float] | None:
    """Prior weights for a POSTERIOR mixture: empty (uniform) or n finite positive values."""
    if not prior:
        return None
    if len(prior) != n_components:
        raise invalid(f"prior has {len(prior)} values for {n_components} components")
    for i, p in enumerate(prior):
        if not math.isfinite(p) or p <= 0:
            raise invalid(f"prior[{i}] must be finite and > 0, got {p}")
    return list(prior)


def check_token_count(n: int, max_tokens: int, what: str = "text") -> None:
    """A scored sequence needs 2 to max_tokens tokens."""
    if n < 2:
        raise invalid(f"{what} tokenizes to {n} token(s); scoring needs at least 2")
    if n > max_tokens:
        raise invalid(f"{what} tokenizes to {n} tokens; the limit is {max_tokens}")


# ---------------------------------------------------------------------------------------------
# The guard: concurrency caps, safe deserialization, outcome counters
# ---------------------------------------------------------------------------------------------


class _Malformed:
    """Stands in for a request whose bytes did not decode; the guard answers INVALID_ARGUMENT."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as err:  # noqa: BLE001 - any decode failure is the client's malformed input
            return _Malformed(err)

    return decode


def _malformed_message(item: _Malformed) -> str:
    return f"malformed request: {type(item.error).__name__}: {str(item.error)[:120]}"


@dataclass
class RequestCounters:
    """Outcomes of capped RPCs, by service short name ("Federation", "NodeControl"), and of the
    Federation RPCs made for each user (``user_ok`` etc., by user id; see :func:`attribute_call`)."""

    ok: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    shed: dict[str, int] = field(default_factory=dict)
    user_ok: dict[str, int] = field(default_factory=dict)
    user_failed: dict[str, int] = field(default_factory=dict)
    user_shed: dict[str, int] = field(default_factory=dict)

    def bump(self, table: dict[str, int], service: str) -> None:
        """Add one to ``table[service]``."""
        table[service] = table.get(service, 0) + 1

    def tables(self) -> dict[str, dict[str, int]]:
        """Every table by its name (the names persistence uses)."""
        return {"ok": self.ok, "failed": self.failed, "shed": self.shed, "user_ok": self.user_ok,
                "user_failed": self.user_failed, "user_shed": self.user_shed}


class _Call:
    """Who one RPC is for; set by the servicer once it has authenticated the caller."""

    __slots__ = ("user_id",)

    def __init__(self) -> None:
        self.user_id = ""


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("fractal_call", default=None)


def attribute_call(user_id: str) -> None:
    """Count the RPC in progress (its outcome, once known) as one made for ``user_id``: the
    user of a user token, or the user an admin request names. Outside a guarded RPC: nothing."""
    call = _CALL.get()
    if call is not None and user_id:
        call.user_id = user_id


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Caps concurrent RPCs per service and rejects undecodable requests with INVALID_ARGUMENT.

    ``caps`` maps a fully qualified service name to its cap; services not listed (health,
    reflection) are neither capped nor counted, so a loaded server still answers health checks.
    """

    def __init__(self, caps: dict[str, int]) -> None:
        self.caps = dict(caps)
        self.inflight = dict.fromkeys(caps, 0)
        self.counters = RequestCounters()
        # the user behind a shed call's metadata ("" for none): set by the coordinator, which
        # knows the tokens; a shed call never reaches a servicer that could say it
        self.identify: Callable[[object], str] = lambda metadata: ""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        service = method.lstrip("/").split("/")[0]
        if handler is None or service not in self.caps:
            return handler
        short = service.rsplit(".", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, service, short),
                request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream, service, short),
                request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, service, short, streamed_input=True),
                request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return handler  # no bidirectional streams in this API

    async def _admit(self, service: str, short: str, context) -> _Call:
        if self.inflight[service] >= self.caps[service]:
            self.counters.bump(self.counters.shed, short)
            user_id = self.identify(context.invocation_metadata())
            if user_id:
                self.counters.bump(self.counters.user_shed, user_id)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{short}: {self.caps[service]} RPCs in flight; retry later")
        self.inflight[service] += 1
        call = _Call()
        _CALL.set(call)
        return call

    def _done(self, service: str, short: str, ok: bool, call: _Call) -> None:
        self.inflight[service] -= 1
        self.counters.bump(self.counters.ok if ok else self.counters.failed, short)
        if call.user_id:
            self.counters.bump(self.counters.user_ok if ok else self.counters.user_failed, call.user_id)

    def _unary(self, behavior, service: str, short: str, *, streamed_input: bool = False):
        async def wrapped(request, context):
            call = await self._admit(service, short, context)
            ok = False
            try:
                if streamed_input:
                    request = _checked_stream(request, context)
                elif isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _malformed_message(request))
                reply = await behavior(request, context)
                ok = context.code() in (None, grpc.StatusCode.OK)
                return reply
            finally:
                self._done(service, short, ok, call)
        return wrapped

    def _unary_stream(self, behavior, service: str, short: str):
        async def wrapped(request, context):
            call = await self._admit(service, short, context)
            ok = False
            try:
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _malformed_message(request))
                async for item in behavior(request, context):
                    yield item
                ok = context.code() in (None, grpc.StatusCode.OK)
            finally:
                self._done(service, short, ok, call)
        return wrapped


async def _checked_stream(requests: AsyncIterator, context) -> AsyncIterator:
    async for item in requests:
        if isinstance(item, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _malformed_message(item))
        yield item

