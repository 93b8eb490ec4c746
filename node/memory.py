"""Memory per virtual node: what one more node costs a process that already hosts some (issue 8).

    python -m node.memory --preset tiny --nodes 64 [--users 2] [--no-share] [--json]

Builds ``--nodes`` virtual nodes in this process the way ``NodeHost`` does after their installs:
each with its own gRPC server on a loopback port, the same base bundle (decoded once and shared
through a ``WeightStore``, or one private copy per node with ``--no-share``), ``--users``
adapters, and one scoring request served, then reports the resident set size (RSS) before and
after. Fetch buffers are transient (freed once a bundle is installed) and not counted here.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import sys

import torch

from model.config import ConfigError, get_preset
from model.fractal_moe import FractalMoE, build_model
from model.train import adapter_state

from .adapters import encode_adapter
from .assembly import DecodedBundle, WeightStore
from .runtime import VirtualNode
from .server import start_node_server


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bundle(model: FractalMoE, tag: str) -> DecodedBundle:
    tensors = {k: v.detach().clone().requires_grad_(False) for k, v in model.state_dict().items()}
    sha = hashlib.sha256(tag.encode()).digest()
    return DecodedBundle(name=f"base-{tag}", sha256=sha, size=0, meta={}, config=model.cfg, tensors=tensors)


async def _measure(preset: str, n_nodes: int, users: int, share: bool) -> dict:
    cfg = get_preset(preset).model
    model = build_model(cfg, 0)
    blob = encode_adapter(adapter_state(model))
    ids = list(range(2, min(cfg.context, 64)))
    shared_store, shared_bundle = WeightStore(), _bundle(model, "shared")
    nodes, servers, marks = [], [], []
    gc.collect()
    start = rss_bytes()
    try:
        for i in range(n_nodes):
            store, bundle = (shared_store, shared_bundle) if share else (WeightStore(), _bundle(model, f"own-{i}"))
            node = VirtualNode(f"node-{i}", store=store)
            await node.adopt([bundle])
            servers.append(await start_node_server(node, "memory-probe-token"))
            for u in range(users):
                node.load_adapter(f"user-{i}-{u}", blob)
            await node.score(ids)
            nodes.append(node)
            if i in (0, n_nodes - 1):
                gc.collect()
                marks.append(rss_bytes())
    finally:
        for s in servers:
            await s.stop(None)
    first, last = marks[0], marks[-1]
    per_node = (last - first) / max(1, n_nodes - 1)
    return {
        "preset": preset,
        "nodes": n_nodes,
        "users_per_node": users,
        "shared_weights": share,
        "weight_bytes": sum(t.numel() * t.element_size() for t in shared_bundle.tensors.values()),
        "rss_before": start,
        "rss_after": last,
        "first_node_bytes": first - start,
        "per_additional_node_bytes": round(per_node),
    }


def measure_memory(preset: str = "tiny", n_nodes: int = 32, users: int = 2, share: bool = True) -> dict:
    """RSS of ``n_nodes`` installed virtual nodes in this process (see the module docstring)."""
    if n_nodes < 2:
        raise ValueError(f"need at least 2 nodes to measure the cost of one more, got {n_nodes}")
    return asyncio.run(_measure(preset, n_nodes, users, share))


def main(argv: list[str] | None = None) -> int:
    """Command line: print the measurement (text or --json)."""
    p = argparse.ArgumentParser(prog="python -m node.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, 30m)")
    p.add_argument("--nodes", type=int, default=32, help="virtual nodes to build (>= 2)")
    p.add_argument("--users", type=int, default=2, help="adapters per node")
    p.add_argument("--no-share", action="store_true", help="give every node its own copy of the weights")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (as NodeHost sets)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    try:
        r = measure_memory(args.preset, args.nodes, args.users, not args.no_share)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # process-wide: leave it as found when called in-process
    if args.json:
        print(json.dumps(r))
    else:
        mib = 2 ** 20
        print(f"{r['preset']}: {r['nodes']} virtual nodes, {r['users_per_node']} users each, "
              f"weights {'shared' if r['shared_weights'] else 'per node'} ({r['weight_bytes'] / mib:.2f} MiB)")
        print(f"  first node  {r['first_node_bytes'] / mib:8.2f} MiB")
        print(f"  each more   {r['per_additional_node_bytes'] / mib:8.3f} MiB")
        print(f"  process RSS {r['rss_after'] / mib:8.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
