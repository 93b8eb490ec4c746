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
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model.fractal_moe import is_norm_param
from proto.ids import is_valid_id

ADAPTER_FORMAT = "safetensors"


class AdapterError(ValueError):
    """An adapter blob is malformed or does not fit the node's model."""


@dataclass(frozen=True)
class UserAdapter:
    """One user's adapter as installed: float32 norm tensors, with the blob's size and sha256."""

    user_id: str
    tensors: dict[str, torch.Tensor]
    sha256: bytes
    nbytes: int


def encode_adapter(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> bytes:
    """A norm-only adapter (e.g. ``model.train.adapter_state``) as the safetensors blob nodes accept."""
    bad = [k for k in state if not is_norm_param(k)]
    if bad:
        raise AdapterError(f"not an adapter parameter: {bad[0]}")
    return st_save({k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()})


def decode_adapter(user_id: str, data: bytes, expected: dict[str, tuple[int, ...]], *,
                   fmt: str = ADAPTER_FORMAT, sha256: bytes = b"") -> UserAdapter:
    """Parse and check an adapter blob against the model's norm shapes ``expected`` ({name: shape}).

    Raises AdapterError on a bad user id, an unknown format, a sha256 that does not match, an
    unreadable blob, a tensor that is not a norm parameter of this model, a wrong shape or dtype,
    or a non-finite value.
    """
    if not is_valid_id(user_id):
        raise AdapterError(f"invalid user id {user_id!r}")
    if fmt not in ("", ADAPTER_FORMAT):
        raise AdapterError(f"adapter format {fmt!r} is not supported (only {ADAPTER_FORMAT!r})")
    if not data:
        raise AdapterError(f"adapter of user {user_id!r} is empty")
    digest = hashlib.sha256(data).digest()
    if sha256 and sha256 != digest:
        raise AdapterError(f"adapter of user {user_id!r}: sha256 does not match its data")
    try:
        raw = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise AdapterError(f"adapter of user {user_id!r} is not a readable safetensors blob: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not raw:
        raise AdapterError(f"adapter of user {user_id!r} holds no tensor")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name not in expected:
            raise AdapterError(f"adapter of user {user_id!r}: {name!r} is not a norm parameter of the model")
        if tuple(t.shape) != tuple(expected[name]):
            raise AdapterError(f"adapter of user {user_id!r}: {name} has shape {list(t.shape)}, "
                               f"the model's is {list(expected[name])}")
        if not t.is_floating_point():
            raise AdapterError(f"adapter of user {user_id!r}: {name} has dtype {t.dtype}, not a float")
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"adapter of user {user_id!r}: {name} holds NaN or infinite values")
        tensors[name] = t
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
