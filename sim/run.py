"""`python -m sim.run`: start a federation, drive a workload through its gRPC API, write a report.

    python -m sim.run --nodes 32                       # the embedded defaults (preset small)
    python -m sim.run --scenario scenarios/soup_of_experts.toml --out runs/soup   # Soup-of-Experts nodes
    python -m sim.run --scenario scenarios/fault_tolerance.toml --out runs/faults
    python -m sim.run --nodes 4 --preset tiny --address 127.0.0.1:6379   # an existing Ray cluster

Writes DIR/report.json, DIR/report.md, DIR/events.jsonl and PNG plots (DIR defaults to runs/latest);
what Ray and gRPC print goes to DIR/stderr.log, the console shows progress bars and the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from model.config import ConfigError, get_preset
from model.corpora import CorpusError
from model.pipeline import Suite
from proto.ids import is_valid_id

from . import codec_quality, faults, network, prefetch_live, prefetch_sweep, regime, soup
from .actors import RayStartError
from .console import noise_to
from .federation import FederationError, LocalFederation
from .report import stats_to_dict, summarise_latencies, write_report
from .scenario import Scenario, ScenarioError, load, override
from .sections import LivePart, add_section, chain_parts, pop_sections
from .shipping import simulate_shipping
from .workload import Driver

log = logging.getLogger("sim.run")
# The optional parts a scenario can switch on, in the order they run after the workload; each adds its
# own section to the report.
LIVE_PARTS: tuple[LivePart, ...] = (prefetch_sweep.LIVE_PART, prefetch_live.LIVE_PART, faults.LIVE_PART)


def new_suite(scn: Scenario, *, corpus_dir: str | None = None, progress: bool = True) -> Suite:
    """The scenario's Suite, checked against the scenario (nothing trained yet: that is cheap)."""
    preset = get_preset(scn.federation.preset).with_base_steps(scn.model.base_steps)
    if scn.federation.users_per_persona:
        preset = dataclasses.replace(preset, users_per_persona=scn.federation.users_per_persona)
    suite = Suite(preset, scn.federation.seed, corpus_dir=corpus_dir, corpus_chars=scn.federation.corpus_chars,
                  progress=progress, pretrain_corpus=scn.model.corpus_pretrain)
    check_suite(scn, suite, corpus_dir)
    return suite


def suite_key(scn: Scenario) -> tuple:
    """What decides a run's models: runs with equal keys can share one Suite (sim.sweep does)."""
    f = scn.federation
    return (f.preset, f.seed, f.users_per_persona, f.corpus_chars, scn.model.corpus_pretrain, scn.model.base_steps)


def check_suite(scn: Scenario, suite: Suite, corpus_dir: str | None) -> None:
    """Refuse, before any training, what the suite cannot serve: corpus users whose names are not
    user ids, specialists of personas the suite does not train."""
    check_corpus_users(suite.corpus_users, corpus_dir)
    bad = [s for s in scn.specialists() if s not in suite.personas]
    if bad:
        raise ScenarioError(f"model.specialists: {bad[0]!r} is not a training persona "
                            f"({', '.join(suite.personas)})")


def build_suite(scn: Scenario, *, corpus_dir: str | None = None, progress: bool = True,
                suite: Suite | None = None) -> Suite:
    """Train or load (cache) every model the scenario needs, into ``suite`` if given (a Suite of the
    same :func:`suite_key`, whose models in memory are reused) or a new one."""
    suite = suite or new_suite(scn, corpus_dir=corpus_dir, progress=progress)
    suite.base_state()
    for s in scn.specialists():
        suite.specialist_state(s)
    for u in suite.known_users:
        suite.adapter_state(u)
    if scn.soup_nodes():
        soup.bank(scn, suite)
    suite.reliance()  # the regime the run is in (cached beside the base)
    return suite


def check_corpus_users(names: list[str], corpus_dir: str | None) -> None:
    """Refuse, before any training, a --corpus sub-folder whose name cannot be a user id (the
    coordinator would refuse the user only after the models trained)."""
    for name in names:
        if not is_valid_id(name):
            raise CorpusError(f"--corpus {corpus_dir}: sub-folder {name!r} is not a valid user id (1 to 64 of "
                              "A-Z a-z 0-9 . _ -, starting with a letter or digit); rename the folder")


REPORT_FILES = ("report.json", "report.md", "events.jsonl")


def clear_report(out: Path) -> None:
    """Remove a previous run's report and plots from ``out``, so that a run that fails leaves no
    report that is not its own (its work/ folder is the run's to reuse)."""
    for path in [*(out / name for name in REPORT_FILES), *out.glob("*.png")]:
        path.unlink(missing_ok=True)


def live_parts(scn: Scenario):
    """The scenario's optional parts (of :data:`LIVE_PARTS`) as one ``extra(fed, report)``; None if none."""
    return chain_parts(LIVE_PARTS, scn)


