"""The coordinator end to end: real grpc.aio servers on loopback, fake nodes with hand-computable models."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import shutil
import subprocess
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from coordinator_harness import (
    ADMIN,
    NODE,
    Federation,
    adapted_table,
    bigram_table,
    encode,
    expected_logps,
    federation,
    make_adapter,
    make_config,
    meta,
    run,
    start_coordinator,
    start_fake_node,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator.server import serve
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc

TEXT = "the cat sat on the mat and then the dog ran to the park"


async def _code(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        assert err.details(), "every error carries a message"
        return err.code()
    return grpc.StatusCode.OK


async def _stream_code(call) -> grpc.StatusCode:
    async def drain():
        async for _ in call:
            pass
    return await _code(drain())


def test_health_and_reflection_answer(tmp_path):
    async def go():
        handle = await start_coordinator(tmp_path)
        try:
            async with grpc.aio.insecure_channel(handle.address) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                for service in ("", "fractal.federation.v1.Federation", "fractal.federation.v1.NodeControl"):
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                refl = reflection_pb2_grpc.ServerReflectionStub(ch)
                replies = [r async for r in refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
                names = {s.name for s in replies[0].list_services_response.service}
                assert {"fractal.federation.v1.Federation", "fractal.federation.v1.NodeControl",
                        "grpc.health.v1.Health"} <= names
                replies = [r async for r in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="fractal.federation.v1.Federation")]))]
                assert replies[0].file_descriptor_response.file_descriptor_proto
        finally:
            await handle.stop()
    run(go())


def test_score_uses_own_adapter_or_base_with_hand_computed_logprobs(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            await fed.add_node("n1", seed=11)
            await fed.add_node("n2", seed=22)
            alice = await fed.add_user("alice", boost=4, node_id="n2")
            newbie = await fed.add_user("newbie")
            ids = encode(tmp_path, TEXT)
            reply = await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))
            want = expected_logps(adapted_table(22, make_adapter("alice", 4)), ids)
            np.testing.assert_allclose(reply.logprobs, want, rtol=1e-6)
            assert (reply.node_id, reply.model, list(reply.token_ids)) == ("n2", "adapter:alice", ids[1:])
            assert list(reply.tokens) == TEXT.split()[1:]
            assert reply.perplexity == pytest.approx(math.exp(-want.mean()), rel=1e-6)
            chars = len(TEXT) - len("the")
            assert (reply.scored_chars, reply.bits_per_char) == (chars, pytest.approx(-want.sum() / math.log(2) / chars,
                                                                                      rel=1e-6))
            # the same user on the base model, and a user without an adapter: base table of some node
            base = await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT, use_base=True,
                                                        omit_token_strings=True), metadata=meta(alice))
            assert base.model == "base" and not base.tokens
            seed = {"n1": 11, "n2": 22}[base.node_id]
            np.testing.assert_allclose(base.logprobs, expected_logps(bigram_table(seed), ids), rtol=1e-6)
            other = await fed.stub.Score(pb.ScoreRequest(user_id="newbie", text=TEXT), metadata=meta(newbie))
            assert other.model == "base"
        finally:
            await fed.close()
    run(go())


def test_mixture_equals_logsumexp_of_nodes_minus_log_n(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            seeds = {"s-novel": 5, "s-code": 6, "s-sci": 7}
            for node_id, seed in seeds.items():
                await fed.add_node(node_id, seed=seed, model=node_id.split("-")[1])
            ids = encode(tmp_path, TEXT)
            per_node = np.stack([expected_logps(bigram_table(s), ids) for s in seeds.values()])  # (3, T)
            comps = [pb.MixtureComponent(specialist=m) for m in ("novel", "code", "sci")]
            reply = await fed.stub.Score(pb.ScoreRequest(text=TEXT, mixture=pb.MixtureSpec(components=comps)),
                                         metadata=meta(ADMIN))
            m = per_node.max(axis=0)
            want = m + np.log(np.exp(per_node - m).sum(axis=0)) - math.log(3)
            np.testing.assert_allclose(reply.logprobs, want, rtol=1e-6)
            assert reply.model == "mixture" and [c.node_id for c in reply.components] == list(seeds)
            for c, lp in zip(reply.components, per_node):
                np.testing.assert_allclose(c.logprobs, lp, rtol=1e-6)
            attribution = np.array([c.attribution for c in reply.components])
            np.testing.assert_allclose(attribution, np.exp(per_node) / np.exp(per_node).sum(axis=0), rtol=1e-5)

            prior = [0.5, 0.3, 0.2]
            reply = await fed.stub.Score(pb.ScoreRequest(text=TEXT, mixture=pb.MixtureSpec(
                components=comps, mode=pb.MIXTURE_MODE_POSTERIOR, prior=prior)), metadata=meta(ADMIN))
            w = np.array(prior)
            for t in range(per_node.shape[1]):
                p = np.exp(per_node[:, t])
                assert reply.logprobs[t] == pytest.approx(math.log(w @ p), rel=1e-5)
                w = w * p / (w @ p)
            np.testing.assert_allclose([c.final_weight for c in reply.components], w, rtol=1e-5)
            stats = await fed.stub.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN))
            mixture = {k.kind: k for k in stats.by_kind}[pb.BYTE_KIND_MIXTURE]
            assert mixture.messages == 6
            assert mixture.sent == 6 * pb.ScoreTokensRequest(token_ids=ids).ByteSize()
        finally:
            await fed.close()
    run(go())


def test_generation_single_node_and_mixture(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            await fed.add_node("a", seed=1, model="novel")
            await fed.add_node("b", seed=2, model="code")
            await fed.add_node("base", seed=3)
            ids = encode(tmp_path, "the cat")
            chunks = [c async for c in fed.stub.Generate(
                pb.GenerateRequest(prompt="the cat", max_new_tokens=5, temperature=0), metadata=meta(ADMIN))]
            table, last, want = bigram_table(3), ids[-1], []
            for _ in range(5):
                last = int(np.argmax(table[last]))
                want.append(last)
            assert [c.token_id for c in chunks] == want
            assert [c.index for c in chunks] == list(range(5))
            assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
            # greedy mixture: argmax of the mean of the two nodes' next-token distributions, by hand
            comps = [pb.MixtureComponent(specialist="novel"), pb.MixtureComponent(specialist="code")]
            for wire_top_k in (0, 4):
                chunks = [c async for c in fed.stub.Generate(pb.GenerateRequest(
                    prompt="the cat", max_new_tokens=4, temperature=0, wire_top_k=wire_top_k,
                    mixture=pb.MixtureSpec(components=comps)), metadata=meta(ADMIN))]
                if wire_top_k == 0:
                    p = (np.exp(bigram_table(1)) + np.exp(bigram_table(2))) / 2
                    last, want = ids[-1], []
                    for _ in range(4):
                        last = int(np.argmax(p[last]))
                        want.append(last)
                    assert [c.token_id for c in chunks] == want
                assert len(chunks) == 4
            stats = await fed.stub.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN))
            gen = {k.kind: k for k in stats.by_kind}[pb.BYTE_KIND_GENERATE]
            assert gen.messages == 1 + 5 + 2 * 4 * 2  # single stream: request + 5 tokens; mixtures: 8 calls each
        finally:
            await fed.close()
    run(go())


def test_access_matrix_exact_status_codes(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            await fed.add_node("n1", seed=1)
            alice = await fed.add_user("alice", boost=2)
            bob = await fed.add_user("bob", boost=3)
            s = fed.stub
            def score(user, token):
                return s.Score(pb.ScoreRequest(user_id=user, text=TEXT), metadata=token)
            assert await _code(score("alice", ())) == grpc.StatusCode.UNAUTHENTICATED
            assert await _code(score("alice", meta("forged-token-xyz"))) == grpc.StatusCode.UNAUTHENTICATED
            assert await _code(score("alice", (("authorization", alice),))) == grpc.StatusCode.UNAUTHENTICATED
            assert await _code(score("alice", meta(bob))) == grpc.StatusCode.PERMISSION_DENIED
            assert await _code(score("alice", meta(NODE))) == grpc.StatusCode.PERMISSION_DENIED
            assert await _code(score("alice", meta(alice))) == grpc.StatusCode.OK
            assert await _code(score("alice", meta(ADMIN))) == grpc.StatusCode.OK
            assert await _code(score("carol", meta(ADMIN))) == grpc.StatusCode.NOT_FOUND
            assert await _code(score("carol", meta(alice))) == grpc.StatusCode.PERMISSION_DENIED
            # own adapter only
            adapter = await s.GetAdapter(pb.GetAdapterRequest(user_id="alice"), metadata=meta(alice))
            assert adapter.data == make_adapter("alice", 2)
            assert await _code(s.GetAdapter(pb.GetAdapterRequest(user_id="bob"), metadata=meta(alice))) == \
                grpc.StatusCode.PERMISSION_DENIED
            # another user's adapter as a mixture component needs the admin token
            mix = pb.MixtureSpec(components=[pb.MixtureComponent(adapter_user_id="bob")])
            assert await _code(s.Score(pb.ScoreRequest(user_id="alice", text=TEXT, mixture=mix),
                                       metadata=meta(alice))) == grpc.StatusCode.PERMISSION_DENIED
            # listings and stats are scoped to the caller
            users = await s.ListUsers(pb.ListUsersRequest(), metadata=meta(alice))
            assert [u.user_id for u in users.users] == ["alice"]
            assert len((await s.ListUsers(pb.ListUsersRequest(), metadata=meta(ADMIN))).users) == 2
            nodes = await s.ListNodes(pb.ListNodesRequest(), metadata=meta(bob))
            assert all(set(n.user_ids) <= {"bob"} for n in nodes.nodes)
            assert (await s.GetStats(pb.GetStatsRequest(), metadata=meta(alice))).user_id == "alice"
            assert await _code(s.GetStats(pb.GetStatsRequest(user_id="bob"), metadata=meta(alice))) == \
                grpc.StatusCode.PERMISSION_DENIED
            # admin RPCs need the admin token
            for token in (alice, NODE):
                assert await _code(s.PutUser(pb.PutUserRequest(user_id="eve"), metadata=meta(token))) == \
                    grpc.StatusCode.PERMISSION_DENIED
                assert await _code(s.ResetStats(pb.ResetStatsRequest(), metadata=meta(token))) == \
                    grpc.StatusCode.PERMISSION_DENIED
            # node registration needs the node token
            control = rpc.NodeControlStub(fed.channel)
            reg = pb.RegisterRequest(node_id="rogue", address="127.0.0.1:9", model="base")
            for token, code in ((ADMIN, grpc.StatusCode.PERMISSION_DENIED), (alice, grpc.StatusCode.PERMISSION_DENIED),
                                ("forged-token-xyz", grpc.StatusCode.UNAUTHENTICATED), (NODE, grpc.StatusCode.OK)):
                assert await _code(control.Register(reg, metadata=meta(token))) == code
            # a rotated token stops working; the new one works
            new = (await s.PutUser(pb.PutUserRequest(user_id="alice", rotate_token=True), metadata=meta(ADMIN))).token
            assert await _code(score("alice", meta(alice))) == grpc.StatusCode.UNAUTHENTICATED
            assert await _code(score("alice", meta(new))) == grpc.StatusCode.OK
        finally:
            await fed.close()
    run(go())


def test_failover_reinstalls_the_adapter_on_another_node(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            await fed.add_node("n1", seed=1)
            await fed.add_node("n2", seed=2)
            alice = await fed.add_user("alice", boost=5, node_id="n1")
            ids = encode(tmp_path, TEXT)
            await fed.nodes["n1"].stop()  # dies without telling anyone
            reply = await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))
            assert (reply.node_id, reply.failed_over) == ("n2", True)
            np.testing.assert_allclose(reply.logprobs, expected_logps(adapted_table(2, make_adapter("alice", 5)), ids),
                                       rtol=1e-6)
            assert fed.nodes["n2"].service.adapters["alice"] == make_adapter("alice", 5)
            assert fed.coordinator.registry.get_user("alice").node_id == "n2"
            assert fed.coordinator.registry.get_node("n1").state == pb.NODE_STATE_DOWN
            again = await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))
            assert (again.node_id, again.failed_over) == ("n2", False)
            # a node that restarted and lost its adapters answers NOT_FOUND: the adapter is reinstalled
            fed.nodes["n2"].service.adapters.clear()
            third = await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))
            np.testing.assert_allclose(third.logprobs, reply.logprobs)
            stats = await fed.stub.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN))
            assert stats.requests_failed_over == 1
            await fed.nodes["n2"].stop()
            assert await _code(fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))) == \
                grpc.StatusCode.UNAVAILABLE
        finally:
            await fed.close()
    run(go())


def test_a_bundle_read_from_disk_does_not_stall_the_coordinator(tmp_path, monkeypatch):
    """The first FetchBundle of a bundle reads its file on a worker thread: while that read is held
    up (a slow disk), the coordinator still answers other calls; the fetch then completes intact."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    readers: list[threading.Thread] = []
    real = Path.read_bytes

    def slow(self: Path) -> bytes:
        if self.suffix == ".bundle":
            readers.append(threading.current_thread())
            started.set()
            release.wait(10)
            finished.set()
        return real(self)

    async def go():
        fed = await federation(tmp_path)
        try:
            data = os.urandom(20_000)
            fed.coordinator.store.put_bytes("base.int8", data, model="base", codec="int8")
            monkeypatch.setattr(Path, "read_bytes", slow)
            admin = fed.stub
            control = rpc.NodeControlStub(fed.channel)
            fetch = asyncio.ensure_future(_drain(control.FetchBundle(
                pb.FetchBundleRequest(node_id="n1", name="base.int8"), metadata=meta(NODE))))
            while not started.is_set():
                await asyncio.sleep(0.01)
            stats = await admin.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN), timeout=20)
            answered_during_read = not finished.is_set()
            release.set()
            assert answered_during_read and stats is not None
            assert b"".join(await fetch) == data
            assert readers and all(t is not threading.main_thread() for t in readers)
        finally:
            release.set()
            await fed.close()
    run(go())


