"""Soup-of-Experts nodes in a federation run: the bank they are shipped, the users they specialise for,
and the report's ``soup_of_experts`` section (bytes of the bank against specialists, and quality).

A soup node registers with model "soup" and is offered the bank bundle (``model.soup_of_experts``
wire format: S, the bank entries and the MLP, experts in the run's codec, plus the personas' unigram
tables). Each soup node serves a group of known users (one persona's, or two personas'): after start-up the
coordinator forwards a sample of their own text (``Federation.InstantiateSoup``), the node estimates
their domain weights h from it and instantiates Theta = S + sum_j alpha_j(h) E_j, with no training.
The workload then scores those users' held-out text on the soup node, the base, their own adapter and,
when the run has one, their persona's specialist node, all through the coordinator.
"""

from __future__ import annotations

import dataclasses
import math

from model.codecs import bundle_meta
from model.evaluate import geomean
from model.pipeline import Suite
from model.soe_train import preset_soup_config, suite_soup
from model.soup_of_experts import (
    SoupConfig,
    SoupOfExperts,
    bytes_comparison,
    unigram_log_tables,
    wire_meta,
    wire_records,
)

from .scenario import Scenario, ScenarioError
from .sections import Section, save_figure

SOUP_MODEL = "soup"  # the model name soup nodes register with, and their bank bundle's
SECTION_KEY = "soup_of_experts"  # the run report's key of this section
COMPARE_KS = (1, 2, 4, 8, 16, 32)  # numbers of specialists the bytes comparison prices


def bank_config(scn: Scenario, suite: Suite) -> SoupConfig:
    """The bank the scenario asks for: the preset's default bank (as Bet 100's) with the [soup] keys."""
    return preset_soup_config(suite.preset, suite.seed, bank_size=scn.soup.bank_size, rank=scn.soup.rank,
                              support=scn.soup.support)


def bank(scn: Scenario, suite: Suite) -> SoupOfExperts:
    """The trained bank (cached: trained once per config, base and text)."""
    return suite_soup(suite, bank_config(scn, suite))


def bank_records(scn: Scenario, suite: Suite) -> tuple[list, dict]:
    """(encoded records, bundle metadata) of the bank bundle, experts in the scenario's codec."""
    soup = bank(scn, suite)
    tables = unigram_log_tables([suite.ids(p, "train") for p in soup.domains], suite.preset.model.vocab_size)
    records = wire_records(soup, tables, expert_codec=scn.model.expert_codec, other_codec=scn.model.other_codec)
    meta = {**wire_meta(soup), "training": dataclasses.asdict(soup.cfg),
            **bundle_meta(suite.preset.model, model=SOUP_MODEL, expert_codec=scn.model.expert_codec,
                          other_codec=scn.model.other_codec, preset=suite.preset.name, seed=suite.seed)}
    return records, meta


def targets(suite: Suite, n_nodes: int) -> list[tuple[str, list[str]]]:
    """(label, users) for each of ``n_nodes`` soup nodes: first the known users of one persona per
    node, then mixed groups, the users of two personas ("programmer+novelist": a school whose
    users write both, the case no single specialist serves), then round again."""
    by_persona: dict[str, list[str]] = {}
    for u in suite.known_users:
        by_persona.setdefault(suite.sources[u].persona, []).append(u)
    groups = [(p, by_persona[p]) for p in suite.personas if p in by_persona]
    if n_nodes and not groups:
        raise ScenarioError("soup.nodes: soup nodes specialise for known users, and this run has none")
    pairs = [(f"{a}+{b}", by_persona[a] + by_persona[b]) for (a, _), (b, _) in zip(groups[0::2], groups[1::2])]
    order = groups + pairs
    return [order[k % len(order)] for k in range(n_nodes)]


