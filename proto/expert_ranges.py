"""Expert-level byte ranges of a bundle: the wire rule of live prefetching (InstallBundlesRequest.ranges).

A bundle's manifest gives each tensor's byte range (``payload_start + entry.offset``, ``entry.length``).
A prefetch range is a :class:`ByteRange` that covers whole tensors, contiguous in the bundle: one expert
(its fc1 and fc2, written next to each other), or the run of non-expert tensors between two experts.
Both sides compute ranges with the same rule (:func:`tensor_groups`), so the coordinator can name an
expert by its bytes and a node can check that a range it is sent covers exactly whole tensors
(:func:`entries_in`), each verified against the manifest's tensor digest when its bytes arrive.

A node first fetches the bundle's head (header and manifest: ``head_range``), whose own checksums
(header crc32, manifest sha256) it verifies; the manifest's per-tensor digests then vouch for every
range. The bundle's whole-file sha256 cannot be checked on a part of it; the manifest stands in for it.

Which tensor belongs to which expert is the model's naming rule; this module takes it as a ``key``
callable (e.g. ``model.fractal_moe.expert_of``), so proto imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .bundle import HEADER_SIZE, Manifest, ManifestEntry

K = TypeVar("K", bound=Hashable)


class RangeError(ValueError):
    """A byte range that does not cover whole tensors of the bundle, or lies outside it."""


@dataclass(frozen=True)
class Span:
    """A contiguous byte range of a bundle (absolute offsets) and the manifest entries it covers."""

    offset: int
    length: int
    entries: tuple[ManifestEntry, ...]


def head_range(manifest_length: int) -> tuple[int, int]:
    """(offset, length) of a bundle's header and manifest."""
    return 0, HEADER_SIZE + manifest_length


def tensor_groups(manifest: Manifest, key: Callable[[str], K | None]) -> dict[K | None, list[Span]]:
    """The bundle's tensors grouped by ``key(name)`` (None: tensors of no group), each group as the
    fewest contiguous spans: consecutive manifest entries of one group merge into one span."""
    groups: dict[K | None, list[Span]] = {}
    start = manifest.payload_start
    for e in manifest.entries:
        k = key(e.name)
        spans = groups.setdefault(k, [])
        last = spans[-1] if spans else None
        if last is not None and last.offset + last.length == start + e.offset:
            spans[-1] = Span(last.offset, last.length + e.length, last.entries + (e,))
        else:
            spans.append(Span(start + e.offset, e.length, (e,)))
    return groups


def span_bytes(spans: Sequence[Span]) -> int:
    """Bytes of the spans together."""
    return sum(s.length for s in spans)


def entries_in(manifest: Manifest, offset: int, length: int) -> tuple[ManifestEntry, ...]:
    """The manifest entries that the range [offset, offset + length) covers exactly; RangeError when
    it starts or ends inside a tensor, lies outside the payload, or is empty."""
    start = manifest.payload_start
    end = offset + length
    if length <= 0 or offset < start or end > manifest.total_size:
        raise RangeError(f"range {offset}+{length} is not inside the payload [{start}, {manifest.total_size})")
    covered = [e for e in manifest.entries if start + e.offset >= offset and start + e.offset + e.length <= end]
    if not covered or start + covered[0].offset != offset or start + covered[-1].offset + covered[-1].length != end:
        raise RangeError(f"range {offset}+{length} does not cover whole tensors")
    return tuple(covered)
