"""Live prefetch planning: each partial node's experts chosen from routing statistics, sent by heartbeat.

A partial node (a node started with an expert budget, ``node.partial``) holds only the experts a plan
names. :class:`LivePlanner` is the coordinator's ``Core.prefetch_planner``: on every heartbeat of a
budgeted node it

1. learns from the routing histograms nodes uploaded (``ReportRouting``): the growth of each node's
   cumulative counts since the last look becomes a routing trace tagged with that node (a node stands for
   its users: their requests are what it routed), which every node's predictor observes; LRU and LFU,
   the per-node caches, observe their own node only;
2. scores experts with the node's predictor (any ``coordinator.prefetch.PREDICTORS`` that plans ahead:
   global, user, lru, lfu, random; the request-time ones need the prompt, which never leaves the node);
3. chooses with the knapsack (``select_experts``) on the experts' real compressed sizes (their byte
   ranges in the bundle's manifest): ``budget_experts`` per block, or ``budget_bytes`` over all blocks,
   one expert per block at least;
4. sends the plan as ``HeartbeatReply.prefetch`` byte ranges (``proto.expert_ranges``): the non-expert
   tensors first, then the chosen experts, most wanted first, only when it differs from the expert mask
   the node reported; and, for remote misses, the address of a node that holds every expert
   (``HeartbeatReply.expert_peer``);
5. for a node whose budget asks for it (``NodeBudget.prior``), sends the usage the plan was chosen from
   (``HeartbeatReply.router_prior``, rows normalised): the node adds ``beta * log(usage)`` to its router
   logits (``model.staged.router_prior``), so its users' tokens keep to the experts the plan holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.fractal_moe import expert_of
from proto import federation_pb2 as pb
from proto.bundle import HEADER_SIZE, Manifest, read_manifest
from proto.bundle.format import parse_header
from proto.expert_ranges import Span, span_bytes, tensor_groups

from .prefetch import Predictor, RequestContext, RoutingTrace, build_predictor, select_experts
from .registry import NodeRecord, Registry
from .store import BundleStore

LIVE_PREDICTORS = ("global", "user", "lru", "lfu", "random")  # the predictors that plan ahead of a request
NODE_CACHES = ("lru", "lfu")  # predictors that learn from their own node's routes only
PRIOR_PREDICTORS = ("global", "user", "lfu")  # predictors whose scores are usage counts or frequencies


class PlanError(ValueError):
    """A budget or predictor the planner cannot use."""


@dataclass(frozen=True, kw_only=True)
class NodeBudget:
    """A partial node's budget as the planner sees it."""

    source: str  # the bundle in the store its experts come from
    budget_experts: int = 0  # per block (0: budget_bytes)
    budget_bytes: int = 0  # expert payload bytes over all blocks (0: budget_experts)
    predictor: str = "user"
    prior: bool = False  # send the predicted usage as HeartbeatReply.router_prior (the node biases its router)

    def __post_init__(self) -> None:
        if (self.budget_experts > 0) == (self.budget_bytes > 0) or min(self.budget_experts, self.budget_bytes) < 0:
            raise PlanError(f"node budget of {self.source!r}: give exactly one of budget_experts and "
                            f"budget_bytes, > 0")
        if self.predictor not in LIVE_PREDICTORS:
            raise PlanError(f"live predictor must be one of {', '.join(LIVE_PREDICTORS)}, got {self.predictor!r}")
        if self.prior and self.predictor not in PRIOR_PREDICTORS:
            raise PlanError(f"a router prior needs a predictor that estimates usage "
                            f"({', '.join(PRIOR_PREDICTORS)}), got {self.predictor!r}")


def unpack_mask(data: bytes, n_blocks: int, n_experts: int) -> np.ndarray | None:
    """A bit-packed expert mask (federation.proto's convention: row-major, LSB first) as (L, E) bool;
    None when it is empty or of the wrong length."""
    n = n_blocks * n_experts
    if not data or len(data) != -(-n // 8):
        return None
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:n]  # (n,)
    return bits.reshape(n_blocks, n_experts).astype(bool)


@dataclass
class _Source:
    manifest: Manifest
    spans: dict[tuple[int, int] | None, list[Span]]
    sizes: np.ndarray  # (L, E) int64 payload bytes


@dataclass
class _NodePlan:
    budget: NodeBudget
    predictor: Predictor
    plans: int = 0
    last: list[tuple[int, int]] = field(default_factory=list)


