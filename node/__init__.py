"""A federation node: assembles its model from shipped bundles and serves its users.

Dependency rule: imports ``model`` and ``proto`` only; never ``coordinator`` or ``sim``.
"""