def link_names(scn: Scenario) -> tuple[list[str], dict[str, network.LinkProfile]]:
    """Each node's link profile name (by index) and the profiles by node id."""
    n, net = scn.federation.nodes, scn.network
    profiles = network.assign_links(n, default=net.default_link, ranges=net.links, profiles=net.profiles)
    names = network.link_names(n, default=net.default_link, ranges=net.links)
    return names, {f"node-{i:04d}": p for i, p in enumerate(profiles)}


async def run_federation(scn: Scenario, out: Path, *, suite: Suite | None = None, progress: bool = True,
                         corpus_dir: str | None = None, extra=None, bundle_cache: dict | None = None) -> dict:
    """Run the scenario end to end and return the report (also written into ``out``).

    ``extra``, if given, is an async callable ``extra(fed, report)`` run after the workload
    (the scenario's :data:`LIVE_PARTS` plug in there) that may add sections to the report
    (:func:`sim.sections.add_section`). ``bundle_cache`` (see :class:`sim.federation.LocalFederation`)
    reuses bundles an earlier run wrote from the same ``suite``.
    """
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    clear_report(out)
    t = time.perf_counter()
    suite = suite or build_suite(scn, corpus_dir=corpus_dir, progress=progress)
    phases["models (train or cache)"] = time.perf_counter() - t
    names, links = link_names(scn)
    out.mkdir(parents=True, exist_ok=True)
    fed = LocalFederation(scn, suite, out / "work", link_names=names, progress=progress, bundle_cache=bundle_cache)
    report: dict = {}
    try:
        await fed.start()
        phases.update(fed.phases)
        t = time.perf_counter()
        workload = await Driver(fed).run()
        phases["workload"] = time.perf_counter() - t
        stats = stats_to_dict(fed.coordinator.core.stats(None))  # bytes and request counters
        report = assemble(scn, fed, stats, workload, links)
        # each section's wall time too: some evaluate models in this process (a warm run's tail)
        t = time.perf_counter()
        add_section(report, regime.section(suite))
        phases["section model_regime"] = time.perf_counter() - t
        t = time.perf_counter()
        add_section(report, codec_quality.section(suite, scn, workload.users, workload.unknown))
        phases["section codec_quality"] = time.perf_counter() - t
        if fed.soup_instances:
            t = time.perf_counter()
            add_section(report, soup.section(fed, stats, workload.soup, scn.model.expert_codec))
            phases["section soup"] = time.perf_counter() - t
        report["memory"] = await fed.memory()  # RSS and PSS of every node actor, per node
        if extra is not None:
            t = time.perf_counter()
            await extra(fed, report)
            phases["extra"] = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        await fed.stop()
        phases["stop"] = time.perf_counter() - t
    report["wall_phases"] = {k: round(v, 2) for k, v in phases.items()}
    report["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    report["model_timings"] = suite.timings
    write_report(report, out, report.pop("_events"), pop_sections(report))
    return report


def assemble(scn: Scenario, fed: LocalFederation, stats: dict, workload, links) -> dict:
    """The report's body from the coordinator's counters, the network model and the workload."""
    by_kind = {k: v["sent"] + v["received"] for k, v in stats["by_kind"].items()}
    plan = {p.node_id: p for p in fed.plans}
    nodes_in = [{"node": nid, "by_kind": stats["by_node"].get(nid, {})} for nid in plan]
    shipped, events = simulate_shipping(nodes_in, links, scn.network.egress_mbps * 1e6)
    per_node = []
    for nid, p in plan.items():
        kinds = stats["by_node"].get(nid, {})
        per_node.append({
            "node": nid, "model": p.model, "link": p.link, "users": p.users,
            "bytes": sum(v["sent"] + v["received"] for v in kinds.values()),
            "bytes_by_kind": {k: v["sent"] + v["received"] for k, v in kinds.items()},
            "bundle_payload_bytes": kinds.get("BUNDLE", {}).get("payload", 0),
            "virtual_seconds": round(shipped.get(nid, 0.0), 4),
        })
    users = workload.users
    ratios = [u["own_ppl"] / u["base_ppl"] for u in users]
    by_kind_lat = {}
    for kind in sorted({r["kind"] for r in workload.requests}):
        by_kind_lat[kind] = summarise_latencies([r["wall_s"] for r in workload.requests
                                                 if r["kind"] == kind and r["ok"]])
    ship_times = sorted(shipped.values()) or [0.0]
    return {
        "scenario": scn.to_dict(),
        "nodes": len(fed.plans),
        "actors": fed.actor_count(),
        "bytes_total": stats["bytes_total"],
        "bytes_by_kind": by_kind,
        "bytes_detail": stats["by_kind"],
        "bundles": [{"name": b.name, "model": b.model, "codec": b.codec, "size": b.size, "sha256": b.sha256,
                     "tensors": b.tensors} for b in fed.bundles.values()],
        "per_node": per_node,
        "virtual": {"shipping_makespan_s": round(ship_times[-1], 4),
                    "shipping_median_s": round(statistics.median(ship_times), 4),
                    "links": {name: dataclasses.asdict(links[nid]) for nid, name in
                              ((p.node_id, p.link) for p in fed.plans)},
                    "note": "virtual seconds from the network model applied to measured bytes"},
        "quality": {
            "users": users,
            "unknown": workload.unknown,
            "mixtures": workload.mixtures,
            "generations": workload.generations,
            "summary": {"users": len(users), "own_beats_base": sum(u["own_beats_base"] for u in users),
                        "median_own_over_base": round(statistics.median(ratios), 4) if ratios else None},
        },
        "requests": {"total": len(workload.requests), "failed": sum(not r["ok"] for r in workload.requests),
                     "errors": workload.errors[:20], "by_kind": by_kind_lat,
                     # every ok request's wall latency by kind: what sim.plan calibrates service times from
                     "samples_s": {k: sorted(r["wall_s"] for r in workload.requests if r["kind"] == k and r["ok"])
                                   for k in by_kind_lat}},
        "coordinator_requests": {k: stats[k] for k in ("requests_ok", "requests_failed", "requests_shed",
                                                      "requests_failed_over")},
        "_events": events,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments; flags given override the scenario's values."""
    ap = argparse.ArgumentParser(prog="python -m sim.run", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    add_scenario_arguments(ap, out="runs/latest")
    return ap.parse_args(argv)


def add_scenario_arguments(ap: argparse.ArgumentParser, *, out: str) -> None:
    """The flags that say which federation to bring up (sim.run's and sim.serve's), ``--out`` defaulting to ``out``."""
    ap.add_argument("--nodes", type=int, help="number of federation nodes (default 32)")
    ap.add_argument("--preset", choices=["tiny", "small", "30m"], help="model preset (default small)")
    ap.add_argument("--scenario", metavar="FILE.toml", help="scenario file (see scenarios/)")
    ap.add_argument("--address", help="address of an existing Ray cluster (default: start a local Ray)")
    ap.add_argument("--out", default=out, help=f"output folder (default {out})")
    ap.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    ap.add_argument("--codec", help="codec of the expert weights on the wire (default int8)")
    ap.add_argument("--nodes-per-actor", type=int, help="nodes per Ray actor process (default 0: packed automatically, "
                    "as many actors as CPUs and at least 4; 1: a process per node)")
    ap.add_argument("--corpus", metavar="DIR",
                    help="your own users' text: one sub-folder per user, named as a user id (A-Z a-z 0-9 . _ -); "
                         "each adapter trains on federation.corpus_chars characters spread over its user's text "
                         "(default: the preset's, 75,000 at small) and workload.score_chars are scored per "
                         "request; the report gives both per user")
    ap.add_argument("--corpus-pretrain", action="store_true", default=None,
                    help="also pretrain the tokenizer and the base on the --corpus users' text "
                         "(scenario key model.corpus_pretrain)")
    ap.add_argument("--soup-nodes", type=int, metavar="N",
                    help="Soup-of-Experts nodes (default: 2 in a federation of 16 nodes or more, else 0)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars: the summary only")


# The scenario key each flag of add_scenario_arguments overrides (argparse dest -> section.key).
FLAG_KEYS = {"nodes": "federation.nodes", "preset": "federation.preset", "seed": "federation.seed",
             "address": "federation.address", "nodes_per_actor": "federation.nodes_per_actor",
             "soup_nodes": "soup.nodes", "codec": "model.expert_codec", "corpus_pretrain": "model.corpus_pretrain"}


def flag_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The scenario keys the command line sets (``section.key`` -> value), flags not given left out."""
    return {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest) is not None}


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The scenario file (or the defaults) with the command line's overrides applied."""
    scn = load(args.scenario) if args.scenario else Scenario().validate()
    by_section: dict[str, dict[str, object]] = {}
    for key, value in flag_overrides(args).items():
        section, _, name = key.partition(".")
        by_section.setdefault(section, {})[name] = value
    for section, values in by_section.items():
        scn = override(scn, section, **values)
    return scn


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sim.run`."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        scn = scenario_from_args(args)
        extra = live_parts(scn)
        with noise_to(Path(args.out) / "stderr.log"):
            report = asyncio.run(run_federation(scn, Path(args.out), progress=not args.quiet,
                                                corpus_dir=args.corpus, extra=extra))
    except (ScenarioError, ConfigError, CorpusError, FederationError, RayStartError, network.NetworkError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    q = report["quality"]["summary"]
    print(f"{report['nodes']} nodes, {report['bytes_total'] / 1e6:.1f} MB crossed the coordinator boundary "
          f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in report['bytes_by_kind'].items())}); "
          f"virtual shipping {report['virtual']['shipping_makespan_s']:.1f} s, wall {report['wall_seconds']:.1f} s; "
          f"own adapter beats base for {q['own_beats_base']}/{q['users']} users; "
          f"{report['requests']['failed']} of {report['requests']['total']} requests failed")
    if "soup_of_experts" in report:
        s = report["soup_of_experts"]
        print(f"soup-of-experts: bank {s['bank']['bytes'] / 1e6:.1f} MB = {s['bank_over_specialist']:.2f} specialists "
              f"({s['specialist_bundle_bytes'] / 1e6:.1f} MB each); soup/base ppl "
              f"{s['quality']['soup_over_base'] or float('nan'):.3f} over {s['quality']['users']} users")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
