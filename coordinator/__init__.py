"""The gRPC coordinator: registry, bundle store and shipping, routing, prefetch planning, mixture.

Dependency rule: imports ``model`` and ``proto`` only; never ``node`` or ``sim``.
"""