def sample_text(suite: Suite, users: list[str], chars: int) -> str:
    """``chars`` characters of the users' own training text, in equal shares (never their held-out text)."""
    share = max(1, chars // max(1, len(users)))
    return "\n".join(suite.text(u, "train")[:share] for u in users)


def section(fed, stats: dict, rows: list[dict], codec: str) -> Section:
    """The run report's ``soup_of_experts`` section: its data (:func:`report_section`), markdown and plots.

    ``fed`` is the running `sim.federation.LocalFederation` (unannotated: the federation imports this module)."""
    return Section(SECTION_KEY, report_section(fed, stats, rows, codec), markdown, write_plots)


def report_section(fed, stats: dict, rows: list[dict], codec: str) -> dict:
    """The report's ``soup_of_experts`` data: what the bank cost on the wire against full specialists,
    what each soup node instantiated, and the quality its users got (``rows`` from the workload)."""
    bank_info = next(b for b in fed.bundles.values() if b.model == SOUP_MODEL)
    # a full model in the same codecs: the base's bundle (a specialist's differs only in its metadata's name)
    model_bundle = next(b for b in fed.bundles.values() if b.model == "base")
    spec, bank_bytes = model_bundle.size, bank_info.size
    soup = bank(fed.scn, fed.suite)
    nodes = []
    for p in (p for p in fed.plans if p.model == SOUP_MODEL):
        inst = fed.soup_instances.get(p.node_id, {})
        mine = [r for r in rows if r["node"] == p.node_id]
        nodes.append({
            "node": p.node_id, "serves": p.target, "users": p.group,
            "bundle_payload_bytes": stats["by_node"].get(p.node_id, {}).get("BUNDLE", {}).get("payload", 0),
            "instantiate_request_bytes": inst.get("request_bytes"),
            "domains": inst.get("domains"), "domain_weights": inst.get("domain_weights"), "alpha": inst.get("alpha"),
            "model": inst.get("model"),
            "users_scored": mine,
        })

    def ratio(key: str) -> float | None:
        return geomean([r["soup_ppl"] / r[key] for r in rows if r.get(key)])
    return {
        "bank": {"bundle": bank_info.name, "bytes": bank_bytes, "tensors": bank_info.tensors,
                 "bank_size": soup.cfg.bank_size, "kind": soup.cfg.kind, "domains": list(soup.domains),
                 "training_steps": soup.cfg.steps, "expert_codec": codec},
        "specialist_bundle_bytes": spec,
        "bank_over_specialist": round(bank_bytes / spec, 4),
        # shipping a node k full specialists costs more than the bank from this k on
        "break_even_k": math.floor(bank_bytes / spec) + 1,
        "bundles_measured": {"note": "whole bundle files as shipped (framing, manifest and checksums included)",
                             "bank": bank_bytes, "specialists": {str(k): k * spec for k in COMPARE_KS}},
        "payload_model": bytes_comparison(soup, COMPARE_KS, expert_codec=codec),
        "nodes": nodes,
        "quality": {
            "users": len(rows),
            "soup_over_base": ratio("base_ppl"),
            "soup_over_specialist": ratio("specialist_ppl"),
            "soup_over_own_adapter": ratio("own_ppl"),
            "soup_beats_base": sum(r["soup_ppl"] < r["base_ppl"] for r in rows),
            "note": "geometric means over the soup nodes' users of held-out perplexity ratios, same text each",
        },
    }


def markdown(sec: dict) -> list[str]:
    """report.md lines for the ``soup_of_experts`` section."""
    b, q = sec["bank"], sec["quality"]
    lines = ["## Soup-of-Experts nodes", "",
             f"Bank: {b['bank_size']} {b['kind']} entries over {', '.join(b['domains'])}, {b['training_steps']} "
             f"training steps, experts in `{b['expert_codec']}`. Bundle {sec['bank']['bytes']:,} bytes against "
             f"{sec['specialist_bundle_bytes']:,} for one full specialist: the bank costs "
             f"{sec['bank_over_specialist']:.2f} specialists, so it is cheaper than shipping a node k "
             f"specialists from k = {sec['break_even_k']} on.", "",
             "| node | serves the users of | user | estimated h (on the node) | soup ppl | base ppl | "
             "the user's persona's specialist ppl | own adapter ppl |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}"
    for n in sec["nodes"]:
        h = ", ".join(f"{d}={w:.2f}" for d, w in zip(n["domains"] or [], n["domain_weights"] or []) if w >= 0.005)
        for r in n["users_scored"]:
            lines.append(f"| {n['node']} | {n['serves']} | {r['user']} | {h} | {r['soup_ppl']:.2f} | "
                         f"{r['base_ppl']:.2f} | {fmt(r.get('specialist_ppl'))} | {fmt(r.get('own_ppl'))} |")
    if q["users"]:
        lines += ["", f"Soup over base {fmt(q['soup_over_base'])}x, over the persona's specialist "
                      f"{fmt(q['soup_over_specialist'])}x, over the user's own adapter "
                      f"{fmt(q['soup_over_own_adapter'])}x (geometric means; < 1 is better)."]
    return lines


def instance_record(reply, request_bytes: int) -> dict:
    """What a soup node reported instantiating (an InstantiateSoupReply), JSON-able."""
    return {"bank": reply.bank, "domains": list(reply.domains),
            "domain_weights": [float(v) for v in reply.domain_weights], "alpha": [float(v) for v in reply.alpha],
            "model": reply.model, "request_bytes": request_bytes}



def write_plots(sec: dict, out) -> list[str]:
    """soup_quality.png (each soup user's perplexity by method) and soup_bytes.png (the bank against
    k specialists, as shipped); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rows = [r for n in sec["nodes"] for r in n["users_scored"]]
    if rows:
        methods = [("soup_ppl", "soup (instantiated)"), ("base_ppl", "base"), ("specialist_ppl", "persona specialist"),
                   ("own_ppl", "own adapter")]
        methods = [(k, label) for k, label in methods if any(r.get(k) for r in rows)]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
        width = 0.8 / len(methods)
        for i, (k, label) in enumerate(methods):
            ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(rows))],
                   [r.get(k) or 0.0 for r in rows], width=width, label=label)
        ax.set_xticks(range(len(rows)), [f"{r['user']}\n{r['node']}" for r in rows], fontsize=7)
        ax.set_ylabel("held-out perplexity")
        ax.set_title("Soup-of-Experts nodes: the specialist instantiated for the users' estimated h")
        ax.legend(fontsize=8)
        files.append(save_figure(fig, out, "soup_quality.png"))
    ks = [int(k) for k in sec["bundles_measured"]["specialists"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [v / 1e6 for v in sec["bundles_measured"]["specialists"].values()], "o-", label="k full specialists")
    ax.axhline(sec["bank"]["bytes"] / 1e6, color="C1", label="the bank (any number of specialists)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("specialists a node needs (k)")
    ax.set_ylabel("MB shipped to the node")
    ax.set_title(f"Shipping the bank against shipping specialists (break-even k = {sec['break_even_k']})")
    ax.legend(fontsize=8)
    return files + [save_figure(fig, out, "soup_bytes.png")]
