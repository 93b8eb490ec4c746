"""The bundle format: round trips, streaming, resumption, sub-bundles, and every fault named and atomic."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.bundle import (
    HEADER_SIZE,
    MAGIC,
    SUPPORTED_VERSIONS,
    BundleError,
    BundleReader,
    ChecksumMismatch,
    Chunk,
    CorruptChunk,
    CorruptHeader,
    CorruptManifest,
    DuplicateChunk,
    InvalidRecord,
    MissingTensor,
    NotABundle,
    OutOfOrderChunk,
    OversizedChunk,
    ShapeMismatch,
    TensorRecord,
    TruncatedBundle,
    UnknownCodec,
    UnknownTensor,
    UnknownVersion,
    bundle_size,
    encode_bundle,
    iter_chunks,
    read_bundle_verified,
    read_manifest,
    sub_bundle,
    write_bundle,
)

ROOT = Path(__file__).resolve().parents[2]
CODEC_NAMES = ("fp16", "ternary", "prune50+int8")


def make_records(seed: int, n: int = 4, max_len: int = 3000) -> list[TensorRecord]:
    """Records with random (incompressible) payloads, named like expert matrices."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rows, cols = rng.randint(1, 40), rng.randint(1, 40)
        length = rng.randint(1, max_len)
        out.append(TensorRecord(name=f"blocks.{i // 2}.moe.experts.{i}.fc{1 + i % 2}.weight",
                                codec=rng.choice(CODEC_NAMES), shape=(rows, cols), payload=rng.randbytes(length),
                                meta={"group_rows": rows} if i % 2 else {}))
    return out


def same(a: TensorRecord, b: TensorRecord) -> bool:
    return (a.name, a.codec, tuple(a.shape), bytes(a.payload), a.meta) == (b.name, b.codec, tuple(b.shape),
                                                                           bytes(b.payload), b.meta)


def shapes_of(records) -> dict[str, tuple[int, ...]]:
    return {r.name: r.shape for r in records}


def payload_range(data: bytes, name: str) -> tuple[int, int]:
    m = read_manifest(data)
    e = next(e for e in m.entries if e.name == name)
    return m.payload_start + e.offset, m.payload_start + e.offset + e.length


# ----------------------------------------------------------------------------- round trips

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(0, 6), chunk=st.integers(1, 5000))
def test_round_trip_through_chunks_of_any_size(seed, n, chunk):
    records = make_records(seed, n)
    meta = {"preset": "tiny", "seed": seed}
    data = encode_bundle(records, meta)
    assert len(data) == bundle_size(records, meta)
    bundle = read_bundle_verified(iter_chunks(data, chunk), allowed_codecs=CODEC_NAMES,
                                  expected_shapes=shapes_of(records), max_chunk_size=chunk)
    assert bundle.meta == meta and len(bundle) == n
    assert all(same(a, b) for a, b in zip(records, bundle))


def test_layout_matches_the_documented_header():
    records = make_records(1, 2)
    data = encode_bundle(records, {"k": 1})
    magic, version, flags, mlen, plen, crc = struct.unpack_from("<8sHHIQI", data)
    assert magic == b"\x89FFB\r\n\x1a\n" == MAGIC and version == 2 and flags == 0
    assert crc == zlib.crc32(data[:24])
    manifest = data[HEADER_SIZE:HEADER_SIZE + mlen]
    assert data[28:60] == hashlib.sha256(manifest).digest()
    doc = json.loads(manifest)
    assert doc["meta"] == {"k": 1} and plen == sum(len(r.payload) for r in records)
    assert len(data) == 60 + mlen + plen
    for r, t in zip(records, doc["tensors"]):
        start = 60 + mlen + t["offset"]
        assert data[start:start + t["length"]] == r.payload
        assert t["blake3"] == blake3.blake3(r.payload).hexdigest() and t["shape"] == list(r.shape)
        assert "sha256" not in t


