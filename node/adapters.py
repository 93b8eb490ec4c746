"""The norm-only user adapters a node holds, and how a request applies one without leaking it.

An adapter arrives as a safetensors blob (``Adapter.format == "safetensors"``, what the coordinator
stores and ``LoadUser`` / ``FetchAdapter`` carry) holding some or all of the LayerNorm gains and
biases (``model.fractal_moe.is_norm_param``), in any float dtype; the node keeps float32 copies.

Isolation: a node never writes an adapter into its model. The model module keeps the base norms,
and each request passes its user's tensors to ``torch.func.functional_call``, which substitutes
them for the duration of that one forward pass only (and restores the module even on error).
Forward passes on a module are serialised by its lock (see ``node.assembly.ServedModel``), so two
users' requests can never see each other's norms, and one module serves every user and every
virtual node that shares it: per user, only the adapter's own few KB are held.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from model.adapter_blob import ADAPTER_FORMAT, AdapterError, check_adapter_blob, encode_adapter
from model.fractal_moe import is_norm_param
from proto.ids import is_valid_id

__all__ = ["ADAPTER_FORMAT", "AdapterError", "AdapterStore", "UserAdapter", "decode_adapter", "encode_adapter",
           "norm_shapes"]


@dataclass(frozen=True)
class UserAdapter:
    """One user's adapter as installed: float32 norm tensors, with the blob's size and sha256."""

    user_id: str
    tensors: dict[str, torch.Tensor]
    sha256: bytes
    nbytes: int


def decode_adapter(user_id: str, data: bytes, expected: dict[str, tuple[int, ...]], *,
                   fmt: str = ADAPTER_FORMAT, sha256: bytes = b"") -> UserAdapter:
    """Parse and check an adapter blob against the model's norm shapes ``expected`` ({name: shape}).

    Raises AdapterError on a bad user id, a sha256 that does not match, or anything
    :func:`model.adapter_blob.check_adapter_blob` refuses (the coordinator's check on upload).
    """
    if not is_valid_id(user_id):
        raise AdapterError(f"invalid user id {user_id!r}")
    digest = hashlib.sha256(data).digest()
    if data and sha256 and sha256 != digest:
        raise AdapterError(f"adapter of user {user_id!r}: sha256 does not match its data")
    tensors = check_adapter_blob(data, expected, fmt=fmt, who=f"adapter of user {user_id!r}")
    return UserAdapter(user_id=user_id, tensors=tensors, sha256=digest, nbytes=len(data))


def norm_shapes(named: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the norm (adapter) parameters among ``named`` (e.g. a model's state dict)."""
    return {k: tuple(v.shape) for k, v in named.items() if is_norm_param(k)}


class AdapterStore:
    """The adapters one node holds, by user id. Replacing one is a single dict assignment."""

    def __init__(self) -> None:
        self._by_user: dict[str, UserAdapter] = {}

    def put(self, adapter: UserAdapter) -> None:
        """Install (or replace) a user's adapter."""
        self._by_user[adapter.user_id] = adapter

    def pop(self, user_id: str) -> bool:
        """Drop a user's adapter; True when the node held it."""
        return self._by_user.pop(user_id, None) is not None

    def get(self, user_id: str) -> UserAdapter | None:
        """The user's adapter, or None."""
        return self._by_user.get(user_id)

    def user_ids(self) -> list[str]:
        """Users held, sorted."""
        return sorted(self._by_user)

    def nbytes(self) -> int:
        """Memory of the held adapters' float32 tensors."""
        return sum(t.numel() * t.element_size() for a in self._by_user.values() for t in a.tensors.values())
