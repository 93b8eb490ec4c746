"""A user adapter on the wire: a safetensors blob of norm-only parameters, and its one check.

The coordinator checks a blob when it is uploaded (``PutUser``) and a node checks it again before
installing it (``LoadUser``); both call :func:`check_adapter_blob`, so the coordinator accepts no
adapter that a node would refuse. Imports nothing of ours but the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .fractal_moe import is_norm_param

ADAPTER_FORMAT = "safetensors"


class AdapterError(ValueError):
    """An adapter blob is malformed or does not fit the model."""


def encode_adapter(state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> bytes:
    """A norm-only adapter (e.g. ``model.train.adapter_state``) as a safetensors blob."""
    bad = [k for k in state if not is_norm_param(k)]
    if bad:
        raise AdapterError(f"not an adapter parameter: {bad[0]}")
    return st_save({k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()})


def check_adapter_blob(data: bytes, expected: Mapping[str, Sequence[int]] | None, *,
                       fmt: str = ADAPTER_FORMAT, who: str = "adapter") -> dict[str, torch.Tensor]:
    """The blob's tensors as float32, after checking every one of them.

    ``expected`` is the model's norm parameters ({name: shape}); None when the model is not known
    yet, and then any norm parameter name of FractalMoE passes. Raises AdapterError (its message
    starts with ``who``) on an unknown format, an empty or unreadable blob, a blob holding no
    tensor, a name that is not a norm parameter of the model, a wrong shape, a non-float dtype, or
    a NaN or infinite value.
    """
    if fmt not in ("", ADAPTER_FORMAT):
        raise AdapterError(f"{who}: format {fmt!r} is not supported (only {ADAPTER_FORMAT!r})")
    if not data:
        raise AdapterError(f"{who} is empty")
    try:
        raw = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AdapterError(f"{who} is not a readable safetensors blob: {first}") from None
    if not raw:
        raise AdapterError(f"{who} holds no tensor")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        known = is_norm_param(name) if expected is None else name in expected
        if not known:
            raise AdapterError(f"{who}: {name!r} is not a norm parameter of the model")
        if expected is not None and tuple(t.shape) != tuple(expected[name]):
            raise AdapterError(f"{who}: {name} has shape {list(t.shape)}, the model's is {list(expected[name])}")
        if not t.is_floating_point():
            raise AdapterError(f"{who}: {name} has dtype {t.dtype}, not a float")
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{who}: {name} holds NaN or infinite values")
        tensors[name] = t
    return tensors