async def _drain(call) -> list[bytes]:
    return [chunk.data async for chunk in call]


def test_bundle_fetch_is_chunked_resumable_and_counted(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            data = os.urandom(50_000)
            sha = hashlib.sha256(data).digest()

            def upload():
                for off in range(0, len(data), 8000):
                    first = off == 0
                    yield pb.BundleChunk(name="base.int8" if first else "", offset=off, data=data[off:off + 8000],
                                         total_size=len(data) if first else 0, sha256=sha if first else b"",
                                         model="base" if first else "", codec="int8" if first else "")
            ref = await fed.stub.PutBundle(upload(), metadata=meta(ADMIN))
            assert (ref.size, ref.sha256) == (len(data), sha)
            control = rpc.NodeControlStub(fed.channel)
            reg = await control.Register(pb.RegisterRequest(node_id="n1", address="127.0.0.1:9", model="base"),
                                         metadata=meta(NODE))
            assert [b.name for b in reg.bundles] == ["base.int8"]
            got, call = [], control.FetchBundle(pb.FetchBundleRequest(node_id="n1", name="base.int8"),
                                                metadata=meta(NODE))
            async for chunk in call:
                assert (chunk.total_size, chunk.sha256, chunk.offset) == (len(data), sha, sum(map(len, got)))
                assert len(chunk.data) <= 4096
                got.append(chunk.data)
                if len(got) == 3:
                    call.cancel()  # the stream is cut
                    break
            async for chunk in control.FetchBundle(pb.FetchBundleRequest(
                    node_id="n1", name="base.int8", offset=sum(map(len, got)), expected_sha256=sha),
                    metadata=meta(NODE)):
                got.append(chunk.data)
            assert b"".join(got) == data
            stats = await fed.stub.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN))
            bundle = {k.kind: k for k in stats.by_kind}[pb.BYTE_KIND_BUNDLE]
            # the 3 chunks before the cut and the rest, plus what left before the cut reached the server
            # (bounded by HTTP/2's 64 KiB flow-control window)
            assert len(data) <= bundle.payload <= len(data) + 65_535
            # an uncut fetch costs exactly the bundle plus each chunk's framing
            chunks = [c async for c in control.FetchBundle(pb.FetchBundleRequest(node_id="n1", name="base.int8"),
                                                           metadata=meta(NODE))]
            stats = await fed.stub.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN))
            after = {k.kind: k for k in stats.by_kind}[pb.BYTE_KIND_BUNDLE]
            assert after.payload - bundle.payload == len(data)
            assert after.sent - bundle.sent == sum(c.ByteSize() for c in chunks)
            assert len(chunks) == math.ceil(len(data) / 4096)
            # errors: offset past the end, changed bundle, unknown bundle, path-like name
            cases = [(pb.FetchBundleRequest(name="base.int8", offset=len(data) + 1), grpc.StatusCode.OUT_OF_RANGE),
                     (pb.FetchBundleRequest(name="base.int8", expected_sha256=b"x" * 32),
                      grpc.StatusCode.FAILED_PRECONDITION),
                     (pb.FetchBundleRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
                     (pb.FetchBundleRequest(name="../registry.db"), grpc.StatusCode.INVALID_ARGUMENT)]
            for request, code in cases:
                assert await _stream_code(control.FetchBundle(request, metadata=meta(NODE))) == code
            bad = pb.BundleChunk(name="bad", offset=0, data=b"abc", total_size=3, sha256=b"y" * 32)
            assert await _code(fed.stub.PutBundle(iter([bad]), metadata=meta(ADMIN))) == \
                grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await fed.close()
    run(go())


def test_concurrency_cap_sheds_with_resource_exhausted_and_keeps_serving(tmp_path):
    async def go():
        fed = await federation(tmp_path, max_concurrent_rpcs=3)
        try:
            await fed.add_node("slow", seed=1, delay_s=0.4)
            codes = await asyncio.gather(*[_code(fed.stub.Score(pb.ScoreRequest(text=TEXT), metadata=meta(ADMIN)))
                                           for _ in range(10)])
            assert codes.count(grpc.StatusCode.OK) == 3
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 7
            health = health_pb2_grpc.HealthStub(fed.channel)  # health is never shed
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == 1
            assert await _code(fed.stub.Score(pb.ScoreRequest(text=TEXT), metadata=meta(ADMIN))) == grpc.StatusCode.OK
            stats = await fed.stub.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN))
            assert stats.requests_shed == 7
        finally:
            await fed.close()
    run(go())


