"""A partial node: an expert budget, experts installed one at a time from byte ranges, misses served live.

A node started with a ``prefetch`` spec (``node.actor``) holds at most ``budget_experts`` experts per
block (or ``budget_bytes`` of expert payload). The coordinator's planner sends it a plan through
heartbeats (``HeartbeatReply.prefetch``: the byte ranges, ``proto.expert_ranges``, of the non-expert
tensors and of every expert it should hold, most wanted first); :meth:`PartialExperts.apply_plan` fetches
what it lacks (``node.ranges``: each tensor checked against the manifest's digest), installs each expert
atomically (a new served model swapped in by one assignment) and evicts what the plan no longer names.

A request (ScoreTokens) runs :func:`model.staged.staged_forward`; where a block's router picks an expert
that is not installed, the miss policy decides:

    wait        fetch the expert's range now, install it (evicting the least recently used expert of the
                block that the request does not need when the budget is full), run it
    substitute  the installed expert the router scores highest (no bytes, a quality cost)
    remote      send those tokens' hidden states to ``expert_peer`` (a node holding every expert):
                Node.RunExpert, counted as ACTIVATION bytes both ways
    auto        per miss, whichever of wait and remote the link figures given in the spec predict to end
                sooner (``down_bps``, ``up_bps``, ``rtt_s``, ``peer_rtt_s``)

With ``prior_beta`` > 0 the node biases its router toward the usage the planner predicts for it
(``HeartbeatReply.router_prior``): ``beta * log(usage)`` is added to every block's router logits
(``model.staged.router_prior``), so requests keep to the experts the plan holds (issue 16 item 5).

Each request leaves a record (hits, on-demand bytes, remote calls, substitutions, experts held); virtual
time is sim's: it turns the records' bytes into stall seconds with its network model.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
import torch

from model.fractal_moe import expert_of
from model.staged import Answer, Miss, expert_from_weights, router_prior, run_expert, staged_forward
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle import Bundle, Manifest, TensorRecord
from proto.expert_ranges import RangeError, Span, entries_in, span_bytes, tensor_groups

from .assembly import AssemblyError, DecodedBundle, ServedModel, WeightStore, decode_records
from .counting import CountingChannel
from .errors import InstallFailed, InvalidRequest, NoModel
from .fetch import FetchError
from .ranges import RangeFetch, fetch_head, fetch_range

T = TypeVar("T")


class HostNode(Protocol):
    """What a partial node reads and swaps of its ``node.runtime.VirtualNode`` (no import: runtime
    imports this module)."""

    node_id: str
    store: WeightStore
    served: ServedModel | None
    mask: torch.Tensor | None
    bundles: list[DecodedBundle]
    state: pb.NodeState.ValueType
    counter: Any
    partial: PartialExperts | None
    _install_lock: asyncio.Lock

    @property
    def control(self) -> Any: ...
    def _model(self) -> tuple[ServedModel, torch.Tensor]: ...
    def shape(self) -> tuple[int, int]: ...
    async def _submit(self, fn: Callable[..., T], *args: Any) -> T: ...

POLICIES = ("wait", "substitute", "remote", "auto")
Key = tuple[int, int] | None  # (block, expert), or None for the non-expert tensors


@dataclass(frozen=True, kw_only=True)
class PrefetchSettings:
    """A partial node's budget, miss policy, and the link figures ``auto`` predicts with."""

    source: str  # the bundle its experts come from (the name in the coordinator's store)
    budget_experts: int = 0  # experts per block; 0: budget_bytes decides
    budget_bytes: int = 0  # expert payload bytes in all; 0: budget_experts decides
    policy: str = "substitute"
    down_bps: float = 8e6
    up_bps: float = 1e6
    rtt_s: float = 0.06
    peer_rtt_s: float = 0.005
    prior_beta: float = 0.0  # > 0: add beta * log(the planner's usage) to the router (HeartbeatReply.router_prior)

    @staticmethod
    def from_dict(d: Any, *, where: str = "prefetch") -> PrefetchSettings:
        """Validate a spec's ``prefetch`` dict; ValueError naming the key at fault."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a dict")
        known = {"source", "budget_experts", "budget_bytes", "policy", "down_bps", "up_bps", "rtt_s", "peer_rtt_s",
                 "prior_beta"}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")
        s = PrefetchSettings(**d)
        if not s.source or not isinstance(s.source, str):
            raise ValueError(f"{where}.source must name the bundle the experts come from")
        if s.policy not in POLICIES:
            raise ValueError(f"{where}.policy must be one of {', '.join(POLICIES)}, got {s.policy!r}")
        if (s.budget_experts > 0) == (s.budget_bytes > 0) or min(s.budget_experts, s.budget_bytes) < 0:
            raise ValueError(f"{where}: give exactly one of budget_experts and budget_bytes, > 0")
        if min(s.down_bps, s.up_bps) <= 0 or min(s.rtt_s, s.peer_rtt_s) < 0:
            raise ValueError(f"{where}: link figures must be > 0 (rates) and >= 0 (round trips)")
        if not 0 <= s.prior_beta <= 10:
            raise ValueError(f"{where}.prior_beta must be between 0 and 10, got {s.prior_beta}")
        return s


@dataclass
class RequestRecord:
    """What serving one request took."""

    tokens: int
    uses: int = 0  # (token, block) expert uses
    hits: int = 0  # uses whose expert was installed when the request started
    fetched: list[tuple[int, int, int]] = field(default_factory=list)  # (block, expert, bytes) fetched on demand
    remote: list[tuple[int, int, int, int]] = field(default_factory=list)  # (block, expert, bytes up, bytes down)
    substituted: int = 0
    held: int = 0  # experts installed when the request started
    policy: str = ""
    prior: list[float] | None = None  # the router prior's usage (L*E, row-major) the request ran with

    def as_dict(self) -> dict:
        """JSON-able."""
        return {"tokens": self.tokens, "uses": self.uses, "hits": self.hits, "fetched": self.fetched,
                "remote": self.remote, "substituted": self.substituted, "held": self.held, "policy": self.policy,
                "prior": self.prior}


class PartialExperts:
    """The expert budget of one virtual node and what it installed, evicted and served."""

    def __init__(self, node: HostNode, settings: PrefetchSettings) -> None:
        self.node = node
        self.settings = settings
        self.ref: pb.BundleRef | None = None
        self.manifest: Manifest | None = None
        self.spans: dict[Key, list[Span]] = {}
        self.pieces: dict[Key, DecodedBundle] = {}
        self.last_used: dict[tuple[int, int], int] = {}
        self.peer = ""
        self._peer_stub: tuple[str, rpc.NodeStub] | None = None
        self.requests: list[RequestRecord] = []
        self.timeline: list[dict] = []  # after every install/evict: requests served so far, experts held
        self.bytes_planned = 0  # expert and core payload fetched for plans
        self.bytes_on_demand = 0  # fetched by the wait policy
        self.installs = self.evictions = 0
        self.prior_usage: torch.Tensor | None = None  # (L, E) the planner's last HeartbeatReply.router_prior

    # ------------------------------------------------------------------ ranges and the budget

    def held(self) -> list[tuple[int, int]]:
        """Experts installed now."""
        return [k for k in self.pieces if k is not None]

    def expert_bytes(self, key: tuple[int, int]) -> int:
        """An expert's payload bytes on the wire."""
        return span_bytes(self.spans.get(key, []))

    def _fits(self, experts: Sequence[tuple[int, int]]) -> bool:
        s = self.settings
        if s.budget_experts:
            return not experts or int(np.bincount([b for b, _ in experts]).max()) <= s.budget_experts
        return sum(self.expert_bytes(k) for k in experts) <= s.budget_bytes

    async def _head(self, ref: pb.BundleRef, cost: RangeFetch) -> Manifest:
        control = self.node.control
        if control is None:
            raise NoModel(f"node {self.node.node_id} has no coordinator link to fetch ranges from")
        if self.manifest is None or self.ref is None or self.ref.name != ref.name:
            self.manifest = await fetch_head(control.stub, ref, node_id=self.node.node_id, metadata=control.metadata,
                                             policy=control.policy, cost=cost)
            self.ref = ref
            self.spans = tensor_groups(self.manifest, expert_of)
        return self.manifest

    def key_of(self, offset: int, length: int) -> Key:
        """The expert (or None: non-expert tensors) a range of the held manifest covers; InvalidRequest
        when it covers parts of several."""
        assert self.manifest is not None
        try:
            keys = {expert_of(e.name) for e in entries_in(self.manifest, offset, length)}
        except RangeError as exc:
            raise InvalidRequest(str(exc)) from None
        if len(keys) != 1:
            raise InvalidRequest(f"range {offset}+{length} covers tensors of several experts")
        return keys.pop()

    async def _fetch(self, key: Key, cost: RangeFetch) -> DecodedBundle:
        control, ref, manifest = self.node.control, self.ref, self.manifest
        assert control is not None and ref is not None and manifest is not None
        records: list[TensorRecord] = []
        for span in self.spans.get(key, []):
            got = await fetch_range(control.stub, ref, manifest, span.offset, span.length, node_id=self.node.node_id,
                                    metadata=control.metadata, policy=control.policy, cost=cost)
            records.extend(got.records)
        bundle = Bundle(meta=dict(manifest.meta), records=tuple(records))
        label = "core" if key is None else f"b{key[0]}e{key[1]}"
        digest = hashlib.sha256((ref.name + label).encode() + b"".join(
            bytes.fromhex(e.digest) for s in self.spans.get(key, []) for e in s.entries)).digest()
        size = span_bytes(self.spans.get(key, []))
        piece = await self.node._submit(
            self.node.store.get_or_decode, digest,
            lambda: decode_records(bundle, name=f"{ref.name}.{label}", sha256=digest, size=size, model=ref.model,
                                   codec=ref.codec))
        piece.meta["range_of"] = ref.name
        return piece

    async def _swap(self, pieces: dict[Key, DecodedBundle]) -> None:
        """Serve ``pieces`` from now on (one assignment; the node is unchanged on failure)."""
        order = sorted(pieces, key=lambda k: (-1, -1) if k is None else k)
        try:
            served = await self.node._submit(self.node.store.acquire, [pieces[k] for k in order])
        except AssemblyError as exc:
            self.node.store.prune()
            raise InstallFailed(f"ranges do not make a model: {exc}") from None
        old = self.node.served
        self.node.served, self.node.bundles, self.node.mask = served, [pieces[k] for k in order], served.present.clone()
        self.node.state = pb.NODE_STATE_HEALTHY
        self.node.store.release(old)
        self.pieces = dict(pieces)
        self.timeline.append({"requests": len(self.requests), "held": len(self.held()),
                              "per_block": np.bincount([b for b, _ in self.held()] or [0],
                                                       minlength=served.config.n_layers).tolist()})

    async def apply_plan(self, ranges: Sequence[pb.ByteRange]) -> dict:
        """Hold what ``ranges`` name (most wanted first), within the budget: fetch, install one expert at
        a time, evict experts the plan no longer names. Returns what it did."""
        if not ranges:
            return {"installed": 0, "evicted": 0, "bytes": 0}
        names = {r.bundle for r in ranges}
        if names != {self.settings.source}:
            raise InvalidRequest(f"a plan names bundles {sorted(names)}; this node takes experts of "
                                 f"{self.settings.source!r} only")
        cost = RangeFetch()
        async with self.node._install_lock:
            await self._head(pb.BundleRef(name=self.settings.source), cost)
            wanted: list[Key] = []
            for r in ranges:
                k = self.key_of(int(r.offset), int(r.length))
                if k not in wanted:
                    wanted.append(k)
            experts = [k for k in wanted if k is not None]
            fitting: list[tuple[int, int]] = []
            for k in experts:  # the plan's head that fits the budget
                if self._fits(fitting + [k]):
                    fitting.append(k)
            installed = evicted = 0
            try:
                pieces: dict[Key, DecodedBundle]
                if self.node.served is None:  # first plan: the core and every expert in one swap
                    pieces = {None: await self._fetch(None, cost)}
                    for k in fitting:
                        pieces[k] = await self._fetch(k, cost)
                    await self._swap(pieces)
                    installed = len(fitting)
                else:
                    for k in fitting:
                        if k in self.pieces:
                            continue
                        piece = await self._fetch(k, cost)
                        pieces = dict(self.pieces)
                        pieces[k] = piece
                        while not self._fits([x for x in pieces if x is not None]):
                            out = self._victim(pieces, keep=set(fitting), new=k)
                            del pieces[out]
                            evicted += 1
                        await self._swap(pieces)
                        installed += 1
                    stale = [x for x in self.held() if x not in fitting]
                    if stale:
                        pieces = {x: p for x, p in self.pieces.items() if x not in stale}
                        blocks = {x[0] for x in pieces if x is not None}
                        if blocks == set(range(self.node.shape()[0])):
                            await self._swap(pieces)
                            evicted += len(stale)
            except FetchError as exc:
                raise InstallFailed(str(exc), exc.code) from None
            self.bytes_planned += cost.payload_bytes
            self.installs += installed
            self.evictions += evicted
            return {"installed": installed, "evicted": evicted, "bytes": cost.payload_bytes}

    def _victim(self, pieces: dict[Key, DecodedBundle], *, keep: set, new: tuple[int, int]) -> tuple[int, int]:
        """The expert to evict to make room for ``new``: one not in ``keep`` (least recently used first),
        else any but ``new``; in ``new``'s block when the budget is per block; never the last of its block."""
        held = [k for k in pieces if k is not None and k != new]
        per_block = np.bincount([b for b, _ in held] + [new[0]], minlength=1 + max(b for b, _ in held + [new]))
        fits = [k for k in held if per_block[k[0]] > 1 and (not self.settings.budget_experts or k[0] == new[0])]
        cands = [k for k in fits if k not in keep] or fits
        block = new[0]
        if not cands:
            raise InstallFailed(f"the budget cannot hold expert {block} next to one expert per block")
        return min(cands, key=lambda k: self.last_used.get(k, -1))

    # ------------------------------------------------------------------ serving

    def _peer(self) -> rpc.NodeStub:
        if not self.peer:
            raise NoModel(f"node {self.node.node_id}: the remote policy needs an expert peer; the coordinator "
                          f"named none")
        if self._peer_stub is None or self._peer_stub[0] != self.peer:
            channel = grpc.aio.insecure_channel(self.peer)
            self._peer_stub = (self.peer, rpc.NodeStub(CountingChannel(channel, self.node.counter)))
        return self._peer_stub[1]

    def _choose(self, miss: Miss, e: int) -> str:
        p = self.settings.policy
        if p != "auto":
            return p
        s = self.settings
        n = int((miss.route == e).sum()) * miss.inputs.shape[1] * 4
        wait_s = s.rtt_s + 8 * self.expert_bytes((miss.block, e)) / s.down_bps
        remote_s = s.rtt_s + s.peer_rtt_s + 8 * n / s.up_bps + 8 * n / s.down_bps
        return "remote" if self.peer and remote_s < wait_s else "wait"

    async def _remote(self, miss: Miss, e: int, rec: RequestRecord) -> torch.Tensor:
        """Expert ``e``'s output for its tokens, computed by the expert peer (Node.RunExpert)."""
        rows = miss.inputs[miss.rows(e)]  # (n, C)
        hidden = rows.detach().to(torch.float32).contiguous().numpy().tobytes()
        control = self.node.control
        assert control is not None
        reply = await self._peer().RunExpert(
            pb.RunExpertRequest(block=miss.block, expert=e, rows=rows.shape[0], hidden=hidden),
            metadata=control.metadata, timeout=control.timeout_s)
        out = np.frombuffer(reply.output, dtype=np.float32)
        if out.size != rows.numel():
            raise InstallFailed(f"expert peer returned {out.size} values for {rows.numel()}", grpc.StatusCode.DATA_LOSS)
        rec.remote.append((miss.block, e, len(hidden), len(reply.output)))
        return torch.from_numpy(out.copy()).view_as(rows)

    async def _wait(self, miss: Miss, e: int, rec: RequestRecord) -> tuple[DecodedBundle, torch.Tensor]:
        """Fetch expert ``e`` now; its piece (installed by the caller) and its output for its tokens."""
        cost = RangeFetch()
        try:
            piece = await self._fetch((miss.block, e), cost)
        except FetchError as exc:
            raise InstallFailed(str(exc), exc.code) from None
        self.bytes_on_demand += cost.payload_bytes
        rec.fetched.append((miss.block, e, cost.payload_bytes))
        rows = miss.inputs[miss.rows(e)]  # (n, C)
        return piece, await self.node._submit(expert_from_weights, piece.tensors, miss.block, e, rows)

    async def _resolve(self, miss: Miss, rec: RequestRecord, needed: set[tuple[int, int]]) -> Answer:
        """One block's misses: the remote calls and the fetches of the block run concurrently (one round
        trip each way for the block, as the network model times them), substitutions need nothing."""
        how = {e: self._choose(miss, e) for e in miss.missing}
        sub = [e for e, h in how.items() if h == "substitute"]
        rec.substituted += sum(int((miss.route == e).sum()) for e in sub)
        remote = [e for e, h in how.items() if h == "remote"]
        wait = [e for e, h in how.items() if h == "wait"]
        calls = asyncio.gather(*(self._remote(miss, e, rec) for e in remote))
        fetches = asyncio.gather(*(self._wait(miss, e, rec) for e in wait))
        by_remote, by_wait = await asyncio.gather(calls, fetches)
        outputs: dict[int, torch.Tensor] = dict(zip(remote, by_remote))
        fetched: dict[tuple[int, int], DecodedBundle] = {}
        for e, (piece, out) in zip(wait, by_wait):
            fetched[(miss.block, e)] = piece
            outputs[e] = out
        if fetched:
            pieces = dict(self.pieces)
            for key, piece in fetched.items():
                pieces[key] = piece
                while not self._fits([x for x in pieces if x is not None]):
                    del pieces[self._victim(pieces, keep=needed, new=key)]
            await self._swap(pieces)
        return Answer(outputs=outputs, available=self._row(miss.block) if sub else None)

    def _row(self, block: int) -> torch.Tensor:
        mask = self.node.mask
        assert mask is not None
        return mask[block].clone()

    async def score(self, ids: torch.Tensor,
                    adapter: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs (n-1,) float64 of ``ids`` (n,) under the miss policy, and the full router's routes (L, n)."""
        served, mask = self.node._model()
        if ids.numel() - 1 > served.config.context:
            raise InvalidRequest(f"a partial node scores at most {served.config.context + 1} tokens, got {ids.numel()}")
        async with self.node._install_lock:  # plans and on-demand installs wait for the request
            rec = RequestRecord(tokens=ids.numel() - 1, held=len(self.held()), policy=self.settings.policy)
            start = mask.clone()  # (L, E) installed when the request arrived
            x = ids[:-1]
            usage = self.prior_usage
            bias = router_prior(usage, self.settings.prior_beta) if usage is not None else None  # (L, E)
            rec.prior = usage.reshape(-1).tolist() if usage is not None else None
            gen = staged_forward(served.module, x, mask, adapter, router_bias=bias)
            step = await self.node._submit(_step, gen, None)
            while isinstance(step, Miss):
                needed = {(step.block, int(e)) for e in torch.unique(step.route)}
                answer = await self._resolve(step, rec, needed)
                step = await self.node._submit(_step, gen, answer)
            logits, wanted, _ = step
            for b in range(wanted.shape[0]):
                for e in torch.unique(wanted[b]).tolist():
                    self.last_used[(b, e)] = len(self.requests)
            rec.uses = wanted.numel()
            rec.hits = int(start.gather(1, wanted).sum())
            self.requests.append(rec)
        logps = torch.log_softmax(logits.double(), dim=-1).gather(1, ids[1:, None])[:, 0]  # (n-1,)
        routes = torch.cat([wanted, wanted[:, -1:]], dim=1)  # (L, n): the last token routes as its predecessor
        return logps, routes

    async def on_heartbeat(self, reply: pb.HeartbeatReply) -> None:
        """Take a heartbeat reply's expert peer, apply its plan (if any), then its router prior (kept only
        when ``prior_beta`` > 0; InvalidRequest when it does not fit the installed model)."""
        self.peer = reply.expert_peer or self.peer
        if reply.prefetch:
            await self.apply_plan(list(reply.prefetch))
        if self.settings.prior_beta > 0 and reply.HasField("router_prior") and self.node.served is not None:
            p = reply.router_prior
            L, E = self.node.shape()
            usage = torch.tensor(list(p.usage), dtype=torch.float32)  # (L*E,)
            if (p.n_blocks, p.n_experts) != (L, E) or usage.numel() != L * E or not bool(torch.isfinite(usage).all()) \
                    or bool((usage < 0).any()):
                raise InvalidRequest(f"router prior of {p.n_blocks}x{p.n_experts} ({usage.numel()} values) does not "
                                     f"fit this node's {L}x{E} experts as finite usage >= 0")
            self.prior_usage = usage.view(L, E)

    def summary(self) -> dict:
        """JSON-able: settings, what it holds, bytes and the per-request records."""
        return {"settings": self.settings.__dict__, "held": [list(k) for k in sorted(self.held())],
                "bytes_planned": self.bytes_planned, "bytes_on_demand": self.bytes_on_demand,
                "installs": self.installs, "evictions": self.evictions, "peer": self.peer,
                "expert_bytes": {f"{b}.{e}": self.expert_bytes((b, e)) for (b, e) in
                                 [k for k in self.spans if k is not None]},
                "timeline": self.timeline, "requests": [r.as_dict() for r in self.requests]}


def whole_bundles(node: HostNode, refs: Sequence[pb.BundleRef]) -> list[pb.BundleRef]:
    """``refs`` without the bundle a partial node takes by ranges only (the coordinator offers a node
    of its model the whole bundle; a partial node installs it expert by expert as plans say)."""
    if node.partial is None:
        return list(refs)
    return [r for r in refs if r.name != node.partial.settings.source]


def _step(gen, answer: Answer | None):
    """Advance a staged pass on the compute thread: the next Miss, or (logits, wanted, served) at the end."""
    with torch.no_grad():
        try:
            return next(gen) if answer is None else gen.send(answer)
        except StopIteration as stop:
            return stop.value


def expert_output(module, block: int, expert: int, rows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return run_expert(module, block, expert, rows)


def run_expert_rpc(node: HostNode, block: int, expert: int, rows: int, hidden: bytes) -> torch.Tensor:
    """Check a RunExpert request against what ``node`` holds and decode its hidden states (rows, C)."""
    served, mask = node._model()
    L, E = mask.shape
    if not (0 <= block < L and 0 <= expert < E):
        raise InvalidRequest(f"expert {block}.{expert} is outside the model ({L} blocks x {E} experts)")
    if not bool(mask[block, expert]):
        raise NoModel(f"node {node.node_id} does not hold expert {expert} of block {block}")
    C = served.config.d_model
    if rows < 1 or len(hidden) != rows * C * 4:
        raise InvalidRequest(f"hidden must be rows x d_model = {rows} x {C} float32 ({rows * C * 4} bytes), "
                             f"got {len(hidden)}")
    x = torch.from_numpy(np.frombuffer(hidden, dtype=np.float32).copy()).view(rows, C)
    if not bool(torch.isfinite(x).all()):
        raise InvalidRequest("hidden holds NaN or infinite values")
    return x