def test_version_1_bundles_are_written_on_request_and_still_read():
    records = make_records(5, 3)
    old = encode_bundle(records, {"k": 1}, version=1)
    new = encode_bundle(records, {"k": 1})
    assert len(old) == len(new)  # same framing: only the digests and the version differ
    assert struct.unpack_from("<H", old, 8)[0] == 1
    mlen = struct.unpack_from("<I", old, 12)[0]
    doc = json.loads(old[HEADER_SIZE:HEADER_SIZE + mlen])
    assert [t["sha256"] for t in doc["tensors"]] == [hashlib.sha256(r.payload).hexdigest() for r in records]
    for data in (old, new):
        got = read_bundle_verified(iter_chunks(data, 333))
        assert all(same(a, b) for a, b in zip(records, got))
    assert read_manifest(old).digest_name == "sha256" and read_manifest(new).digest_name == "blake3"
    # a version-1 tensor whose bytes changed fails its SHA-256, named as such
    bad = bytearray(old)
    bad[-1] ^= 0x01
    with pytest.raises(ChecksumMismatch, match="sha256 mismatch"):
        read_bundle_verified([bytes(bad)])
    with pytest.raises(UnknownVersion):
        encode_bundle(records, version=3)


def test_a_manifest_must_carry_the_digest_its_version_names():
    records = make_records(6, 2)
    data = encode_bundle(records, {}, version=1)
    # the same bytes but labelled version 2: its entries carry "sha256", not "blake3"
    fixed = struct.pack("<8sHHIQ", MAGIC, 2, 0, *struct.unpack_from("<IQ", data, 12))
    relabelled = fixed + struct.pack("<I", zlib.crc32(fixed)) + data[28:]
    with pytest.raises(CorruptManifest, match="lacks 'blake3'"):
        read_bundle_verified([relabelled])


def test_bundles_are_deterministic_and_accept_codec_records():
    records = make_records(2, 3)
    assert encode_bundle(records, {"a": 1, "b": 2}) == encode_bundle(records, {"b": 2, "a": 1})

    class Encoded:  # duck-typed like model.codecs.EncodedTensor: no dtype attribute
        def __init__(self, r):
            self.name, self.codec, self.shape, self.payload, self.meta = r.name, r.codec, r.shape, r.payload, r.meta
    again = read_bundle_verified([encode_bundle([Encoded(r) for r in records])])
    assert all(same(a, b) for a, b in zip(records, again)) and {r.dtype for r in again} == {"float32"}


def test_empty_bundle_and_empty_tensors():
    assert len(read_bundle_verified([encode_bundle([])])) == 0
    records = [TensorRecord("a", "fp16", (0, 3), b""), TensorRecord("b", "fp16", (2,), b"xy"),
               TensorRecord("c", "fp16", (0,), b"")]
    got = read_bundle_verified(iter_chunks(encode_bundle(records), 7))
    assert [r.name for r in got] == ["a", "b", "c"] and got.by_name()["b"].payload == b"xy"


# ----------------------------------------------------------------------------- streaming and resumption

def test_records_stream_out_as_soon_as_their_bytes_are_verified():
    records = make_records(3, 4)
    data = encode_bundle(records)
    ends = [payload_range(data, r.name)[1] for r in records]
    reader = BundleReader()
    seen: list[str] = []
    for chunk in iter_chunks(data, 97):
        seen += [r.name for r in reader.feed(chunk)]
        done = [r.name for r, end in zip(records, ends) if end <= reader.offset]
        assert seen == done  # every completed tensor is out; nothing incomplete is
    assert [r.name for r in reader.finish()] == [r.name for r in records]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), cut=st.floats(0, 1), first=st.integers(1, 4000), second=st.integers(1, 4000))
def test_a_cut_transfer_resumes_from_the_reader_offset(seed, cut, first, second):
    data = encode_bundle(make_records(seed, 5))
    reader = BundleReader(max_chunk_size=max(first, second))
    got = []
    for chunk in iter_chunks(data, first):
        if chunk.offset >= cut * len(data):
            break  # the connection drops
        got += reader.feed(chunk)
    for chunk in iter_chunks(data, second, start=reader.offset):
        got += reader.feed(chunk)
    bundle = reader.finish()
    assert [r.name for r in got] == [r.name for r in bundle] and len(bundle) == 5


