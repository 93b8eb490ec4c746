"""Assembling served models: partial materialisation, sharing between virtual nodes, masks."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from node_support import TINY, bundle_bytes, decoded, log_softmax_next, random_adapter, tiny_model

from model.codecs import encode_state_dict, fake_quantise
from model.fractal_moe import build_model, expert_of
from node.adapters import encode_adapter
from node.assembly import AssemblyError, WeightStore, decode_bundle, pack_mask, unpack_mask
from node.errors import InstallFailed
from node.runtime import VirtualNode
from proto.bundle import encode_bundle

MODEL = tiny_model(3)
IDS = torch.randint(0, TINY.vocab_size, (48,), generator=torch.Generator().manual_seed(0)).tolist()


def first_half(name: str) -> bool:
    where = expert_of(name)
    return where is None or where[1] < 8


def second_half(name: str) -> bool:
    where = expert_of(name)
    return where is not None and where[1] >= 8


def test_pack_mask_follows_the_proto_bit_order():
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 0] = mask[0, 9] = mask[1, 15] = True  # bits 0, 9 and 31
    assert pack_mask(mask) == bytes([0b00000001, 0b00000010, 0, 0b10000000])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.integers(0, 2**32))
def test_mask_round_trip(blocks, experts, seed):
    mask = torch.rand(blocks, experts, generator=torch.Generator().manual_seed(seed)) < 0.5
    assert torch.equal(unpack_mask(pack_mask(mask), blocks, experts), mask)


def test_partial_bundle_serves_with_substitution_then_completes():
    async def main():
        node = VirtualNode("n1", store=WeightStore())
        await node.adopt([decoded("core+0-7", MODEL, first_half)])
        partial_mask = node.mask.clone()
        partial, _ = await node.score(IDS)
        await node.adopt([decoded("experts-8-15", MODEL, second_half)])
        full, _ = await node.score(IDS)
        return partial_mask, partial, full, node.mask.clone(), node.installed_names()

    partial_mask, partial, full, full_mask, names = asyncio.run(main())
    assert partial_mask[:, :8].all() and not partial_mask[:, 8:].any()
    with MODEL.serving(available=partial_mask):
        expected_partial = log_softmax_next(MODEL, IDS)
    assert torch.allclose(partial, expected_partial, atol=1e-5)
    assert torch.allclose(full, log_softmax_next(MODEL, IDS), atol=1e-5)
    assert not torch.allclose(partial, full, atol=1e-3)  # the missing experts really mattered
    assert full_mask.all() and names == ["core+0-7", "experts-8-15"]


def test_bad_bundle_sets_are_refused_and_leave_the_node_as_it_was():
    async def main():
        node = VirtualNode("n1", store=WeightStore())
        with pytest.raises(InstallFailed, match="non-expert"):
            await node.adopt([decoded("experts-only", MODEL, second_half)])
        await node.adopt([decoded("full", MODEL)])
        before, _ = await node.score(IDS)
        no_block0 = decoded("no-experts-in-block-0", MODEL, lambda n: (expert_of(n) or (1, 0))[0] != 0)
        # every non-expert tensor but no expert of block 0: a block must have at least one
        fresh = VirtualNode("n2", store=node.store)
        with pytest.raises(InstallFailed, match="block 0 has no expert"):
            await fresh.adopt([no_block0])
        after, _ = await node.score(IDS)
        return before, after, node.installed_names(), fresh.served

    before, after, names, fresh_served = asyncio.run(main())
    assert torch.equal(before, after) and names == ["full"] and fresh_served is None


def test_virtual_nodes_share_weights_but_not_masks_or_adapters():
    async def main():
        store = WeightStore()
        a, b, c, d = (VirtualNode(f"n{i}", store=store) for i in range(4))
        full = decoded("full", MODEL)
        core, rest = decoded("core+0-7", MODEL, first_half), decoded("experts-8-15", MODEL, second_half)
        await a.adopt([full])
        await b.adopt([full])
        await c.adopt([core])
        await d.adopt([core, rest])
        ad = random_adapter(MODEL, 5)
        a.load_adapter("alice", encode_adapter(ad))
        sa, _ = await a.score(IDS, "alice")
        sb, _ = await b.score(IDS)
        sc, _ = await c.score(IDS)
        sd, _ = await d.score(IDS)
        stats = store.stats()
        shared = a.served is b.served and c.served is not d.served
        same_tensor = c.served.module.tok_emb.weight.data_ptr() == d.served.module.tok_emb.weight.data_ptr()
        b_has_alice = b.adapters.get("alice") is not None
        a.close()
        b.close()
        after_ab = store.stats()
        c.close()
        d.close()
        return sa, sb, sc, sd, ad, stats, shared, same_tensor, b_has_alice, after_ab, store.stats()

    sa, sb, sc, sd, ad, stats, shared, same_tensor, b_has_alice, after_ab, empty = asyncio.run(main())
    assert shared and same_tensor and not b_has_alice
    assert stats["models"] == 3 and stats["bundles"] == 3 and stats["references"] == 4
    assert torch.allclose(sa, log_softmax_next(MODEL, IDS, ad), atol=1e-5)
    assert torch.allclose(sb, log_softmax_next(MODEL, IDS), atol=1e-5)
    assert torch.allclose(sd, sb, atol=1e-6) and not torch.allclose(sb, sc, atol=1e-3)
    assert after_ab["models"] == 2 and after_ab["bundles"] == 2
    assert empty == {"bundles": 0, "models": 0, "references": 0, "weight_bytes": 0}


def test_assemble_refuses_mixed_shapes():
    other = tiny_model(0)
    wide = build_model(dataclasses.replace(TINY, d_ff=48), 0)
    store = WeightStore()
    with pytest.raises(AssemblyError, match="another model shape"):
        store.acquire([decoded("a", other), decoded("b", wide)])
    assert store.stats()["bundles"] == 0


@pytest.mark.parametrize("codec", ["int8", "ternary", "fp16"])
def test_a_decoded_bundle_is_the_model_and_carries_the_identity_given_or_computed(codec):
    data = bundle_bytes(MODEL, expert_codec=codec, other_codec="fp16")
    computed = decode_bundle(data, name="b")
    given_ = decode_bundle(data, name="b", sha256=b"\x07" * 32)
    assert computed.sha256 == hashlib.sha256(data).digest() and given_.sha256 == b"\x07" * 32
    sd = MODEL.state_dict()
    for k, t in computed.tensors.items():  # the same bits either way: what the codec's arithmetic gives
        want = fake_quantise(sd[k], codec if expert_of(k) is not None else "fp16")
        assert torch.equal(t, given_.tensors[k]) and torch.equal(t, want)


def test_an_int8_bundle_with_an_infinite_scale_is_refused_before_install():
    """The bundle's digests are right (it was written that way): only the codec's scale check objects,
    since assembly no longer sums int8 weights to find non-finite ones."""
    records = encode_state_dict(MODEL.state_dict(), expert_codec="int8", other_codec="fp16")
    i = next(i for i, r in enumerate(records) if r.codec == "int8")
    r = records[i]
    records[i] = dataclasses.replace(r, payload=struct.pack("<f", float("inf")) + r.payload[4:])
    data = encode_bundle(records, {"model": "base", "model_config": dataclasses.asdict(MODEL.cfg)})
    with pytest.raises(AssemblyError, match="scale is not finite"):
        decode_bundle(data, name="b")
