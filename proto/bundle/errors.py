"""Everything that can be wrong with a bundle, as named exceptions with one-line messages.

Each message starts with what is wrong ("truncated", "corrupted tensor ...", "unknown version ...")
so that `python -m proto.bundle verify` can print it as its one line.
"""

from __future__ import annotations


class BundleError(ValueError):
    """A bundle, a chunk of one, or a record to write is not acceptable."""


class NotABundle(BundleError):
    """The bytes do not start with the bundle magic."""


class UnknownVersion(BundleError):
    """The header names a format version this reader does not know."""


class TruncatedBundle(BundleError):
    """The bytes ended before the bundle did."""


class CorruptBundle(BundleError):
    """Bytes changed somewhere between writer and reader."""


class CorruptHeader(CorruptBundle):
    """The fixed header fails its crc32 or holds impossible values."""


class CorruptManifest(CorruptBundle):
    """The manifest fails its sha256 or is not a well-formed manifest."""


class CorruptChunk(CorruptBundle):
    """A chunk's bytes do not match the crc32 it travelled with."""


class ChecksumMismatch(CorruptBundle):
    """A tensor's bytes do not match the sha256 the manifest records for it."""

    def __init__(self, message: str, tensor: str) -> None:
        super().__init__(message)
        self.tensor = tensor


class ChunkError(BundleError):
    """A chunk arrived where it cannot go."""


class DuplicateChunk(ChunkError):
    """A chunk repeats bytes the reader already has."""


class OutOfOrderChunk(ChunkError):
    """A chunk starts past the next byte the reader expects (a gap, or a reordering)."""


class OversizedChunk(ChunkError):
    """A chunk exceeds the size limit, or runs past the end of the bundle."""


class UnknownCodec(BundleError):
    """A tensor is encoded with a codec the caller does not accept."""


class ShapeMismatch(BundleError):
    """A tensor's shape differs from the shape the caller's model expects."""


class UnknownTensor(ShapeMismatch):
    """A tensor the caller's model does not have at all."""


class MissingTensor(BundleError):
    """A tensor asked for is not in the bundle."""


class InvalidRecord(BundleError):
    """A record handed to the writer cannot be written (bad name, shape, meta...)."""