def test_deadlines_and_client_disconnects(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            node = await fed.add_node("slow", seed=1, delay_s=0.3)
            call = fed.stub.Score(pb.ScoreRequest(text=TEXT), metadata=meta(ADMIN), timeout=0.1)
            assert await _code(call) == grpc.StatusCode.DEADLINE_EXCEEDED
            stream = fed.stub.Generate(pb.GenerateRequest(prompt="the cat", max_new_tokens=50), metadata=meta(ADMIN))
            got = 0
            async for _ in stream:
                got += 1
                if got == 2:
                    stream.cancel()
                    break
            await asyncio.wait_for(node.service.cancelled.wait(), 5)  # the node's stream was cancelled too
            reply = await fed.stub.Score(pb.ScoreRequest(text=TEXT), metadata=meta(ADMIN), timeout=5)
            assert len(reply.logprobs) == len(TEXT.split()) - 1
        finally:
            await fed.close()
    run(go())


def test_hostile_and_malformed_requests_get_precise_codes(tmp_path):
    async def go():
        fed = await federation(tmp_path, max_text_chars=200)
        try:
            await fed.add_node("n1", seed=1)
            await fed.add_user("alice", boost=1)
            s, A = fed.stub, meta(ADMIN)
            comp = pb.MixtureComponent
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            cases = [
                (s.Score(pb.ScoreRequest(text=""), metadata=A), invalid),
                (s.Score(pb.ScoreRequest(text="x" * 201), metadata=A), invalid),
                (s.Score(pb.ScoreRequest(text="cat"), metadata=A), invalid),  # one token
                (s.Score(pb.ScoreRequest(user_id="../../etc", text=TEXT), metadata=A), invalid),
                (s.Score(pb.ScoreRequest(user_id="a" * 65, text=TEXT), metadata=A), invalid),
                (s.Score(pb.ScoreRequest(text=TEXT, mixture=pb.MixtureSpec()), metadata=A), invalid),
                (s.Score(pb.ScoreRequest(text=TEXT, mixture=pb.MixtureSpec(components=[comp()] * 17)), metadata=A),
                 invalid),
                (s.Score(pb.ScoreRequest(text=TEXT, mixture=pb.MixtureSpec(components=[comp()], mode=9)), metadata=A),
                 invalid),
                (s.Score(pb.ScoreRequest(text=TEXT, mixture=pb.MixtureSpec(components=[comp(), comp()],
                                                                           prior=[1.0, math.nan])), metadata=A),
                 invalid),
                (s.Score(pb.ScoreRequest(text=TEXT, mixture=pb.MixtureSpec(components=[comp(node_id="ghost")])),
                         metadata=A), grpc.StatusCode.NOT_FOUND),
                (s.Score(pb.ScoreRequest(text=TEXT, mixture=pb.MixtureSpec(components=[comp(specialist="none")])),
                         metadata=A), grpc.StatusCode.UNAVAILABLE),
                (s.GetAdapter(pb.GetAdapterRequest(user_id="ghost"), metadata=A), grpc.StatusCode.NOT_FOUND),
                (s.AssignUser(pb.AssignUserRequest(user_id="alice", node_id="ghost"), metadata=A),
                 grpc.StatusCode.NOT_FOUND),
                (s.SetNodeState(pb.SetNodeStateRequest(node_id="n1", state=1), metadata=A), invalid),
                (s.ListNodes(pb.ListNodesRequest(state=42), metadata=A), invalid),
            ]
            for awaitable, code in cases:
                assert await _code(awaitable) == code
            for request in (pb.GenerateRequest(prompt="the", max_new_tokens=0),
                            pb.GenerateRequest(prompt="the", max_new_tokens=10_000),
                            pb.GenerateRequest(prompt="the", max_new_tokens=2, temperature=math.nan),
                            pb.GenerateRequest(prompt="the", max_new_tokens=2, temperature=math.inf),
                            pb.GenerateRequest(prompt="the", max_new_tokens=2, top_k=10**6),
                            pb.GenerateRequest(prompt="", max_new_tokens=2)):
                assert await _stream_code(s.Generate(request, metadata=A)) == invalid
            # raw garbage on the wire, where a ScoreRequest should be
            garbage = fed.channel.unary_unary("/fractal.federation.v1.Federation/Score",
                                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
            assert await _code(garbage(b"\xff\xff\xff\xff\x0f", metadata=A)) == invalid
            assert await _code(garbage(b"\x12\x03\xff\xfe\xfd", metadata=A)) == invalid  # invalid UTF-8 text
            # an unknown method, and a message over the size limit
            unknown = fed.channel.unary_unary("/fractal.federation.v1.Federation/Nope",
                                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
            assert await _code(unknown(b"", metadata=A)) == grpc.StatusCode.UNIMPLEMENTED
            huge = pb.PutUserRequest(user_id="big", adapter=pb.Adapter(data=b"x" * 200_000))
            assert await _code(s.PutUser(huge, metadata=A)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            # still serving, nothing lost
            assert await _code(s.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=A)) == grpc.StatusCode.OK
            assert [u.user_id for u in (await s.ListUsers(pb.ListUsersRequest(), metadata=A)).users] == ["alice"]
        finally:
            await fed.close()
    run(go())


def test_restart_loses_nothing(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        await fed.add_node("n1", seed=1)
        alice = await fed.add_user("alice", boost=3, node_id="n1")
        await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))
        before = await fed.stub.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN))
        node = fed.nodes["n1"]
        await fed.channel.close()
        await fed.coordinator.stop()

        handle = await serve(make_config(tmp_path))  # same database, new process state, new port
        try:
            async with grpc.aio.insecure_channel(handle.address) as ch:
                stub = rpc.FederationStub(ch)
                after = await stub.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN))
                assert after.bytes_total == before.bytes_total and after.requests_ok == before.requests_ok + 1
                users = await stub.ListUsers(pb.ListUsersRequest(), metadata=meta(alice))  # the token survived
                assert [(u.user_id, u.node_id, u.has_adapter) for u in users.users] == [("alice", "n1", True)]
                reply = await stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))
                assert reply.node_id == "n1"  # the node is still known, healthy and reachable
        finally:
            await handle.stop()
            await node.stop()
    run(go())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_end_to_end(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)

    async def go():
        handle = await start_coordinator(tmp_path, tls_cert=cert, tls_key=key)
        try:
            target = f"localhost:{handle.port}"
            creds = grpc.ssl_channel_credentials(cert.read_bytes())
            async with grpc.aio.secure_channel(target, creds) as ch:
                reply = await rpc.FederationStub(ch).ListUsers(pb.ListUsersRequest(), metadata=meta(ADMIN), timeout=5)
                assert list(reply.users) == []
            async with grpc.aio.insecure_channel(target) as ch:  # plaintext to a TLS port fails
                assert await _code(rpc.FederationStub(ch).ListUsers(pb.ListUsersRequest(), metadata=meta(ADMIN),
                                                                    timeout=2)) == grpc.StatusCode.UNAVAILABLE
        finally:
            await handle.stop()
    run(go())


