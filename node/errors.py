"""The requests a node refuses: :class:`NodeError` and its kinds, each carrying the gRPC status
that ``node.server`` answers with."""

from __future__ import annotations

import grpc


class NodeError(Exception):
    """A request the node refuses; ``code`` is the gRPC status it answers with."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(NodeError):
    """Malformed input: token ids out of range, empty or over-long sequences, bad parameters."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UserNotLoaded(NodeError):
    """The request names a user whose adapter this node does not hold."""

    code = grpc.StatusCode.NOT_FOUND


class NoModel(NodeError):
    """The node has no model installed yet (or no link to the coordinator for a fetch)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unsupported(NodeError):
    """A request this node does not implement."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InstallFailed(NodeError):
    """Bundles could not be fetched, verified or assembled; the previous model is untouched."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        super().__init__(message)
        self.code = code
