"""The bundle format: how compressed tensors travel (docs/bundle-format.md).

A bundle is a versioned header, a JSON manifest (tensor name, codec, shape, meta, byte range,
digest) and the tensors' payloads. Payloads are opaque bytes here: this package imports nothing
else of ours and knows codecs only as names the caller accepts. Any subset of a model's tensors
makes a bundle, down to the two matrices of one expert of one block.

    write_bundle(path, records, meta)                 atomic write; records need name/codec/shape/payload[/meta]
    iter_chunks(data, chunk_size, start)              Chunk(offset, data, crc32) pieces, resumable from start
    BundleReader(...).feed(chunk) / .finish()         streaming, verified record by record
    read_bundle_verified(chunks, ...)                 all or nothing: a Bundle, or a BundleError
    python -m proto.bundle inspect|verify FILE        the command line
"""

from .errors import (
                     BundleError,
                     ChecksumMismatch,
                     ChunkError,
                     CorruptBundle,
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
                     TruncatedBundle,
                     UnknownCodec,
                     UnknownTensor,
                     UnknownVersion,
)
from .format import (
                     DEFAULT_CHUNK_SIZE,
                     DEFAULT_MAX_CHUNK_SIZE,
                     HEADER_SIZE,
                     MAGIC,
                     SUPPORTED_VERSIONS,
                     TENSOR_DIGESTS,
                     VERSION,
                     Bundle,
                     Chunk,
                     Manifest,
                     ManifestEntry,
                     TensorHash,
                     TensorRecord,
                     tensor_digest,
                     tensor_hash,
)
from .reader import BundleReader, read_bundle_verified, read_manifest
from .writer import bundle_size, encode_bundle, iter_chunks, sub_bundle, write_bundle

__all__ = [
    "BundleError", "ChecksumMismatch", "ChunkError", "CorruptBundle", "CorruptChunk", "CorruptHeader",
    "CorruptManifest", "DuplicateChunk", "InvalidRecord", "MissingTensor", "NotABundle", "OutOfOrderChunk",
    "OversizedChunk", "ShapeMismatch", "TruncatedBundle", "UnknownCodec", "UnknownTensor", "UnknownVersion",
    "DEFAULT_CHUNK_SIZE", "DEFAULT_MAX_CHUNK_SIZE", "HEADER_SIZE", "MAGIC", "SUPPORTED_VERSIONS", "VERSION",
    "TENSOR_DIGESTS", "Bundle", "Chunk", "Manifest", "ManifestEntry", "TensorHash", "TensorRecord",
    "tensor_digest", "tensor_hash",
    "BundleReader", "read_bundle_verified", "read_manifest",
    "bundle_size", "encode_bundle", "iter_chunks", "sub_bundle", "write_bundle",
]