def test_node_lifecycle_heartbeats_and_watchdog(tmp_path):
    async def go():
        fed = await federation(tmp_path, heartbeat_interval_ms=100, missed_heartbeats=3)
        try:
            node = await start_fake_node(fed.coordinator.address, "n1", seed=1, heartbeat=False)
            fed.nodes["n1"] = node
            assert fed.stub is not None  # opens the shared channel
            control = rpc.NodeControlStub(fed.channel)
            registry = fed.coordinator.registry
            score = pb.ScoreRequest(text=TEXT)
            assert registry.get_node("n1").state == pb.NODE_STATE_REGISTERED
            assert await _code(fed.stub.Score(score, metadata=meta(ADMIN))) == grpc.StatusCode.UNAVAILABLE

            async def beat(state):
                return await control.Heartbeat(pb.HeartbeatRequest(node_id="n1", state=state, inflight=2,
                                                                   expert_mask=b"\xff\x0f"), metadata=meta(NODE))
            assert (await beat(pb.NODE_STATE_HEALTHY)).known
            assert await _code(fed.stub.Score(score, metadata=meta(ADMIN))) == grpc.StatusCode.OK
            info = (await fed.stub.ListNodes(pb.ListNodesRequest(), metadata=meta(ADMIN))).nodes[0]
            assert (info.state, info.inflight, info.expert_mask, info.address) == (
                pb.NODE_STATE_HEALTHY, 2, b"\xff\x0f", node.address)
            await fed.stub.SetNodeState(pb.SetNodeStateRequest(node_id="n1", state=pb.NODE_STATE_DRAINING),
                                        metadata=meta(ADMIN))
            await beat(pb.NODE_STATE_HEALTHY)
            assert registry.get_node("n1").state == pb.NODE_STATE_DRAINING  # the admin's drain holds
            await beat(pb.NODE_STATE_DOWN)
            assert registry.get_node("n1").state == pb.NODE_STATE_DOWN  # a closing node says so
            await fed.stub.SetNodeState(pb.SetNodeStateRequest(node_id="n1", state=pb.NODE_STATE_HEALTHY),
                                        metadata=meta(ADMIN))
            await beat(pb.NODE_STATE_HEALTHY)
            await asyncio.sleep(0.6)  # silence: 3 missed intervals of 100 ms, checked every 100 ms
            assert registry.get_node("n1").state == pb.NODE_STATE_DOWN
            await beat(pb.NODE_STATE_HEALTHY)
            assert registry.get_node("n1").state == pb.NODE_STATE_HEALTHY
            fed.coordinator.core.prefetch_planner = lambda n: [pb.ByteRange(bundle="base", offset=n.inflight,
                                                                            length=100)]
            reply = await beat(pb.NODE_STATE_HEALTHY)
            assert [(r.bundle, r.offset, r.length) for r in reply.prefetch] == [("base", 2, 100)]
            ghost = await control.Heartbeat(pb.HeartbeatRequest(node_id="ghost", state=pb.NODE_STATE_HEALTHY),
                                            metadata=meta(NODE))
            assert not ghost.known
            bad = pb.RoutingReport(node_id="n1", histogram=pb.RoutingHistogram(n_blocks=2, n_experts=16, counts=[1]))
            assert await _code(control.ReportRouting(bad, metadata=meta(NODE))) == grpc.StatusCode.INVALID_ARGUMENT
            good = pb.RoutingReport(node_id="n1", histogram=pb.RoutingHistogram(
                n_blocks=2, n_experts=16, counts=list(range(32)), tokens=16))
            await control.ReportRouting(good, metadata=meta(NODE))
            routing = await fed.stub.GetRoutingStats(pb.GetRoutingStatsRequest(), metadata=meta(ADMIN))
            assert list(routing.total.counts) == list(range(32)) and routing.total.tokens == 16
        finally:
            await fed.close()
    run(go())


