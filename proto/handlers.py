"""Registering a generated servicer with some of its handlers changed (counting, pass-through serializers).

The generated ``add_<Service>Servicer_to_server(servicer, server)`` is the one place that knows a
service's methods and their (de)serializers; :func:`registered_handlers` runs it against a stand-in
to get them, :func:`register` puts (changed) handlers on a real server the same way.
Dependency rule: imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


class _Collector:
    """Stands in for a server while a generated ``add_*Servicer_to_server`` registers its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # rebuilt from the registered handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service = service
        self.handlers = dict(handlers)


def registered_handlers(add_fn: Callable[[Any, Any], None], servicer: Any) -> tuple[str, dict[str, Any]]:
    """(full service name, {method: handler}) that the generated ``add_fn`` registers for ``servicer``."""
    collect = _Collector()
    add_fn(servicer, collect)
    return collect.service, collect.handlers


def register(server: Any, service: str, handlers: dict[str, Any]) -> None:
    """Register ``handlers`` of ``service`` on ``server`` as the generated code does."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