def test_iter_chunks_offsets_and_crcs():
    data = bytes(range(256)) * 5
    chunks = list(iter_chunks(data, 300, start=100))
    assert [c.offset for c in chunks] == [100, 400, 700, 1000]
    assert b"".join(c.data for c in chunks) == data[100:]
    assert all(c.crc32 == zlib.crc32(c.data) for c in chunks)
    with pytest.raises(BundleError):
        list(iter_chunks(data, 0))
    with pytest.raises(BundleError):
        list(iter_chunks(data, 10, start=len(data) + 1))


# ----------------------------------------------------------------------------- sub-bundles and writing

def test_one_expert_of_one_block_ships_alone(tmp_path):
    records = make_records(4, 6)
    full = read_bundle_verified([encode_bundle(records, {"preset": "tiny"})])
    expert = [r.name for r in records if ".experts.2." in r.name or ".experts.3." in r.name][:1]
    data = sub_bundle(full, expert)
    one = read_bundle_verified(iter_chunks(data, 64), expected_shapes=shapes_of(records))
    assert [r.name for r in one] == expert and one.meta == {"preset": "tiny"}
    assert len(data) < len(encode_bundle(records))
    by_pred = read_bundle_verified([sub_bundle(full, lambda n: n.startswith("blocks.1."), meta={"x": 1})])
    assert [r.name for r in by_pred] == [r.name for r in records if r.name.startswith("blocks.1.")]
    with pytest.raises(MissingTensor, match="nope"):
        sub_bundle(full, ["nope"])


def test_write_bundle_is_atomic_and_accepts_files(tmp_path):
    records = make_records(5, 3)
    path = tmp_path / "m.ffb"
    n = write_bundle(path, records, {"a": 1})
    assert path.read_bytes() == encode_bundle(records, {"a": 1}) and n == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["m.ffb"], "no temporary file left behind"
    with pytest.raises(InvalidRecord):
        write_bundle(path, [*records, records[0]])  # duplicate name
    assert path.read_bytes() == encode_bundle(records, {"a": 1}), "a failed write leaves the old file"
    with open(tmp_path / "f.ffb", "wb") as f:
        assert write_bundle(f, records) == len(encode_bundle(records))


@pytest.mark.parametrize("bad", [
    TensorRecord("", "fp16", (1,), b"x"),
    TensorRecord("a", "", (1,), b"x"),
    TensorRecord("a", "fp16", (-1,), b"x"),
    TensorRecord("a", "fp16", (1,), "text"),
    TensorRecord("a", "fp16", (1,), b"x", meta={"s": float("nan")}),
    TensorRecord("a", "fp16", (1,), b"x", meta={"o": object()}),
])
def test_invalid_records_are_refused(bad):
    with pytest.raises(InvalidRecord):
        encode_bundle([bad])


# ----------------------------------------------------------------------------- faults: named, and atomic

def expect_fault(error: type[BundleError], chunks, **kw) -> BundleError:
    installed = {}
    with pytest.raises(error) as info:
        installed.update({r.name: r for r in read_bundle_verified(chunks, **kw)})
    assert installed == {}
    assert "\n" not in str(info.value) and str(info.value)
    return info.value


def expected_error_for_flip(data: bytes, pos: int) -> type[BundleError]:
    if pos < 8:
        return NotABundle
    if pos < 10:
        return UnknownVersion
    if pos < 28:
        return CorruptHeader
    if pos < HEADER_SIZE + read_manifest(data).manifest_length:
        return CorruptManifest
    return ChecksumMismatch


FAULTS = ["flip_stored", "flip_in_transit", "truncate", "reorder", "duplicate", "oversize", "past_end",
          "wrong_checksum", "unknown_codec", "unknown_version", "shape_mismatch", "unknown_tensor"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), fault=st.sampled_from(FAULTS), chunk=st.integers(16, 2000), data_=st.data())
