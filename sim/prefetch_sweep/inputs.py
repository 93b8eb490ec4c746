"""The sweep's inputs: expert sizes under the shipped codec, users' request windows, their routes, node links."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from coordinator.prefetch import NodeLinks, Request, idle_links, route_trace
from model.codecs import encode_state_dict
from model.fractal_moe import FractalMoE, expert_of

from ..network import assign_links, get_link
from ..scenario import Scenario

REMOTE_PEER = "fibre"  # the link of the node that answers remote expert calls


class SweepError(ValueError):
    """The sweep cannot run as the scenario asks (e.g. requests longer than the model's context)."""


def expert_sizes(state: dict[str, torch.Tensor], *, expert_codec: str) -> np.ndarray:
    """Each expert's compressed size, (L, E) int64: the payload bytes of its tensors under ``expert_codec``.

    Encodes the expert tensors with the same codec the bundles ship (``model.codecs``), so entropy-coded
    or pruned experts get their real, unequal sizes.
    """
    where = {k: at for k in state if (at := expert_of(k)) is not None}  # name -> (block, expert)
    experts = {k: state[k] for k in where}
    if not experts:
        raise SweepError("the model's state holds no expert tensors")
    L = 1 + max(b for b, _ in where.values())
    E = 1 + max(e for _, e in where.values())
    sizes = np.zeros((L, E), dtype=np.int64)  # (L, E)
    for enc in encode_state_dict(experts, expert_codec=expert_codec):
        b, e = where[enc.name]
        sizes[b, e] += len(enc.payload)
    return sizes


def windows(ids: torch.Tensor, length: int, count: int) -> list[np.ndarray]:
    """Up to ``count`` consecutive, non-overlapping windows of ``length`` tokens from the start of ``ids``."""
    n = min(count, len(ids) // length)
    return [ids[i * length:(i + 1) * length].numpy() for i in range(n)]


def interleave(per_user: dict[str, list[np.ndarray]], total: int) -> list[tuple[str, np.ndarray]]:
    """(user, window) pairs dealt round-robin over users (each user's windows in order), the first ``total``."""
    rounds = itertools.zip_longest(*([(u, w) for w in ws] for u, ws in per_user.items()))
    return [pair for rnd in rounds for pair in rnd if pair is not None][:total]


def build_requests(model: FractalMoE, pairs: Sequence[tuple[str, np.ndarray]], user_node: dict[str, str], *,
                   prompt_len: int, gap_s: float, hidden: bool) -> list[Request]:
    """Requests for ``pairs`` (user, tokens (T,)), the i-th arriving at ``(i + 1) * gap_s``, with the full
    model's routes (L, T) and, with ``hidden``, the prompt's MoE inputs (L, P, C) for next-block."""
    out = []
    for i, (user, ids) in enumerate(pairs):
        routes, states = route_trace(model, ids, hidden=hidden)  # (L, T), (L, T, C) | None
        out.append(Request(user=user, token_ids=ids, routes=routes, prompt_len=prompt_len,
                           prompt_hidden=None if states is None else states[:, :prompt_len],
                           start_s=(i + 1) * gap_s, node=user_node[user]))
    return out


def node_links(scn: Scenario, node_ids: Sequence[str]) -> dict[str, NodeLinks]:
    """Each node's idle links from the scenario's link profiles; remote calls go to a fibre peer."""
    profiles = assign_links(len(node_ids), default=scn.network.default_link, ranges=scn.network.links,
                            profiles=scn.network.profiles)
    peer = get_link(REMOTE_PEER)
    return {nid: idle_links(p, peer) for nid, p in zip(node_ids, profiles)}
