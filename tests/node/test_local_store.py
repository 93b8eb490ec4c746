"""node.local_store: a node's verified bundles on its own disk, read back only when intact."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from model.codecs import encode_state_dict
from model.config import PRESETS
from model.fractal_moe import build_model
from node.fetch import Fetched, FetchPolicy
from node.local_store import LocalBundles, fetch_or_load
from proto import federation_pb2 as pb
from proto.bundle import encode_bundle, read_bundle_verified, read_manifest

DATA = encode_bundle(encode_state_dict(build_model(PRESETS["tiny"].model, 2).state_dict(), expert_codec="int8",
                                       other_codec="fp16"), {"model": "base"})
SHA = hashlib.sha256(DATA).digest()
REF = pb.BundleRef(name="base-int8", size=len(DATA), sha256=SHA)


def fetched() -> Fetched:
    return Fetched(name="base-int8", bundle=read_bundle_verified([DATA]), size=len(DATA), sha256=SHA,
                   payload_bytes=len(DATA), resumes=0, refetches=0)


def test_a_saved_bundle_reads_back_byte_for_byte_and_is_shared_by_hard_link(tmp_path):
    store = LocalBundles(tmp_path)
    path = store.save("n1", fetched())
    assert path == tmp_path / "n1" / f"{SHA.hex()}.ffb" and path.read_bytes() == DATA
    got = store.load("n1", REF)
    assert got is not None and got.payload_bytes == 0 and got.sha256 == SHA
    assert encode_bundle(got.bundle.records, got.bundle.meta) == DATA
    other = store.save("n2", fetched())
    assert other is not None and other.stat().st_ino == path.stat().st_ino  # one file on disk, two names
    assert store.held("n1") == [SHA.hex()] and store.held("n9") == []



def test_a_version_1_bundle_is_kept_in_its_own_version(tmp_path):
    """A coordinator may still serve format-1 bundles (SHA-256 tensor digests): the node keeps them
    byte for byte, since it re-encodes what it verified in the version it was read from."""
    old = encode_bundle(read_bundle_verified([DATA]).records, {"model": "base"}, version=1)
    sha = hashlib.sha256(old).digest()
    got = Fetched(name="old", bundle=read_bundle_verified([old]), size=len(old), sha256=sha,
                  payload_bytes=len(old), resumes=0, refetches=0)
    assert got.bundle.version == 1 and old != DATA
    path = LocalBundles(tmp_path).save("n1", got)
    assert path is not None and path.read_bytes() == old
    back = LocalBundles(tmp_path).load("n1", pb.BundleRef(name="old", size=len(old), sha256=sha))
    assert back is not None and [r.payload for r in back.bundle] == [r.payload for r in got.bundle]

@pytest.mark.parametrize("where", ["header", "payload", "truncated"])
def test_a_damaged_copy_is_deleted_and_not_used(tmp_path, where):
    store = LocalBundles(tmp_path)
    path = store.save("n1", fetched())
    data = bytearray(DATA)
    if where == "truncated":
        data = data[: len(data) // 2]
    else:
        m = read_manifest(DATA)
        i = 3 if where == "header" else m.payload_start + m.entries[len(m.entries) // 2].offset
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.load("n1", REF) is None and not path.exists()


def test_nothing_is_read_without_a_sha256_to_check_it_by(tmp_path):
    store = LocalBundles(tmp_path)
    store.save("n1", fetched())
    assert store.load("n1", pb.BundleRef(name="base-int8")) is None
    assert store.load("n1", pb.BundleRef(name="base-int8", sha256=bytes(32))) is None  # another bundle


def test_fetch_or_load_reads_from_disk_and_fetches_only_what_is_missing(tmp_path):
    class Stub:
        calls = 0

        def FetchBundle(self, request, **kw):
            Stub.calls += 1
            raise AssertionError("a bundle held on disk must not be fetched")

    store = LocalBundles(tmp_path)
    store.save("n1", fetched())
    got, from_disk = asyncio.run(fetch_or_load(Stub(), REF, node_id="n1", metadata=(), policy=FetchPolicy(),
                                               local=store))
    assert from_disk and got.sha256 == SHA and Stub.calls == 0
    with pytest.raises(AssertionError, match="must not be fetched"):  # n2 holds nothing: it fetches
        asyncio.run(fetch_or_load(Stub(), REF, node_id="n2", metadata=(), policy=FetchPolicy(), local=store))