def test_every_corruption_is_a_named_error_and_nothing_is_installed(seed, fault, chunk, data_):
    records = make_records(seed, 4)
    data = encode_bundle(records, {"seed": seed})
    kw = {"allowed_codecs": CODEC_NAMES, "expected_shapes": shapes_of(records), "max_chunk_size": chunk}
    chunks = list(iter_chunks(data, chunk))
    if fault == "flip_stored":  # on disk, before the chunk crcs were computed
        pos = data_.draw(st.integers(0, len(data) - 1))
        bad = bytearray(data)
        bad[pos] ^= data_.draw(st.integers(1, 255))
        err = expect_fault(expected_error_for_flip(data, pos), iter_chunks(bytes(bad), chunk), **kw)
        if isinstance(err, ChecksumMismatch):
            start, end = payload_range(data, err.tensor)
            assert start <= pos < end and err.tensor in str(err)
    elif fault == "flip_in_transit":  # after: the chunk's crc32 catches it
        i = data_.draw(st.integers(0, len(chunks) - 1))
        c = chunks[i]
        j = data_.draw(st.integers(0, len(c.data) - 1))
        chunks[i] = Chunk(c.offset, c.data[:j] + bytes([c.data[j] ^ 0x40]) + c.data[j + 1:], c.crc32)
        expect_fault(CorruptChunk, chunks, **kw)
    elif fault == "truncate":
        cut = data_.draw(st.integers(0, len(data) - 1))
        expect_fault(TruncatedBundle, iter_chunks(data[:cut], chunk), **kw)
    elif fault == "reorder":
        if len(chunks) < 2:
            return
        i = data_.draw(st.integers(0, len(chunks) - 2))
        chunks[i], chunks[i + 1] = chunks[i + 1], chunks[i]
        expect_fault(OutOfOrderChunk, chunks, **kw)
    elif fault == "duplicate":
        i = data_.draw(st.integers(0, len(chunks) - 1))
        chunks.insert(i + 1, chunks[i])
        expect_fault(DuplicateChunk, chunks, **kw)
    elif fault == "oversize":
        big = list(iter_chunks(data, chunk + data_.draw(st.integers(1, 500))))
        if len(big[0].data) <= chunk:
            return  # the whole bundle fits in one chunk of the limit
        expect_fault(OversizedChunk, big, **kw)
    elif fault == "past_end":
        last = chunks[-1]
        extra = last.data + b"\0" * data_.draw(st.integers(1, 8))
        chunks[-1] = Chunk(last.offset, extra, zlib.crc32(extra))
        expect_fault(OversizedChunk, chunks, **{**kw, "max_chunk_size": None})
    elif fault == "wrong_checksum":  # a writer recorded the wrong digest (manifest itself consistent)
        victim = data_.draw(st.integers(0, 3))
        forged = encode_bundle(records[:victim] + [TensorRecord(records[victim].name, records[victim].codec,
                                                                records[victim].shape,
                                                                records[victim].payload + b"!",
                                                                records[victim].meta)] + records[victim + 1:])
        m = read_manifest(forged)
        bad = bytearray(forged)
        e = m.entries[victim]
        start = m.payload_start + e.offset
        bad[start + e.length - 1] ^= 1  # payload bytes differ from what the manifest's digest says
        err = expect_fault(ChecksumMismatch, iter_chunks(bytes(bad), chunk), **{**kw, "expected_shapes": None})
        assert err.tensor == records[victim].name
    elif fault == "unknown_codec":
        victim = records[data_.draw(st.integers(0, 3))]
        allowed = set(CODEC_NAMES) - {victim.codec}
        err = expect_fault(UnknownCodec, chunks, **{**kw, "allowed_codecs": allowed})
        assert victim.codec in str(err)
    elif fault == "unknown_version":
        version = data_.draw(st.integers(0, 65535).filter(lambda v: v not in SUPPORTED_VERSIONS))
        bad = bytearray(data)
        struct.pack_into("<H", bad, 8, version)
        err = expect_fault(UnknownVersion, iter_chunks(bytes(bad), chunk), **kw)
        assert f"unknown version {version}" in str(err)
    elif fault == "shape_mismatch":
        victim = records[data_.draw(st.integers(0, 3))]
        shapes = {**shapes_of(records), victim.name: (victim.shape[0] + 1, *victim.shape[1:])}
        err = expect_fault(ShapeMismatch, chunks, **{**kw, "expected_shapes": shapes})
        assert victim.name in str(err) and not isinstance(err, UnknownTensor)
    elif fault == "unknown_tensor":
        shapes = shapes_of(records[1:])
        expect_fault(UnknownTensor, chunks, **{**kw, "expected_shapes": shapes})


