"""Defects outside clients found (issue 15, item 4), each pinned by a test on a real coordinator.

A pinned mixture component must be served by the model it names; an adapter upload is checked as a
node would check it; per-user statistics count the user's own requests; health answers for the
service names the docs give; GetStats for an unknown user is NOT_FOUND like every other RPC.
"""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest
import torch
from coordinator_harness import ADMIN, federation, meta, run, start_coordinator
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save as st_save

from model.adapter_blob import encode_adapter
from proto import federation_pb2 as pb
from proto.bundle.format import TensorRecord
from proto.bundle.writer import encode_bundle

TEXT = "the cat sat on the mat and then the dog ran to the park"


async def _error(awaitable) -> tuple[grpc.StatusCode, str]:
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_a_component_pinned_to_a_node_of_another_model_is_refused_naming_both(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            await fed.add_node("prog", seed=1, model="programmer")
            await fed.add_node("nov", seed=2, model="novelist")
            mix = pb.MixtureSpec(components=[pb.MixtureComponent(specialist="novelist", node_id="prog")])
            code, message = await _error(fed.stub.Score(pb.ScoreRequest(text=TEXT, mixture=mix), metadata=meta(ADMIN)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "programmer" in message and "novelist" in message and "prog" in message
            gen = fed.stub.Generate(pb.GenerateRequest(prompt="the cat", max_new_tokens=2, mixture=mix),
                                    metadata=meta(ADMIN))
            code, _ = await _error(gen.read())
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            # pinned to a node of the model it names: served there
            ok = pb.MixtureSpec(components=[pb.MixtureComponent(specialist="novelist", node_id="nov")])
            reply = await fed.stub.Score(pb.ScoreRequest(text=TEXT, mixture=ok), metadata=meta(ADMIN))
            assert reply.components[0].node_id == "nov"
        finally:
            await fed.close()
    run(go())


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save(tensors)


def _put(fed, user_id: str, data: bytes, **adapter):
    return fed.stub.PutUser(pb.PutUserRequest(user_id=user_id, adapter=pb.Adapter(
        data=data, sha256=hashlib.sha256(data).digest(), **adapter)), metadata=meta(ADMIN))


def test_put_user_refuses_an_adapter_no_node_could_install(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            bad = {
                "not safetensors": b"any bytes at all",
                "not a norm parameter": _safetensors({"blocks.0.attn.weight": torch.ones(4)}),
                "NaN": encode_adapter({"ln_f.weight": torch.full((4,), float("nan"))}),
                "integer dtype": _safetensors({"ln_f.weight": torch.ones(4, dtype=torch.int32)}),
                "pickle format": (encode_adapter({"ln_f.weight": torch.ones(4)}), {"format": "pickle"}),
            }
            codes = {}
            for what, case in bad.items():
                data, extra = case if isinstance(case, tuple) else (case, {})
                codes[what] = (await _error(_put(fed, "mallory", data, **extra)))[0]
            assert codes == dict.fromkeys(bad, grpc.StatusCode.INVALID_ARGUMENT)
            listed = await fed.stub.ListUsers(pb.ListUsersRequest(), metadata=meta(ADMIN))
            assert "mallory" not in {u.user_id for u in listed.users}  # nothing half-created

            # once the store holds the base model, shapes and exact names are checked against it
            records = [TensorRecord("ln_f.weight", "fp32", (4,), np.ones(4, np.float32).tobytes()),
                       TensorRecord("ln_f.bias", "fp32", (4,), np.zeros(4, np.float32).tobytes())]
            fed.coordinator.store.put_bytes("base.fp32", encode_bundle(records), model="base", codec="fp32")
            wrong_shape = encode_adapter({"ln_f.weight": torch.ones(5)})
            unknown_norm = encode_adapter({"blocks.7.ln1.weight": torch.ones(4)})
            assert (await _error(_put(fed, "mallory", wrong_shape)))[0] == grpc.StatusCode.INVALID_ARGUMENT
            assert (await _error(_put(fed, "mallory", unknown_norm)))[0] == grpc.StatusCode.INVALID_ARGUMENT
            good = await _put(fed, "alice", encode_adapter({"ln_f.weight": torch.ones(4), "ln_f.bias": torch.zeros(4)}))
            assert good.user.has_adapter
        finally:
            await fed.close()
    run(go())


def test_per_user_stats_count_the_users_own_requests(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            await fed.add_node("n1", seed=1)
            alice = await fed.add_user("alice", boost=3, node_id="n1")
            bob = await fed.add_user("bob")
            for _ in range(3):
                await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))
            failed = await _error(fed.stub.Score(pb.ScoreRequest(user_id="alice", text="cat"), metadata=meta(alice)))
            assert failed[0] == grpc.StatusCode.INVALID_ARGUMENT
            await fed.stub.Score(pb.ScoreRequest(user_id="bob", text=TEXT), metadata=meta(bob))
            await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(ADMIN))  # for alice
            own = await fed.stub.GetStats(pb.GetStatsRequest(), metadata=meta(alice))
            assert (own.user_id, own.requests_ok, own.requests_failed, own.requests_shed) == ("alice", 4, 1, 0)
            by_admin = await fed.stub.GetStats(pb.GetStatsRequest(user_id="bob"), metadata=meta(ADMIN))
            assert (by_admin.requests_ok, by_admin.requests_failed) == (1, 0)
            total = await fed.stub.GetStats(pb.GetStatsRequest(), metadata=meta(ADMIN))
            assert total.requests_ok >= 6 and total.requests_failed >= 1
        finally:
            await fed.close()
    run(go())


def test_per_user_counts_survive_a_restart(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            await fed.add_node("n1", seed=1)
            alice = await fed.add_user("alice")
            await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))
        finally:
            await fed.close()
        handle = await start_coordinator(tmp_path)
        try:
            assert handle.core.stats("alice").requests_ok == 1
        finally:
            await handle.stop()
    run(go())


def test_get_stats_for_an_unknown_user_is_not_found(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            code, message = await _error(fed.stub.GetStats(pb.GetStatsRequest(user_id="nobody"), metadata=meta(ADMIN)))
            assert code == grpc.StatusCode.NOT_FOUND and "nobody" in message
        finally:
            await fed.close()
    run(go())


@pytest.mark.parametrize("service,serving", [
    ("", True), ("fractal.federation.v1.Federation", True), ("fractal.federation.v1.NodeControl", True),
    ("fractal.federation.v1.Node", False)])
def test_health_answers_for_the_service_names_docs_api_gives(tmp_path, service, serving):
    async def go():
        handle = await start_coordinator(tmp_path)
        try:
            async with grpc.aio.insecure_channel(handle.address) as ch:
                check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))
                if serving:
                    assert (await check).status == health_pb2.HealthCheckResponse.SERVING
                else:  # nodes serve Node; the coordinator does not
                    assert (await _error(check))[0] == grpc.StatusCode.NOT_FOUND
        finally:
            await handle.stop()
    run(go())
