"""One virtual node: what it holds (model, expert mask, adapters, counters) and what it does.

This is the node without its gRPC server (``node.server`` maps the ``Node`` service onto it) and
without its life cycle (``node.actor`` registers it and sends heartbeats), so that tests and the
host can drive it directly. Errors are :class:`NodeError` subclasses carrying the gRPC status the
server answers with.

Concurrency: everything runs on one asyncio loop; forward passes, bundle decoding, assembly and
soup instantiation run on the process's one compute thread (:data:`COMPUTE`), always handed over by
``VirtualNode._submit``, so that the loop keeps serving the other virtual nodes of the process. A
request takes a snapshot of the served model and the mask when it starts, so an install that swaps
the model mid-request never mixes two models in one answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import torch

from model.sampling import sample_token
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.ids import is_valid_bundle_name, is_valid_id
from proto.model_labels import model_label

from .adapters import AdapterError, AdapterStore, UserAdapter, decode_adapter
from .assembly import AssemblyError, DecodedBundle, ServedModel, WeightStore, decode_records, pack_mask, used_bundles
from .counting import ByteCounter
from .errors import InstallFailed, InvalidRequest, NoModel, UserNotLoaded
from .fetch import FetchError, FetchPolicy
from .inference import next_logprobs, score_tokens
from .local_store import LocalBundles, fetch_or_load
from .partial import PartialExperts, expert_output, run_expert_rpc
from .soup import SoupInstance, describe, instantiate, kept_h, requested_h

T = TypeVar("T")

# One compute thread per process, shared by every virtual node in it: torch's OpenMP pool is per
# calling thread, so several compute threads would oversubscribe the cores (and spin-wait) for no
# gain; the event loop stays free for the gRPC servers while the thread computes.
COMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="node-compute")



@dataclass(frozen=True, kw_only=True)
class NodeLimits:
    """Input limits of a node (what a request may ask for)."""

    max_score_tokens: int = 16384  # ScoreTokens: longer than the context is scored in windows
    max_prompt_tokens: int = 16384  # NextTokenDistribution / Generate prompts (the last context tokens are used)
    max_new_tokens: int = 4096
    max_temperature: float = 10.0

    def __post_init__(self) -> None:
        if min(self.max_score_tokens, self.max_prompt_tokens, self.max_new_tokens) < 2 or self.max_temperature <= 0:
            raise ValueError(f"invalid node limits {self}")


@dataclass
class ControlLink:
    """How a node reaches the coordinator: a counted NodeControl stub and its call metadata."""

    stub: rpc.NodeControlStub
    metadata: tuple[tuple[str, str], ...]
    policy: FetchPolicy = field(default_factory=FetchPolicy)
    timeout_s: float = 30.0
    local: LocalBundles | None = None  # verified bundles kept on disk (node.local_store): a restart reads them


@dataclass
class InstallResult:
    """What an install did."""

    installed: list[str]  # every bundle the node now holds, in install order
    fetched: list[str]  # bundles fetched by this call
    bytes_fetched: int  # chunk data received by this call (refetched bytes included)
    resumes: int = 0
    refetches: int = 0
    seconds: float = 0.0
    from_local: list[str] = field(default_factory=list)  # bundles read from the node's own disk, not fetched


class VirtualNode:
    """A federation node's state and behaviour, independent of transport and life cycle."""

    def __init__(self, node_id: str, *, store: WeightStore, model_name: str = "base",
                 limits: NodeLimits = NodeLimits(), control: ControlLink | None = None,
                 counter: ByteCounter | None = None) -> None:
        if not is_valid_id(node_id):
            raise ValueError(f"invalid node id {node_id!r}")
        self.node_id = node_id
        self.model_name = model_name or "base"
        self.store = store
        self.limits = limits
        self.control = control
        self.counter = counter or ByteCounter()
        self.adapters = AdapterStore()
        self.served: ServedModel | None = None
        self.bundles: list[DecodedBundle] = []
        self.superseded: set[tuple[str, bytes]] = set()  # (name, sha256) installed, then fully overridden
        self.bank: DecodedBundle | None = None  # a Soup-of-Experts bank, when the node holds one
        self.soup: SoupInstance | None = None  # what it instantiated from the bank
        self.mask: torch.Tensor | None = None  # (L, E) bool: experts this node has installed
        self.routing: torch.Tensor | None = None  # (L, E) long: cumulative routing counts
        self.predictions = 0  # positions counted in ``routing`` (one per prediction served)
        self.inflight = 0
        self.state = pb.NODE_STATE_REGISTERED
        self._install_lock = asyncio.Lock()
        self.partial: PartialExperts | None = None  # an expert budget, filled by prefetch plans (node.partial)

    # ----------------------------------------------------------------------------- helpers

    def _model(self) -> tuple[ServedModel, torch.Tensor]:
        served, mask = self.served, self.mask
        if served is None or mask is None:
            raise NoModel(f"node {self.node_id} has no model installed yet")
        return served, mask

    def _adapter(self, user_id: str) -> UserAdapter | None:
        if not user_id:
            return None
        if not is_valid_id(user_id):
            raise InvalidRequest(f"invalid user id {user_id[:80]!r}")
        a = self.adapters.get(user_id)
        if a is None:
            raise UserNotLoaded(f"user {user_id!r} is not loaded on node {self.node_id}")
        return a

    def _ids(self, token_ids: Sequence[int], served: ServedModel, *, least: int, most: int, what: str) -> torch.Tensor:
        n = len(token_ids)
        if n < least:
            raise InvalidRequest(f"{what} needs at least {least} token id{'s' if least > 1 else ''}, got {n}")
        if n > most:
            raise InvalidRequest(f"{what} of {n} tokens exceeds the node's limit of {most}")
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        vocab = served.config.vocab_size
        bad = ids >= vocab
        if bool(bad.any()):
            raise InvalidRequest(f"token id {int(ids[bad][0])} at position {int(bad.nonzero()[0])} "
                                 f"is out of range (vocabulary of {vocab})")
        return ids

    def _count_routes(self, served: ServedModel, routes: torch.Tensor) -> None:
        """Add routes (L, N) long to the cumulative histogram."""
        L, E = served.config.n_layers, served.config.n_experts
        if self.routing is None or tuple(self.routing.shape) != (L, E):
            self.routing = torch.zeros(L, E, dtype=torch.long)
        offsets = torch.arange(L)[:, None] * E  # (L, 1)
        self.routing += torch.bincount((routes + offsets).reshape(-1), minlength=L * E).view(L, E)
        self.predictions += routes.shape[1]

    async def _submit(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the process's compute thread, awaited: the one way work leaves the loop."""
        return await asyncio.get_running_loop().run_in_executor(COMPUTE, fn, *args)

    def label(self, user_id: str) -> str:
        """The ScoreTokensReply.model string for a request of ``user_id``."""
        h = self.soup.domain_weights if self.soup is not None else None
        return model_label(self.model_name, user_id, soup_h=h)

    # ----------------------------------------------------------------------------- serving

    async def score(self, token_ids: Sequence[int], user_id: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (n-1,) float64 of the observed tokens and the routes (L, n) long."""
        served, mask = self._model()
        ids = self._ids(token_ids, served, least=2, most=self.limits.max_score_tokens, what="ScoreTokens")
        adapter = self._adapter(user_id)
        tensors = adapter.tensors if adapter else None
        if self.partial is not None:
            logps, routes = await self.partial.score(ids, tensors)
            self._count_routes(served, routes[:, :-1])
            return logps, routes
        logps, routes = await self._submit(served.run, mask, lambda m: score_tokens(m, ids, tensors))
        self._count_routes(served, routes[:, :-1])
        return logps, routes

    async def next_token(self, token_ids: Sequence[int], user_id: str = "") -> torch.Tensor:
        """The next-token log-probs (V,) float64 after the prefix."""
        served, mask = self._model()
        ids = self._ids(token_ids, served, least=1, most=self.limits.max_prompt_tokens, what="prefix")
        adapter = self._adapter(user_id)
        tensors = adapter.tensors if adapter else None
        logps, route = await self._submit(served.run, mask, lambda m: next_logprobs(m, ids, tensors))
        self._count_routes(served, route[:, None])
        return logps

    async def run_expert(self, block: int, expert: int, rows: int, hidden: bytes) -> bytes:
        """Expert ``expert`` of block ``block`` on ``rows`` hidden states (float32 bytes): its output, the
        same layout (Node.RunExpert). FAILED_PRECONDITION when the node does not hold the expert."""
        x = run_expert_rpc(self, block, expert, rows, hidden)  # (rows, C)
        served, _ = self._model()
        y = await self._submit(lambda: expert_output(served.module, block, expert, x))  # (rows, C)
        return y.to(torch.float32).contiguous().numpy().tobytes()

    def check_top_k(self, k: int) -> None:
        """InvalidRequest unless 0 <= k <= vocabulary size."""
        served, _ = self._model()
        if k > served.config.vocab_size:
            raise InvalidRequest(f"top_k {k} exceeds the vocabulary of {served.config.vocab_size}")

    async def generate(self, token_ids: Sequence[int], *, user_id: str = "", max_new_tokens: int,
                       temperature: float = 0.0, k: int = 0, seed: int = 0,
                       stop_ids: Sequence[int] = ()) -> AsyncIterator[tuple[int, float, pb.FinishReason.ValueType]]:
        """Validate, then yield (token id, untempered log-prob, finish reason) per generated token.

        Validation happens before the first token, so a bad request fails before it streams.
        The prompt is the last ``context`` tokens at each step (as ``model.evaluate.sample``).
        """
        served, mask = self._model()
        ids = self._ids(token_ids, served, least=1, most=self.limits.max_prompt_tokens, what="prompt")
        adapter = self._adapter(user_id)
        if not 1 <= max_new_tokens <= self.limits.max_new_tokens:
            raise InvalidRequest(f"max_new_tokens must be 1 to {self.limits.max_new_tokens}, got {max_new_tokens}")
        if not (temperature == temperature and 0.0 <= temperature <= self.limits.max_temperature):
            raise InvalidRequest(f"temperature must be finite, 0 to {self.limits.max_temperature}, got {temperature}")
        self.check_top_k(k)
        vocab = served.config.vocab_size
        bad = [s for s in stop_ids if s >= vocab]
        if bad:
            raise InvalidRequest(f"stop id {bad[0]} is out of range (vocabulary of {vocab})")
        return self._generate(served, mask, ids, adapter.tensors if adapter else None, max_new_tokens,
                              temperature, k, seed, frozenset(stop_ids))

    async def _generate(self, served: ServedModel, mask: torch.Tensor, ids: torch.Tensor, tensors, max_new: int,
                        temperature: float, k: int, seed: int,
                        stop: frozenset[int]) -> AsyncIterator[tuple[int, float, pb.FinishReason.ValueType]]:
        gen = torch.Generator().manual_seed(seed)
        seq = ids
        for i in range(max_new):
            logps, route = await self._submit(served.run, mask, lambda m, ctx=seq: next_logprobs(m, ctx, tensors))
            self._count_routes(served, route[:, None])
            tok = sample_token(logps, temperature=temperature, top_k=k, rng=gen)
            seq = torch.cat([seq[-served.config.context:], torch.tensor([tok])])
            finish = (pb.FINISH_REASON_STOP if tok in stop else
                      pb.FINISH_REASON_LENGTH if i == max_new - 1 else pb.FINISH_REASON_UNSPECIFIED)
            yield tok, float(logps[tok]), finish
            if finish:
                return

    # ----------------------------------------------------------------------------- users

    def load_adapter(self, user_id: str, data: bytes, *, fmt: str = "", sha256: bytes = b"") -> UserAdapter:
        """Check and install a user's adapter blob, replacing any previous one atomically."""
        served, _ = self._model()
        try:
            adapter = decode_adapter(user_id, data, served.norm_shapes, fmt=fmt, sha256=sha256)
        except AdapterError as exc:
            raise InvalidRequest(str(exc)) from None
        self.adapters.put(adapter)
        return adapter

    async def fetch_user(self, user_id: str) -> UserAdapter:
        """Fetch a user's adapter from the coordinator (NodeControl.FetchAdapter) and install it."""
        if not is_valid_id(user_id):
            raise InvalidRequest(f"invalid user id {user_id[:80]!r}")
        self._model()
        if self.control is None:
            raise NoModel(f"node {self.node_id} has no coordinator link to fetch user {user_id!r}")
        try:
            reply = await self.control.stub.FetchAdapter(
                pb.FetchAdapterRequest(node_id=self.node_id, user_id=user_id),
                metadata=self.control.metadata, timeout=self.control.timeout_s)
        except grpc.aio.AioRpcError as exc:
            err = InstallFailed(f"fetching the adapter of {user_id!r}: {exc.code().name}: {exc.details()}",
                                exc.code() if exc.code() != grpc.StatusCode.UNKNOWN else grpc.StatusCode.UNAVAILABLE)
            raise err from None
        if reply.user_id and reply.user_id != user_id:
            raise InstallFailed(f"asked for the adapter of {user_id!r}, got {reply.user_id!r}",
                                grpc.StatusCode.INTERNAL)
        try:
            return self.load_adapter(user_id, reply.data, fmt=reply.format, sha256=reply.sha256)
        except InvalidRequest as exc:
            raise InstallFailed(f"coordinator sent a bad adapter: {exc}", grpc.StatusCode.DATA_LOSS) from None

    def unload_user(self, user_id: str) -> bool:
        """Drop a user's adapter; True when the node held it."""
        if not is_valid_id(user_id):
            raise InvalidRequest(f"invalid user id {user_id[:80]!r}")
        return self.adapters.pop(user_id)

    # ----------------------------------------------------------------------------- bundles

    def held_bundles(self) -> list[DecodedBundle]:
        """The bundles the node holds as the coordinator knows them, in install order: a bank, not
        the models it instantiated from it."""
        bank = [self.bank] if self.bank is not None else []
        return bank + [b for b in self.bundles if "instantiated_from" not in b.meta]

    def installed_names(self) -> list[str]:
        """Names of :meth:`held_bundles`; the pieces a partial node installed from byte ranges of a bundle
        go by that bundle's name (its expert mask says which experts it holds)."""
        return list(dict.fromkeys(b.meta.get("range_of", b.name) for b in self.held_bundles()))

    def _held(self, ref: pb.BundleRef) -> bool:
        """True for a bundle installed before: held now, or superseded by a later one (so a
        coordinator that keeps offering a superseded bundle does not make the node refetch it)."""
        bank = [(self.bank.name, self.bank.sha256)] if self.bank is not None else []
        for name, sha in [(b.name, b.sha256) for b in self.bundles] + bank + list(self.superseded):
            if ref.sha256 and sha == bytes(ref.sha256):
                return True
            if not ref.sha256 and name == ref.name:
                return True
        return False

    async def install(self, refs: Sequence[pb.BundleRef]) -> InstallResult:
        """Fetch, verify, decode and install bundles, all or nothing.

        Bundles the node already holds (same sha256, or same name when no sha256 is given) are
        not fetched again. Every bundle is fetched whole and checked before any is installed; the
        swap to the new model is one assignment, so a failure at any step leaves the node as it
        was. Raises InstallFailed (or InvalidRequest for bad names).
        """
        if not refs:
            raise InvalidRequest("InstallBundles names no bundle")
        for ref in refs:
            if not is_valid_bundle_name(ref.name):
                raise InvalidRequest(f"invalid bundle name {ref.name[:80]!r}")
            if ref.sha256 and len(ref.sha256) != 32:
                raise InvalidRequest(f"bundle {ref.name!r}: sha256 must be 32 bytes, got {len(ref.sha256)}")
        async with self._install_lock:
            t0 = time.perf_counter()
            unique = {(r.name, bytes(r.sha256)): r for r in refs}.values()
            todo = [r for r in unique if not self._held(r)]
            result = InstallResult(installed=[], fetched=[], bytes_fetched=0)
            control = self.control
            if todo and control is None:
                raise NoModel(f"node {self.node_id} has no coordinator link to fetch bundles from")
            new: list[DecodedBundle] = []
            try:
                for ref in todo:
                    assert control is not None  # checked above: there is something to fetch
                    fetched, from_disk = await fetch_or_load(control.stub, ref, node_id=self.node_id,
                                                             metadata=control.metadata, policy=control.policy,
                                                             local=control.local)
                    result.bytes_fetched += fetched.payload_bytes
                    result.resumes += fetched.resumes
                    result.refetches += fetched.refetches
                    (result.from_local if from_disk else result.fetched).append(ref.name)
                    new.append(await self._submit(
                        self.store.get_or_decode, fetched.sha256,
                        lambda f=fetched, r=ref: decode_records(f.bundle, name=r.name, sha256=f.sha256,
                                                                size=f.size, model=r.model, codec=r.codec)))
            except FetchError as exc:
                raise InstallFailed(str(exc), exc.code) from None
            except AssemblyError as exc:
                self.store.prune()
                raise InstallFailed(f"bundle rejected: {exc}", grpc.StatusCode.DATA_LOSS) from None
            banks = [b for b in new if b.bank is not None]
            models = [b for b in new if b.bank is None]
            if banks:
                # a bank makes no model by itself: serve its instantiation for the current h
                # (uniform over its domains at first) until InstantiateSoup asks for another
                bank = banks[-1]
                h = kept_h(bank, self.soup)
                models.append((await self._submit(instantiate, self.store, bank, h, None))[0])
            if models:
                await self.adopt(models)
            if banks:
                self.bank = banks[-1]
                self.soup = describe(self.bank, h)
            result.installed = self.installed_names()
            result.seconds = time.perf_counter() - t0
            return result

    async def adopt(self, new: Sequence[DecodedBundle]) -> None:
        """Install decoded, verified bundles on top of the current ones, atomically.

        The new bundle list replaces bundles of the same sha256 and drops those whose every
        tensor a later bundle overrides. InstallFailed (node unchanged) if they make no model.
        """
        shas = {b.sha256 for b in new}
        bundles = used_bundles([b for b in self.bundles if b.sha256 not in shas] + list(new))
        try:
            served = await self._submit(self.store.acquire, bundles)
        except AssemblyError as exc:
            self.store.prune()
            raise InstallFailed(f"bundles do not make a model: {exc}") from None
        old = self.served
        kept = {b.sha256 for b in bundles}
        self.superseded |= {(b.name, b.sha256) for b in [*self.bundles, *new] if b.sha256 not in kept}
        self.served, self.bundles, self.mask = served, bundles, served.present.clone()
        self.store.release(old)
        self._drop_unfit_adapters(served)
        self.state = pb.NODE_STATE_HEALTHY

    # ----------------------------------------------------------------------------- soup of experts

    async def instantiate_soup(self, domain_weights: Sequence[float] = (),
                               sample_token_ids: Sequence[int] = ()) -> SoupInstance:
        """Serve the specialist of the held bank for ``domain_weights`` h, or for h estimated from
        ``sample_token_ids`` (exactly one of the two), atomically: until it is built the node
        serves what it served. FAILED_PRECONDITION without a bank; INVALID_ARGUMENT for a bad h."""
        bank = self.bank
        if bank is None:
            raise NoModel(f"node {self.node_id} holds no Soup-of-Experts bank (install a bundle of kind "
                          f"\"soup-of-experts\" first)")
        h, sample = requested_h(bank, domain_weights, sample_token_ids)
        async with self._install_lock:
            inst, used_h = await self._submit(instantiate, self.store, bank, h, sample)
            await self.adopt([inst])
            self.soup = describe(bank, used_h)
            return self.soup

    def _drop_unfit_adapters(self, served: ServedModel) -> None:
        """A new model of another shape invalidates adapters made for the old one."""
        for uid in self.adapters.user_ids():
            a = self.adapters.get(uid)
            if a is not None and any(served.norm_shapes.get(k) != tuple(t.shape) for k, t in a.tensors.items()):
                self.adapters.pop(uid)

    def close(self) -> None:
        """Release the shared weights this node holds."""
        self.store.release(self.served)
        self.served, self.mask, self.bundles = None, None, []
        self.bank, self.soup = None, None
        self.state = pb.NODE_STATE_DOWN

    # ----------------------------------------------------------------------------- reporting

    def histogram(self) -> pb.RoutingHistogram:
        """Cumulative routing counts: one count per block per prediction the node served."""
        if self.served is None or self.routing is None:
            return pb.RoutingHistogram(node_id=self.node_id)
        L, E = self.routing.shape
        return pb.RoutingHistogram(node_id=self.node_id, n_blocks=L, n_experts=E,
                                   counts=self.routing.reshape(-1).tolist(), tokens=self.predictions)

    def expert_mask(self) -> bytes:
        """The installed-expert mask, bit-packed (empty without a model)."""
        return pack_mask(self.mask) if self.mask is not None else b""

    def shape(self) -> tuple[int, int]:
        """(n_blocks, n_experts) of the installed model; (0, 0) without one."""
        if self.served is None:
            return 0, 0
        return self.served.config.n_layers, self.served.config.n_experts

    def status(self) -> pb.NodeStatus:
        """The NodeStatus message (byte counters as of now; the reply itself is counted after)."""
        L, E = self.shape()
        return pb.NodeStatus(node_id=self.node_id, state=self.state, model=self.model_name,
                             bundles=self.installed_names(), user_ids=self.adapters.user_ids(),
                             expert_mask=self.expert_mask(), n_blocks=L, n_experts=E, inflight=self.inflight,
                             routing=self.histogram(), bytes_received=self.counter.received,
                             bytes_sent=self.counter.sent)

    def heartbeat(self) -> pb.HeartbeatRequest:
        """What the node tells the coordinator on each heartbeat."""
        return pb.HeartbeatRequest(node_id=self.node_id, state=self.state, bundles=self.installed_names(),
                                   user_ids=self.adapters.user_ids(), expert_mask=self.expert_mask(),
                                   inflight=self.inflight)

    def summary(self) -> dict:
        """JSON-able status for sim: what the node holds and its byte counters by kind."""
        L, E = self.shape()
        return {
            "node_id": self.node_id,
            "state": pb.NodeState.Name(self.state),
            "model": self.model_name,
            "bundles": self.installed_names(),
            "users": self.adapters.user_ids(),
            "experts_installed": int(self.mask.sum()) if self.mask is not None else 0,
            "n_blocks": L,
            "n_experts": E,
            "inflight": self.inflight,
            "predictions": self.predictions,
            "bytes": self.counter.as_dict(),
            "soup": self.soup.as_dict() if self.soup is not None else None,
            "prefetch": self.partial.summary() if self.partial is not None else None,
        }