def test_tokenizer_injection_and_its_absence(tmp_path):
    from tokenizers import Tokenizer

    async def go():
        make_config(tmp_path)  # writes tokenizer.json
        raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        handle = await serve(make_config(tmp_path, tokenizer_path=None), tokenizer=raw)
        fed = Federation(tmp_path, handle)
        try:
            await fed.add_node("n1", seed=1)
            reply = await fed.stub.Score(pb.ScoreRequest(text=TEXT), metadata=meta(ADMIN))
            assert list(reply.token_ids) == encode(tmp_path, TEXT)[1:]
        finally:
            await fed.close()
        bare = await serve(make_config(tmp_path, tokenizer_path=None, db_path=tmp_path / "other.db"))
        try:
            async with grpc.aio.insecure_channel(bare.address) as ch:
                assert await _code(rpc.FederationStub(ch).Score(pb.ScoreRequest(text=TEXT), metadata=meta(ADMIN))) \
                    == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await bare.stop()
    run(go())


def test_a_hung_node_is_failed_over_after_the_node_timeout_but_a_client_deadline_is_not(tmp_path):
    async def go():
        fed = await federation(tmp_path, node_timeout_s=0.5)
        try:
            await fed.add_node("hung", seed=1)
            alice = await fed.add_user("alice", boost=5, node_id="hung")
            fed.nodes["hung"].service.delay_s = 3.0  # from now on it answers, but long after the node timeout
            # the client's own deadline runs out first: its error, and the node is not blamed
            late = fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice), timeout=0.3)
            assert await _code(late) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert fed.coordinator.registry.get_node("hung").state == pb.NODE_STATE_HEALTHY
            await fed.add_node("ok", seed=2)
            reply = await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice), timeout=10)
            assert (reply.node_id, reply.failed_over) == ("ok", True)
            np.testing.assert_allclose(reply.logprobs, expected_logps(adapted_table(2, make_adapter("alice", 5)),
                                                                      encode(tmp_path, TEXT)), rtol=1e-6)
            assert fed.coordinator.registry.get_user("alice").node_id == "ok"
        finally:
            await fed.close()
    run(go())


