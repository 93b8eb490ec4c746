"""Federation benchmarks of `sim.bench`: start-up, memory per node, scoring and mixtures on a real federation.

One packed federation (``BenchConfig.nodes`` nodes, ``nodes_per_actor`` per Ray actor, trained
models of ``BenchConfig.preset``) is started on first need and shared by the benchmarks that
measure it; baselines are measured in the same run: a federation with one actor per node, a
bare Ray actor, the same model scoring in this process.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from model.evaluate import token_logps
from model.fractal_moe import FractalMoE
from model.tokenizer import encode
from model.train import apply_adapter
from node.adapters import decode_adapter, encode_adapter
from node.assembly import decode_bundle
from proto import federation_pb2 as pb

from ..actors import AUTO, init_ray, packing, process_memory
from ..federation import LocalFederation
from ..scenario import Scenario, override
from .core import BenchConfig, BenchResult, amedian_of

MIB = 2 ** 20


class BenchContext:
    """What the benchmarks of one run share: sizes, a scratch folder, the suite, Ray and the federation."""

    def __init__(self, config: BenchConfig, *, suite=None) -> None:
        self.config = config
        self._suite = suite
        self._tmp: Path | None = None
        self._ray_started = False
        self.fed: LocalFederation | None = None
        self.notes: dict = {}  # figures one benchmark leaves for another (the baseline federation's memory)

    def tmpdir(self, name: str) -> Path:
        """A fresh folder under this run's scratch folder (removed by close())."""
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="fractal-bench-"))
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self._tmp))
        return path

    def scenario(self, nodes_per_actor: int) -> Scenario:
        """The benchmark federation's scenario (defaults otherwise)."""
        cfg = self.config
        return override(Scenario().validate(), "federation", nodes=cfg.nodes, preset=cfg.preset, seed=cfg.seed,
                        nodes_per_actor=nodes_per_actor)

    def suite(self):
        """The trained (or cached) models of the benchmark preset."""
        if self._suite is None:
            from ..run import build_suite

            self._suite = build_suite(self.scenario(1), progress=False)
        elif self._suite.preset.name != self.config.preset:
            raise ValueError(f"the suite given is of preset {self._suite.preset.name!r}, "
                             f"the benchmarks ask for {self.config.preset!r}")
        return self._suite

    def ray(self) -> None:
        """Start a local Ray unless one is running (stopped again by close() only if started here)."""
        self._ray_started = init_ray() or self._ray_started

    async def start_federation(self, nodes_per_actor: int) -> LocalFederation:
        """Start a federation of the benchmark's size with this packing."""
        from ..run import link_names

        scn = self.scenario(nodes_per_actor)
        suite = await asyncio.get_running_loop().run_in_executor(None, self.suite)
        self.ray()
        names, _ = link_names(scn)
        fed = LocalFederation(scn, suite, self.tmpdir(f"fed{nodes_per_actor}"), link_names=names, progress=False)
        try:
            await fed.start()
        except BaseException:
            await fed.stop()
            raise
        return fed

    async def federation(self) -> LocalFederation:
        """The packed federation, started on first call."""
        if self.fed is None:
            self.fed = await self.start_federation(self.config.nodes_per_actor)
        return self.fed

    async def close(self) -> None:
        """Stop the federation, Ray (if started here), and remove the scratch folder."""
        if self.fed is not None:
            await self.fed.stop()
            self.fed = None
        if self._ray_started:
            ray.shutdown()
            self._ray_started = False
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _startup_detail(fed: LocalFederation) -> dict:
    """Where start-up time went: phases, each node's own start, and each actor's boot before its nodes."""
    secs = [r.get("seconds", {}).get("total", 0.0) for r in fed.node_results.values()]
    # an actor's nodes all start once its process is up: what precedes the slowest is the boot
    boots = [a["done_s"] - a["slowest_node_s"] for a in fed.actor_startup]
    return {"nodes": len(fed.plans), "actors": fed.actor_count(),
            "phases_s": {k: round(v, 3) for k, v in fed.phases.items()},
            "node_start_s_median": round(statistics.median(secs), 3) if secs else None,
            "node_start_s_max": round(max(secs), 3) if secs else None,
            "actor_boot_s_max": round(max(boots), 3) if boots else None,
            "last_actor_done_s": round(max(a["done_s"] for a in fed.actor_startup), 3) if boots else None}


async def startup(ctx: BenchContext) -> list[BenchResult]:
    """Wall seconds until every node is registered, has fetched and installed its bundle, and is healthy."""
    cfg = ctx.config
    fed = await ctx.federation()
    packed = fed.phases["nodes_up_and_loaded"]
    base = await ctx.start_federation(cfg.baseline_nodes_per_actor)
    try:
        baseline = base.phases["nodes_up_and_loaded"]
        ctx.notes["baseline_memory"] = await base.memory()
        base_detail = _startup_detail(base)
    finally:
        await base.stop()
    return [BenchResult(
        name="startup", value=packed, baseline=baseline, unit="s", better="lower", target=15.0, target_on="value",
        description=f"{cfg.nodes} nodes ({cfg.preset}) up and loaded: {cfg.nodes_per_actor} per Ray actor vs "
                    f"{cfg.baseline_nodes_per_actor} per actor (actors, register, fetch, verify, install, healthy)",
        detail={"packed": _startup_detail(fed), "baseline": base_detail})]


