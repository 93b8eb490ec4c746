"""FractalMoE and everything that is pure model math.

Dependency rule: this package imports nothing else of ours (no proto, node, coordinator or sim),
and knows no network and no Ray. The one exception is the command-line entry point
``model/__main__.py``, whose ``export`` command hands encoded tensors to ``proto.bundle``.
"""
