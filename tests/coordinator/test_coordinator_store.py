"""The bundle store: exact bytes from any offset, atomic replacement, names that are never paths."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.store import BundleIntegrityError, BundleNameError, BundleNotFound, BundleRangeError, BundleStore


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=0, max_size=5000), chunk=st.integers(1, 700), cut=st.integers(0, 5000),
       length=st.integers(0, 6000))
def test_chunks_from_any_offset_reproduce_the_bytes(tmp_path_factory, data, chunk, cut, length):
    store = BundleStore(tmp_path_factory.mktemp("s"), chunk_size=chunk)
    meta = store.put_bytes("b", data)
    assert (meta.size, meta.sha256) == (len(data), hashlib.sha256(data).digest())
    offset = min(cut, len(data))
    _, reader = store.read_chunks("b", offset, length)
    chunks = list(reader)
    want = data[offset:] if length == 0 else data[offset:offset + length]
    assert b"".join(c for _, c in chunks) == want
    assert all(len(c) <= chunk for _, c in chunks)
    # every chunk says where it starts: a cut stream resumes from the last offset + its length
    pos = offset
    for off, c in chunks:
        assert off == pos
        pos += len(c)


def test_cut_and_resumed_fetch_is_exact(tmp_path):
    data = os.urandom(10_000)
    store = BundleStore(tmp_path, chunk_size=1024)
    store.put_bytes("b", data)
    _, reader = store.read_chunks("b")
    got = [next(reader)[1], next(reader)[1], next(reader)[1]]
    reader.close()  # the stream is cut
    _, reader = store.read_chunks("b", offset=sum(map(len, got)))
    got += [c for _, c in reader]
    assert b"".join(got) == data


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", ".hidden", "x" * 129, "a\x00b", "..", "/abs", "é",
                                  "ok\n"])
def test_names_that_are_paths_or_odd_are_refused(tmp_path, name):
    store = BundleStore(tmp_path)
    with pytest.raises(BundleNameError):
        store.put_bytes(name, b"x")
    with pytest.raises(BundleNameError):
        store.get(name)


def test_writer_verifies_size_sha_and_contiguity(tmp_path):
    store = BundleStore(tmp_path)
    data = b"abcdef"
    sha = hashlib.sha256(data).digest()
    w = store.writer("b", size=6, sha256=sha)
    with pytest.raises(BundleIntegrityError):
        w.write(3, b"def")  # not contiguous
    w.abort()
    w = store.writer("b", size=6, sha256=hashlib.sha256(b"other!").digest())
    w.write(0, data)
    with pytest.raises(BundleIntegrityError):
        w.commit()
    w = store.writer("b", size=7, sha256=sha)
    w.write(0, data)
    with pytest.raises(BundleIntegrityError):
        w.commit()  # short
    with pytest.raises(BundleNotFound):
        store.get("b")  # nothing was installed by the failed writes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_replacing_a_bundle_does_not_change_an_open_stream(tmp_path):
    store = BundleStore(tmp_path, chunk_size=4)
    store.put_bytes("b", b"old-bytes!")
    _, reader = store.read_chunks("b")
    first = next(reader)[1]
    store.put_bytes("b", b"NEW-BYTES!")
    assert first + b"".join(c for _, c in reader) == b"old-bytes!"
    assert b"".join(c for _, c in store.read_chunks("b")[1]) == b"NEW-BYTES!"


def test_files_dropped_in_by_hand_are_hashed_and_metadata_persists(tmp_path):
    (tmp_path / "hand.bundle").write_bytes(b"hello")
    store = BundleStore(tmp_path)
    store.put_bytes("made", b"xyz", model="base", codec="int8")
    metas = {m.name: m for m in store.list()}
    assert metas["hand"].sha256 == hashlib.sha256(b"hello").digest()
    again = BundleStore(tmp_path).get("made")
    assert (again.model, again.codec, again.size) == ("base", "int8", 3)


def test_offsets_outside_the_bundle(tmp_path):
    store = BundleStore(tmp_path)
    store.put_bytes("b", b"12345")
    with pytest.raises(BundleRangeError):
        store.read_chunks("b", offset=6)
    _, reader = store.read_chunks("b", offset=5)  # the end itself: nothing left, not an error
    assert list(reader) == []


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), chunk=st.integers(1, 700), cut=st.integers(0, 3000),
       length=st.integers(0, 3500), memory=st.sampled_from([0, 100, 10_000]))
def test_shipping_views_are_the_same_chunks_as_file_reads(tmp_path_factory, data, chunk, cut, length, memory):
    store = BundleStore(tmp_path_factory.mktemp("s"), chunk_size=chunk, memory_bytes=memory)
    store.put_bytes("b", data)
    offset = min(cut, len(data))
    _, files = store.read_chunks("b", offset, length)
    _, views = store.read_chunks("b", offset, length, views=True)
    read, shipped = list(files), list(views)
    assert [(o, bytes(c)) for o, c in shipped] == read
    held = len(data) <= memory
    assert all(isinstance(c, memoryview if held else bytes) for _, c in shipped)
    assert all(c.readonly for _, c in shipped if isinstance(c, memoryview))
    assert store.held_bytes == (len(data) if held else 0)


def test_held_bundles_stay_within_memory_and_follow_replacement(tmp_path):
    store = BundleStore(tmp_path, chunk_size=4, memory_bytes=25)
    for name, fill in (("a", b"a"), ("b", b"b"), ("c", b"c")):
        store.put_bytes(name, fill * 10)

    def ship(name: str) -> bytes:
        _, reader = store.read_chunks(name, views=True)
        return b"".join(bytes(c) for _, c in reader)

    assert ship("a") == b"a" * 10 and ship("b") == b"b" * 10 and store.held_bytes == 20
    assert ship("c") == b"c" * 10 and store.held_bytes == 20  # "a", least recently shipped, made room
    assert ship("b") == b"b" * 10 and ship("a") == b"a" * 10 and store.held_bytes == 20  # "c" went
    # a replaced bundle ships its new bytes; a stream opened before keeps the old ones
    _, before = store.read_chunks("a", views=True)
    first = bytes(next(before)[1])
    store.put_bytes("a", b"A" * 12)
    assert first + b"".join(bytes(c) for _, c in before) == b"a" * 10
    assert ship("a") == b"A" * 12 and store.held_bytes <= 25
    assert store.delete("a") and store.held_bytes <= 10
    with pytest.raises(ValueError, match="memory_bytes"):
        BundleStore(tmp_path / "x", memory_bytes=-1)


def test_nodes_asking_at_once_read_a_bundle_file_once(tmp_path, monkeypatch):
    """hold() runs on worker threads (the coordinator's FetchBundle): eight at once for the same
    bundle read its file once and all get it; a bundle over the budget is not read at all."""
    store = BundleStore(tmp_path, chunk_size=7, memory_bytes=5000)
    data = os.urandom(4000)
    store.put_bytes("a", data)
    store.put_bytes("big", os.urandom(6000))
    reads: list[str] = []
    real = Path.read_bytes
    first_read = threading.Event()

    def counting(self: Path) -> bytes:
        if self.suffix == ".bundle":
            reads.append(self.name)
            first_read.set()
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    with ThreadPoolExecutor(8) as pool:
        metas = list(pool.map(store.hold, ["a"] * 8 + ["big"]))
    assert reads == ["a.bundle"] and first_read.is_set()
    assert [m.name for m in metas] == ["a"] * 8 + ["big"] and store.held_bytes == len(data)
    _, chunks = store.read_chunks("a", views=True)
    assert b"".join(bytes(c) for _, c in chunks) == data and reads == ["a.bundle"]  # shipped from memory
