"""A Soup-of-Experts node that restarts comes back serving the specialist it served.

Real coordinator, real NodeHost, a tiny random bank shipped as a bundle: after
``Federation.InstantiateSoup`` the coordinator keeps the node's h (never the users' sample text);
when a new process registers under the same node id and installs the bank, the coordinator sends
it that h again, and the node scores exactly as before the restart.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest
import torch
from coordinator_harness import ADMIN, NODE, meta, start_coordinator
from live_coordinator import TEXT

from model.config import PRESETS
from model.soup_of_experts import SoupConfig, SoupOfExperts, unigram_log_tables, wire_meta, wire_records
from node.actor import NodeHost
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle import write_bundle

pytestmark = pytest.mark.slow
TINY = PRESETS["tiny"].model


def write_bank(path) -> None:
    soup = SoupOfExperts(TINY, SoupConfig(bank_size=2, steps=1, seq_len=16, lr=1e-3), ("a", "b"), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in soup.named_parameters():
            if not name.startswith("shared."):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    streams = [torch.randint(0, TINY.vocab_size, (300,), generator=g) for _ in range(2)]
    records = wire_records(soup, unigram_log_tables(streams, TINY.vocab_size), expert_codec="fp32", other_codec="fp32")
    write_bundle(path, records, {**wire_meta(soup), "model": "soup", "model_config": dataclasses.asdict(TINY)})


async def _healthy(stub, node_id: str, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.1)):
        nodes = (await stub.ListNodes(pb.ListNodesRequest(state=pb.NODE_STATE_HEALTHY), metadata=meta(ADMIN))).nodes
        if any(n.node_id == node_id for n in nodes):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{node_id} never became healthy")


async def _score(stub) -> np.ndarray:
    spec = pb.MixtureSpec(components=[pb.MixtureComponent(specialist="soup", node_id="s1")])
    reply = await stub.Score(pb.ScoreRequest(text=TEXT, mixture=spec), metadata=meta(ADMIN), timeout=30)
    return np.array(reply.components[0].logprobs)


def test_a_restarted_soup_node_is_sent_its_h_again(tmp_path):
    write_bank(tmp_path / "bank.ffb")

    async def go():
        handle = await start_coordinator(tmp_path, heartbeat_interval_ms=200, chunk_size=256 * 1024,
                                         max_message_bytes=4 * 1024 * 1024)
        handle.store.put_file("soup-fp32", tmp_path / "bank.ffb", model="soup", codec="fp32")
        first, second = NodeHost(torch_threads=1), NodeHost(torch_threads=1)
        try:
            async with grpc.aio.insecure_channel(handle.address) as ch:
                stub = rpc.FederationStub(ch)
                await first.start(handle.address, [{"node_id": "s1", "model": "soup"}], NODE)
                await _healthy(stub, "s1")
                uniform = await _score(stub)
                reply = await stub.InstantiateSoup(pb.SoupRequest(node_id="s1", domain_weights=[0.8, 0.2]),
                                                   metadata=meta(ADMIN))
                special = await _score(stub)
                await first.stop()  # the process is gone; a new one takes the same node id
                await second.start(handle.address, [{"node_id": "s1", "model": "soup"}], NODE)
                await _healthy(stub, "s1")
                after = None
                for _ in range(100):  # the coordinator re-applies h on a healthy heartbeat
                    after = await _score(stub)
                    if np.array_equal(after, special):
                        break
                    await asyncio.sleep(0.1)
                status = (await second.status())["nodes"][0]
                saved = handle.registry.get_soup("s1")
                return uniform, special, after, list(reply.domain_weights), status, saved
        finally:
            await first.stop()
            await second.stop()
            await handle.stop()

    uniform, special, after, h, status, saved = asyncio.run(go())
    assert not np.allclose(uniform, special, atol=1e-3)  # h changed what the node serves
    np.testing.assert_array_equal(after, special)  # ... and the restarted node serves it again
    assert status["soup"]["domain_weights"] == pytest.approx([0.8, 0.2]) and h == pytest.approx([0.8, 0.2])
    # what the coordinator keeps is h itself, not the users' text it may have been estimated from
    assert list(pb.InstantiateSoupRequest.FromString(saved).domain_weights) == pytest.approx([0.8, 0.2])
    assert not pb.InstantiateSoupRequest.FromString(saved).sample_token_ids