def test_a_failed_reader_stays_failed():
    data = encode_bundle(make_records(6, 2))
    chunks = list(iter_chunks(data, 50))
    reader = BundleReader()
    reader.feed(chunks[0])
    with pytest.raises(DuplicateChunk):
        reader.feed(chunks[0])
    with pytest.raises(DuplicateChunk):
        reader.feed(chunks[1])  # the right chunk, too late: the bundle is already rejected
    with pytest.raises(DuplicateChunk):
        reader.finish()


def test_a_manifest_that_lies_about_offsets_is_corrupt():
    data = bytearray(encode_bundle(make_records(7, 2)))
    mlen = struct.unpack_from("<I", data, 12)[0]
    doc = json.loads(data[HEADER_SIZE:HEADER_SIZE + mlen])
    doc["tensors"][1]["offset"] += 1
    manifest = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    fixed = struct.pack("<8sHHIQ", MAGIC, 2, 0, len(manifest), struct.unpack_from("<Q", data, 16)[0])
    forged = fixed + struct.pack("<I", zlib.crc32(fixed)) + hashlib.sha256(manifest).digest() + manifest \
        + bytes(data[HEADER_SIZE + mlen:])
    with pytest.raises(CorruptManifest, match="starts at"):
        read_bundle_verified([forged])


# ----------------------------------------------------------------------------- command line

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proto.bundle", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "model.ffb"
    records = [TensorRecord("blocks.0.moe.experts.0.fc1.weight", "ternary", (100, 50), bytes(1004)),
               TensorRecord("tok_emb.weight", "fp16", (10, 8), bytes(160))]
    write_bundle(path, records, {"preset": "tiny"})
    return path


def test_cli_inspect_shows_sizes_and_bits_per_weight(bundle_file):
    r = run_cli("inspect", str(bundle_file))
    assert r.returncode == 0, r.stderr
    assert "blocks.0.moe.experts.0.fc1.weight" in r.stdout and "100x50" in r.stdout
    assert "1.6064" in r.stdout  # 1004 bytes * 8 / 5000 weights
    assert "16.0000" in r.stdout
    j = run_cli("inspect", "--json", str(bundle_file))
    doc = json.loads(j.stdout)
    assert doc["codecs"]["ternary"]["bytes"] == 1004 and doc["total_bytes"] == bundle_file.stat().st_size


def test_cli_verify_intact_corrupted_truncated_and_unknown(bundle_file, tmp_path):
    ok = run_cli("verify", str(bundle_file))
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    data = bundle_file.read_bytes()
    cases = {
        "corrupted tensor 'blocks.0.moe.experts.0.fc1.weight'": data[:-200] + b"\x01" + data[-199:],
        "truncated": data[:-10],
        "unknown version 9": data[:8] + b"\x09\x00" + data[10:],
        "not a bundle": b"PK\x03\x04" + data[4:],
        "corrupted manifest": data[:70] + bytes([data[70] ^ 0x20]) + data[71:],
    }
    for expected, content in cases.items():
        path = tmp_path / "bad.ffb"
        path.write_bytes(content)
        r = run_cli("verify", str(path))
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], r.stderr
    r = run_cli("verify", "--codec", "fp16", str(bundle_file))
    assert r.returncode == 1 and "unknown codec 'ternary'" in r.stderr
    missing = run_cli("verify", str(tmp_path / "absent.ffb"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert run_cli("--help").returncode == 0 and "inspect" in run_cli("--help").stdout


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4),
                           max_leaves=20)
entry_like = st.fixed_dictionaries(
    {}, optional=dict.fromkeys(("name", "codec", "shape", "dtype", "meta", "offset", "length", "sha256", "blake3"),
                           json_values))
_DIGESTS = {1: ("sha256", hashlib.sha256), 2: ("blake3", blake3.blake3)}


