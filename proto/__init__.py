"""The wire contract: federation.proto, its generated code, and the bundle format.

Dependency rule: this package imports nothing else of ours.
"""