async def packing_sweep(ctx: BenchContext) -> list[BenchResult]:
    """Nodes up and loaded at each of ``packings`` (and the automatic packing), one federation at a
    time, interleaved over ``packing_rounds`` rounds: the automatic packing's median against one
    actor per node's."""
    cfg = ctx.config
    ctx.ray()
    auto = packing(cfg.nodes, AUTO, int(ray.cluster_resources().get("CPU", 1)))
    times: dict[int, list[float]] = {k: [] for k in dict.fromkeys((1, auto) + cfg.packings)}
    for _ in range(cfg.packing_rounds):
        for k in times:
            fed = await ctx.start_federation(k)
            try:
                times[k].append(round(fed.phases["nodes_up_and_loaded"], 2))
            finally:
                await fed.stop()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return [BenchResult(
        name="packing", value=medians[auto], baseline=medians[1], unit="s", better="lower", target=15.0,
        target_on="value",
        description=f"{cfg.nodes} nodes ({cfg.preset}) up and loaded: the automatic packing ({auto} per actor) vs "
                    f"1 per actor, median of {cfg.packing_rounds} rounds over packings {', '.join(map(str, times))}",
        detail={"auto_nodes_per_actor": auto, "median_s": {str(k): v for k, v in medians.items()},
                "ratio_to_one_per_actor": {str(k): round(v / medians[1], 3) for k, v in medians.items()},
                "seconds": {str(k): v for k, v in times.items()}})]


async def bare_actor_memory() -> dict:
    """RSS and PSS of one Ray actor that has imported torch and done nothing else."""
    def make():
        # Defined here so that Ray ships it by value: the worker imports torch and nothing of ours.
        class BareActor:
            def __init__(self) -> None:
                import torch as _torch

                self.x = _torch.zeros(1)

            def pid(self) -> int:
                import os

                return os.getpid()
        return ray.remote(num_cpus=0)(BareActor)

    actor = make().remote()
    try:
        pid = await asyncio.wrap_future(actor.pid.remote().future())
        return process_memory(pid)
    finally:
        ray.kill(actor)


async def memory(ctx: BenchContext) -> list[BenchResult]:
    """Resident memory of the node actors divided by the nodes they host, against one bare torch actor."""
    cfg = ctx.config
    fed = await ctx.federation()
    mem = await fed.memory()
    ctx.ray()
    bare = await bare_actor_memory()
    nodes = len(fed.plans)
    detail = {"actors": len(mem["actors"]), "nodes": nodes, "actor_rss_bytes": mem["rss_bytes"],
              "actor_pss_bytes": mem["pss_bytes"], "per_node_pss_bytes": mem["pss_bytes"] / nodes,
              "bare_actor": bare, "weight_store": mem["actors"][0].get("store") if mem["actors"] else None}
    if "baseline_memory" in ctx.notes:
        b = ctx.notes["baseline_memory"]
        detail["one_actor_per_node"] = {"per_node_rss_bytes": b["rss_bytes"] / nodes,
                                        "per_node_pss_bytes": b["pss_bytes"] / nodes}
    return [BenchResult(
        name="memory", value=mem["rss_bytes"] / nodes / MIB, baseline=bare["rss_bytes"] / MIB, unit="MiB/node",
        better="lower",
        description=f"RSS of the node actors / nodes ({nodes} {cfg.preset} nodes, {cfg.nodes_per_actor} per actor) "
                    f"vs the RSS of one bare Ray actor that imported torch",
        detail=detail)]


def in_process_model(fed: LocalFederation, user: str) -> FractalMoE:
    """The model ``user``'s node serves, built in this process: the same bundle bytes, the same adapter blob."""
    plan = next(p for p in fed.plans if user in p.users)
    b = fed.bundles[plan.bundle]
    decoded = decode_bundle(b.path.read_bytes(), name=b.name)
    with torch.device("meta"):
        model = FractalMoE(decoded.config)
    model.load_state_dict(decoded.tensors, assign=True, strict=True)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    adapter = decode_adapter(user, encode_adapter(fed.suite.adapter_state(user)), shapes)
    return apply_adapter(model, adapter.tensors).eval()


