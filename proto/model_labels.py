"""The label that says which model scored a request (``ScoreReply.model``, ``ScoreTokensReply.model``).

One rule for the node that serves and the coordinator that answers the client:
``"base"``, ``"adapter:<user>"`` (the base with a user's adapter), ``"specialist:<name>"``,
``"soup:h=0.700,0.000,0.300"`` (a Soup-of-Experts node's instantiation for domain weights h),
the last two optionally followed by ``"+adapter:<user>"``.

Dependency rule: this module imports nothing else of ours.
"""

from __future__ import annotations

from collections.abc import Sequence

BASE_MODEL = "base"


def soup_label(h: Sequence[float]) -> str:
    """The label of a specialist instantiated from a Soup-of-Experts bank for domain weights ``h``."""
    return "soup:h=" + ",".join(f"{v:.3f}" for v in h)


def model_label(model: str, adapter_user: str = "", *, soup_h: Sequence[float] | None = None) -> str:
    """What scored a request on a node registered with ``model``, with ``adapter_user``'s adapter.

    ``soup_h``: the domain weights a soup node instantiated (None when it has not, or is no soup node).
    """
    if soup_h is not None:
        served = soup_label(soup_h)
    elif model in ("", BASE_MODEL):
        return f"adapter:{adapter_user}" if adapter_user else BASE_MODEL
    else:
        served = f"specialist:{model}"
    return f"{served}+adapter:{adapter_user}" if adapter_user else served