class LivePlanner:
    """``Core.prefetch_planner`` for a federation with partial nodes (see the module docstring)."""

    def __init__(self, registry: Registry, store: BundleStore, budgets: dict[str, NodeBudget], *,
                 seed: int = 0) -> None:
        self.registry = registry
        self.store = store
        self.seed = seed
        self.budgets = dict(budgets)
        self._sources: dict[str, _Source] = {}
        self._nodes: dict[str, _NodePlan] = {}
        self._seen: dict[str, np.ndarray] = {}  # node -> cumulative counts already learnt from
        self.log: list[dict] = []  # one entry per plan sent

    def source(self, name: str) -> _Source:
        """The manifest, expert spans and sizes of bundle ``name`` (read from the store once)."""
        if name not in self._sources:
            _, chunks = self.store.read_chunks(name, 0, HEADER_SIZE)
            with_head = b"".join(d for _, d in chunks)
            chunks.close()
            mlen = parse_header(with_head).manifest_length
            _, chunks = self.store.read_chunks(name, 0, HEADER_SIZE + mlen)
            manifest = read_manifest(b"".join(d for _, d in chunks))
            chunks.close()
            spans = tensor_groups(manifest, expert_of)
            keys = [k for k in spans if k is not None]
            if not keys:
                raise PlanError(f"bundle {name!r} holds no experts")
            L, E = 1 + max(b for b, _ in keys), 1 + max(e for _, e in keys)
            sizes = np.zeros((L, E), dtype=np.int64)  # (L, E)
            for (b, e) in keys:
                sizes[b, e] = span_bytes(spans[(b, e)])
            self._sources[name] = _Source(manifest, spans, sizes)
        return self._sources[name]

    def _node(self, node_id: str) -> _NodePlan:
        if node_id not in self._nodes:
            budget = self.budgets[node_id]
            L, E = self.source(budget.source).sizes.shape
            self._nodes[node_id] = _NodePlan(budget, build_predictor(budget.predictor, n_layers=L, n_experts=E,
                                                                     seed=self.seed))
        return self._nodes[node_id]

    def learn(self) -> None:
        """Feed every budgeted node's predictor the routing that arrived since the last look."""
        for rec in self.registry.routing():
            counts = rec.counts.astype(np.int64)  # (L, E) cumulative
            seen = self._seen.get(rec.node_id)
            delta = counts if seen is None or seen.shape != counts.shape or (counts < seen).any() else counts - seen
            self._seen[rec.node_id] = counts
            per_block = delta.sum(axis=1)  # (L,) tokens per block: equal for one node's routes
            if not per_block.any() or (per_block != per_block[0]).any():
                continue
            E = counts.shape[1]
            routes = np.stack([np.repeat(np.arange(E), row) for row in delta])  # (L, T) one column per token
            for node_id in self.budgets:
                plan = self._node(node_id)
                if routes.shape[0] != plan.predictor.n_layers:  # type: ignore[attr-defined]
                    continue
                if plan.budget.predictor in NODE_CACHES and rec.node_id != node_id:
                    continue
                plan.predictor.observe(RoutingTrace(user=rec.node_id, routes=routes))

    def choose(self, node_id: str) -> list[tuple[int, int]]:
        """The experts ``node_id`` should hold, most wanted first."""
        plan = self._node(node_id)
        src = self.source(plan.budget.source)
        L, E = src.sizes.shape
        scores = np.asarray(plan.predictor.predict(RequestContext(user=node_id)), dtype=np.float64)  # (L, E)
        # ties (no evidence yet) go to the lower expert index; every score stays > 0 so any expert may be chosen
        scores = scores - scores.min() + 1e-6 + 1e-9 * (E - np.arange(E))[None, :]
        if plan.budget.budget_experts:
            k = min(plan.budget.budget_experts, E)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (L, k)
            mask = np.zeros((L, E), dtype=bool)
            np.put_along_axis(mask, top, True, axis=1)
        else:
            mask = select_experts(scores, src.sizes, plan.budget.budget_bytes, scope="global", min_per_block=1)
        chosen = list(zip(*np.nonzero(mask)))
        return [(int(b), int(e)) for b, e in sorted(chosen, key=lambda k: -scores[k])]

    def __call__(self, node: NodeRecord) -> list[pb.ByteRange]:
        """The plan for ``node`` after its heartbeat: byte ranges, or [] when it holds the plan already."""
        if node.node_id not in self.budgets:
            return []
        self.learn()
        plan = self._node(node.node_id)
        src = self.source(plan.budget.source)
        chosen = self.choose(node.node_id)
        L, E = src.sizes.shape
        held = unpack_mask(node.expert_mask, L, E)
        want = np.zeros((L, E), dtype=bool)
        for k in chosen:
            want[k] = True
        if held is not None and plan.budget.source in node.bundles and np.array_equal(held, want):
            return []
        plan.plans += 1
        plan.last = chosen
        self.log.append({"node": node.node_id, "plan": plan.plans, "experts": len(chosen),
                         "new": int((want & ~held).sum()) if held is not None else len(chosen)})
        keys: list[tuple[int, int] | None] = [None, *chosen]
        return [pb.ByteRange(bundle=plan.budget.source, offset=s.offset, length=s.length)
                for k in keys for s in src.spans.get(k, [])]

    def router_prior(self, node: NodeRecord) -> pb.RouterPrior | None:
        """The usage (L, E) the plan of ``node`` is chosen from, each row normalised, for a node whose
        budget asks for a router prior (``NodeBudget.prior``); None otherwise."""
        if node.node_id not in self.budgets or not self.budgets[node.node_id].prior:
            return None
        plan = self._node(node.node_id)
        scores = np.clip(np.asarray(plan.predictor.predict(RequestContext(user=node.node_id)), dtype=np.float64),
                         0, None)  # (L, E)
        L, E = scores.shape
        rows = scores.sum(axis=1, keepdims=True)  # (L, 1)
        usage = np.where(rows > 0, scores / np.where(rows > 0, rows, 1), 1.0 / E)  # (L, E)
        return pb.RouterPrior(n_blocks=L, n_experts=E, usage=usage.reshape(-1).tolist())

    def expert_peer(self, node: NodeRecord) -> str:
        """The address of a healthy node that holds every expert (for remote misses); "" if none."""
        if node.node_id not in self.budgets:
            return ""
        for other in self.registry.nodes(pb.NODE_STATE_HEALTHY):
            if other.node_id in self.budgets or other.node_id == node.node_id or other.model != node.model:
                continue
            mask = unpack_mask(other.expert_mask, other.n_blocks, other.n_experts)
            if mask is not None and mask.all():
                return other.address
        return ""