def _slices(text: str, n: int, size: int) -> list[str]:
    step = max(1, (len(text) - size) // max(1, n))
    return [text[(k * step) % max(1, len(text) - size):][:size] for k in range(n)]


async def score(ctx: BenchContext) -> list[BenchResult]:
    """Tokens per second of Federation.Score (one request at a time) vs token_logps in this process."""
    cfg = ctx.config
    fed = await ctx.federation()
    suite = fed.suite
    user = next(u for p in fed.plans for u in p.users)
    texts = _slices(suite.text(user, "eval"), cfg.score_requests, cfg.score_chars)
    model = in_process_model(fed, user)
    loop = asyncio.get_running_loop()
    last: dict = {}

    async def federation_round() -> float:
        t0 = time.perf_counter()
        for text in texts:
            r = await fed.stub.Score(pb.ScoreRequest(user_id=user, text=text, omit_token_strings=True),
                                     metadata=fed.token(user), timeout=300)
            last["fed"] = r
        return time.perf_counter() - t0

    def local_all() -> tuple[float, torch.Tensor]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as every node process runs (NodeHost torch_threads=1)
        try:
            t0 = time.perf_counter()
            for text in texts:
                lp = token_logps(model, torch.tensor(encode(suite.tokenizer, text), dtype=torch.long))
            return time.perf_counter() - t0, lp
        finally:
            torch.set_num_threads(threads)

    async def local_round() -> float:
        dt, last["local"] = await loop.run_in_executor(None, local_all)
        return dt

    # every known user at once, each on the node holding their adapter: what the federation's
    # actors give in parallel (reported beside; the ratio stays one request at a time)
    batch = [(u, _slices(suite.text(u, "eval"), 1, cfg.score_chars)[0]) for p in fed.plans for u in p.users]

    async def concurrent_round() -> float:
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(fed.stub.Score(pb.ScoreRequest(user_id=u, text=t, omit_token_strings=True),
                                                        metadata=fed.token(u), timeout=300) for u, t in batch))
        last["concurrent_tokens"] = sum(len(r.logprobs) for r in replies)
        return time.perf_counter() - t0

    await federation_round()  # warm-up: channels, the node's first forward pass
    await local_round()
    await concurrent_round()
    fed_s, local_s, conc_s = await amedian_of(cfg.repeats, federation_round, local_round, concurrent_round)
    tokens = sum(len(encode(suite.tokenizer, t)) - 1 for t in texts)
    remote = torch.tensor(list(last["fed"].logprobs), dtype=torch.float64)
    local = last["local"]
    diff = float((remote - local).abs().max()) if remote.shape == local.shape else float("nan")
    return [BenchResult(
        name="score", value=tokens / fed_s, baseline=tokens / local_s, unit="tokens/s", better="higher", target=0.7,
        description=f"Federation.Score (user with adapter, {cfg.score_chars} chars, one request at a time) through "
                    f"the coordinator and a node vs model.evaluate.token_logps in-process, {cfg.preset}, "
                    f"1 torch thread",
        detail={"requests": len(texts), "tokens": tokens, "federation_s": fed_s, "in_process_s": local_s,
                "max_abs_logp_diff": diff, "node": last["fed"].node_id,
                "ms_per_request_federation": 1000 * fed_s / len(texts),
                "ms_per_request_in_process": 1000 * local_s / len(texts),
                "concurrent_users": len(batch), "concurrent_tokens_per_s": last["concurrent_tokens"] / conc_s,
                "concurrent_nodes": len({p.node_id for p in fed.plans if p.users})})]


async def mixture(ctx: BenchContext) -> list[BenchResult]:
    """Latency of a uniform mixture over every specialist node vs the same request on one of them."""
    cfg = ctx.config
    fed = await ctx.federation()
    specialists = fed.scn.specialists()
    text = fed.suite.text(specialists[0], "eval")[:cfg.score_chars]
    specs = {k: pb.MixtureSpec(components=[pb.MixtureComponent(specialist=s) for s in specialists[:k]],
                               mode=pb.MIXTURE_MODE_UNIFORM) for k in (1, len(specialists))}
    times: dict[int, list[float]] = {k: [] for k in specs}

    def one(k: int):
        async def call() -> float:
            t0 = time.perf_counter()
            await fed.stub.Score(pb.ScoreRequest(text=text, mixture=specs[k], omit_token_strings=True),
                                 metadata=fed.admin, timeout=300)
            dt = time.perf_counter() - t0
            times[k].append(dt)
            return dt
        return call

    K = len(specialists)
    await one(K)()  # warm-up
    await one(1)()
    for v in times.values():
        v.clear()
    k_s, one_s = await amedian_of(cfg.mixture_requests, one(K), one(1))
    holders = {p.node_id for p in fed.plans if p.model in specialists}
    actors = [i for i, ids in enumerate(fed.actor_nodes) if holders & set(ids)]
    return [BenchResult(
        name=f"mixture_k{K}", value=k_s * 1000, baseline=one_s * 1000, unit="ms", better="lower",
        description=f"Score latency of a uniform mixture over {K} specialist nodes vs a mixture of one "
                    f"({cfg.score_chars} chars, {cfg.preset}); 1.0 would be a perfectly parallel fan-out",
        detail={"k": K, "specialist_actors": len(actors), "median_k_ms": 1000 * statistics.median(times[K]),
                "median_one_ms": 1000 * statistics.median(times[1])})]
