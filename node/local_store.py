"""A node's bundles on its own disk: what lets a node that crashed come back without fetching again.

A bundle a node fetched and verified is written to ``ROOT/<node id>/<sha256 hex>.ffb`` (atomically:
a temporary file, then a rename; a bundle another node of the same ROOT already wrote is hard-linked,
not copied). When the node is started again with the same id and the coordinator names a bundle by
its sha256, :func:`fetch_or_load` installs it from there after checking it again exactly as a
fetched bundle is checked (the whole file's sha256, then every tensor's checksum in the manifest);
a file that fails is deleted and the bundle fetched from the coordinator. A bundle read from disk
costs no bytes on the wire (``Fetched.payload_bytes`` 0), so a node's byte counts stay exact.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle import BundleError, encode_bundle, read_bundle_verified
from proto.ids import is_valid_id

from .fetch import Fetched, FetchPolicy, fetch_bundle

log = logging.getLogger(__name__)
SUFFIX = ".ffb"


class LocalBundles:
    """Verified bundles kept on disk under ``root``, one folder per node id."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, node_id: str, sha256: bytes) -> Path:
        """Where ``node_id`` keeps the bundle of this sha256."""
        if not is_valid_id(node_id) or len(sha256) != 32:
            raise ValueError(f"no local path for node {node_id!r} and a {len(sha256)}-byte sha256")
        return self.root / node_id / f"{sha256.hex()}{SUFFIX}"

    def held(self, node_id: str) -> list[str]:
        """sha256 hex of every bundle ``node_id`` keeps (not checked)."""
        folder = self.root / node_id
        return sorted(p.stem for p in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []

    def load(self, node_id: str, ref: pb.BundleRef, allowed_codecs=None) -> Fetched | None:
        """The bundle ``ref`` names, read from disk and verified; None when not kept (or not intact:
        then the file is deleted). A ref without a sha256 is never read from disk: nothing to check it by."""
        sha = bytes(ref.sha256)
        if len(sha) != 32:
            return None
        path = self.path(node_id, sha)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            if hashlib.sha256(data).digest() != sha:
                raise BundleError("sha256 differs from the coordinator's")
            bundle = read_bundle_verified([data], allowed_codecs=allowed_codecs)
        except BundleError as exc:
            log.warning("node %s: local copy of bundle %s is damaged (%s): fetching it again", node_id, ref.name, exc)
            path.unlink(missing_ok=True)
            return None
        return Fetched(name=ref.name, bundle=bundle, size=len(data), sha256=sha, payload_bytes=0, resumes=0,
                       refetches=0)

    def save(self, node_id: str, fetched: Fetched) -> Path | None:
        """Keep a fetched, verified bundle; None when it could not be written (the node serves anyway)."""
        path = self.path(node_id, fetched.sha256)
        if path.exists():
            return path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for other in self.root.glob(f"*/{path.name}"):  # another node of this root holds it: share the file
                try:
                    os.link(other, path)
                    return path
                except OSError:
                    continue
            data = encode_bundle(fetched.bundle.records, fetched.bundle.meta, version=fetched.bundle.version)
            if hashlib.sha256(data).digest() != fetched.sha256:  # re-encoding must give back the verified bytes
                log.warning("node %s: bundle %s does not re-encode to its sha256; not kept", node_id, fetched.name)
                return None
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return path
        except OSError as exc:
            log.warning("node %s: could not keep bundle %s on disk: %s", node_id, fetched.name, exc)
            return None


async def fetch_or_load(stub: rpc.NodeControlStub, ref: pb.BundleRef, *, node_id: str,
                        metadata: tuple[tuple[str, str], ...], policy: FetchPolicy,
                        local: LocalBundles | None) -> tuple[Fetched, bool]:
    """The bundle ``ref``: from the node's ``local`` store when it holds it intact, else fetched from
    the coordinator (:func:`node.fetch.fetch_bundle`, then kept in ``local``). Returns it and whether it
    came from disk. Disk work runs off the event loop."""
    loop = asyncio.get_running_loop()
    if local is not None:
        got = await loop.run_in_executor(None, local.load, node_id, ref, policy.allowed_codecs)
        if got is not None:
            return got, True
    fetched = await fetch_bundle(stub, ref, node_id=node_id, metadata=metadata, policy=policy)
    if local is not None:
        await loop.run_in_executor(None, local.save, node_id, fetched)
    return fetched, False