def framed(manifest: bytes, payload: bytes, version: int = 2) -> bytes:
    """A bundle whose header and digest are right for whatever manifest it carries."""
    fixed = struct.pack("<8sHHIQ", MAGIC, version, 0, len(manifest), len(payload))
    return fixed + struct.pack("<I", zlib.crc32(fixed)) + hashlib.sha256(manifest).digest() + manifest + payload


@settings(max_examples=150, deadline=None)
@given(junk=st.binary(max_size=300))
def test_arbitrary_bytes_give_a_bundle_error_never_a_crash(junk):
    with pytest.raises(BundleError):
        read_bundle_verified([junk])
    with pytest.raises(BundleError):
        read_bundle_verified([MAGIC + junk])


@settings(max_examples=80, deadline=None)
@given(doc=st.one_of(json_values, st.fixed_dictionaries({"meta": json_values, "tensors": st.lists(entry_like,
                                                                                                  max_size=3)})),
       payload=st.binary(max_size=20), version=st.sampled_from([1, 2]))
def test_forged_manifests_with_valid_digests_are_refused_cleanly(doc, payload, version):
    data = framed(json.dumps(doc).encode(), payload, version)
    try:
        bundle = read_bundle_verified(iter_chunks(data, 7))
    except BundleError:
        return
    # accepted only if it really is consistent: every tensor's bytes hash to its digest
    assert sum(len(r.payload) for r in bundle) == len(payload)
    key, digest = _DIGESTS[version]
    assert all(digest(r.payload).hexdigest() == t[key] for r, t in zip(bundle, doc["tensors"]))


# ---- one hash per byte, no copies ------------------------------------------------------------

_BLAKE3 = blake3.blake3


class _CountingHash:
    """A BLAKE3 that counts the bytes it is given (patched into the format's tensor hash)."""

    hashed = 0

    def __init__(self) -> None:
        self._h = _BLAKE3()

    def update(self, data) -> None:
        _CountingHash.hashed += memoryview(data).nbytes
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@pytest.mark.parametrize("chunk", [1, 97, 4096, 10**6])
def test_the_reader_hashes_each_payload_byte_once(monkeypatch, chunk):
    import proto.bundle.format as format_module
    records = make_records(3, n=6)
    data = encode_bundle(records, {})
    monkeypatch.setattr(format_module, "blake3", SimpleNamespace(blake3=_CountingHash))
    _CountingHash.hashed = 0
    got = read_bundle_verified(data[i:i + chunk] for i in range(0, len(data), chunk))
    assert _CountingHash.hashed == sum(len(r.payload) for r in records)
    assert all(same(a, b) for a, b in zip(got, records))


def test_read_only_chunks_are_viewed_and_writable_ones_copied():
    records = make_records(4, n=4, max_len=500)
    data = encode_bundle(records, {})
    whole = read_bundle_verified([data])  # one read-only chunk: every payload is a view of it
    assert all(isinstance(r.payload, memoryview) and r.payload.obj is data for r in whole)
    mutable = bytearray(data)
    reader = BundleReader()
    reader.feed(mutable)
    mutable[:] = bytes(len(mutable))  # the caller reuses its buffer: the records must not change
    assert all(same(a, b) for a, b in zip(reader.finish(), records))


def test_rewind_to_a_tensor_keeps_what_came_before_and_refeeds_the_rest():
    records = make_records(5, n=5, max_len=800)
    data = encode_bundle(records, {})
    m = read_manifest(data)
    victim = m.entries[2]
    start = m.payload_start + victim.offset
    bad = bytearray(data)
    bad[start + victim.length - 1] ^= 1
    reader = BundleReader()
    with pytest.raises(ChecksumMismatch):
        for i in range(0, len(bad), 300):
            reader.feed(bytes(bad[i:i + 300]))
    with pytest.raises(ValueError, match="not the first byte of a tensor"):
        reader.rewind(start + 1)
    reader.rewind(start)
    assert reader.offset == start
    reader.feed(data[start:])
    assert all(same(a, b) for a, b in zip(reader.finish(), records))
    reader.rewind(0)
    assert reader.offset == 0 and reader.manifest is None