def test_a_generation_whose_node_dies_mid_stream_is_resumed_on_another_node(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            await fed.add_node("n1", seed=1, delay_s=0.3)  # 0.3 s between tokens: the stop lands between 2 and 3
            alice = await fed.add_user("alice", boost=5, node_id="n1")
            await fed.add_node("n2", seed=2)
            chunks = []
            stream = fed.stub.Generate(pb.GenerateRequest(user_id="alice", prompt="the cat", max_new_tokens=6),
                                       metadata=meta(alice), timeout=30)
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 2:
                    await fed.nodes["n1"].stop()  # dies mid-stream, telling no one
            # greedy on both fake nodes: the first two tokens are n1's, the rest n2's continuation of them
            adapter = make_adapter("alice", 5)
            expected, last = [], encode(tmp_path, "the cat")[-1]
            for i in range(6):
                table = adapted_table(1 if i < 2 else 2, adapter)
                last = int(np.argmax(table[last]))
                expected.append(last)
            assert [c.token_id for c in chunks] == expected
            assert [c.index for c in chunks] == list(range(6))
            assert [c.node_id for c in chunks] == ["n1", "n1"] + ["n2"] * 4
            assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert fed.coordinator.registry.get_user("alice").node_id == "n2"
            stats = await fed.stub.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN))
            assert stats.requests_failed_over == 1
        finally:
            await fed.close()
    run(go())
