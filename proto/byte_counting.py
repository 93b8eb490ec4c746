"""How the federation counts the bytes that cross between coordinator and nodes.

A message counts as its serialized protobuf size (``len(serialized) == msg.ByteSize()``), under
the :class:`ByteKind` its RPC fixes (:func:`kind_of_method`); its ``payload`` is the bulk data
inside (:func:`payload_bytes`). The coordinator, which knows why it calls, may count a
``ScoreTokens`` call as ``MIXTURE`` where a node sees ``SCORE``; every other RPC counts the same on
both sides, so node and coordinator figures can be compared kind by kind.

Dependency rule: this module imports nothing else of ours but the generated ``federation_pb2`` and
``proto.bundle_chunks`` (FetchBundle's chunks, received as views).
"""

from __future__ import annotations

from typing import Any, cast

from . import federation_pb2 as pb
from .bundle_chunks import ChunkView

_PKG = "/fractal.federation.v1."

# RPCs not listed (InstantiateSoup, and any added later) count as CONTROL.
KIND_OF_METHOD: dict[str, pb.ByteKind.ValueType] = {
    _PKG + "Node/ScoreTokens": pb.BYTE_KIND_SCORE,
    _PKG + "Node/NextTokenDistribution": pb.BYTE_KIND_GENERATE,
    _PKG + "Node/Generate": pb.BYTE_KIND_GENERATE,
    _PKG + "Node/LoadUser": pb.BYTE_KIND_ADAPTER,
    _PKG + "Node/UnloadUser": pb.BYTE_KIND_ADAPTER,
    _PKG + "Node/InstallBundles": pb.BYTE_KIND_CONTROL,
    _PKG + "Node/RunExpert": pb.BYTE_KIND_ACTIVATION,
    _PKG + "Node/Status": pb.BYTE_KIND_CONTROL,
    _PKG + "NodeControl/Register": pb.BYTE_KIND_CONTROL,
    _PKG + "NodeControl/Heartbeat": pb.BYTE_KIND_CONTROL,
    _PKG + "NodeControl/FetchBundle": pb.BYTE_KIND_BUNDLE,
    _PKG + "NodeControl/FetchAdapter": pb.BYTE_KIND_ADAPTER,
    _PKG + "NodeControl/ReportRouting": pb.BYTE_KIND_CONTROL,
}


def kind_of_method(method: str) -> pb.ByteKind.ValueType:
    """The ByteKind of the messages of ``method`` ("/fractal.federation.v1.Node/ScoreTokens")."""
    return KIND_OF_METHOD.get(method, pb.BYTE_KIND_CONTROL)


def kind_name(kind: int) -> str:
    """``BYTE_KIND_BUNDLE`` -> ``"BUNDLE"``; an unknown number as its decimal string."""
    try:
        # the stubs type enum values as a NewType of int that exists only for the type checker
        return pb.ByteKind.Name(cast("pb.ByteKind.ValueType", kind)).removeprefix("BYTE_KIND_")
    except ValueError:
        return str(kind)


def payload_bytes(msg: Any) -> int:
    """Bulk data carried by ``msg``: bundle chunk bytes, adapter blobs, hidden states and expert
    outputs (RunExpert); 0 for other messages."""
    if isinstance(msg, pb.BundleChunk | pb.Adapter | ChunkView):
        return len(msg.data)
    if isinstance(msg, pb.RunExpertRequest):
        return len(msg.hidden)
    if isinstance(msg, pb.RunExpertReply):
        return len(msg.output)
    if isinstance(msg, pb.LoadUserRequest):
        return len(msg.adapter.data)
    return 0
