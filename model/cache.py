"""On-disk cache of trained weights: safetensors files under a key of config, corpus and seed.

The cache root is ``$FRACTAL_CACHE`` if set, else ``.cache/fractal`` under the working directory.
Writes are atomic (temporary file, then rename), so an interrupted run never leaves a half file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cache_root() -> Path:
    """The cache's root folder (created on demand)."""
    root = Path(os.environ.get("FRACTAL_CACHE", Path.cwd() / ".cache" / "fractal"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def entry_path(kind: str, key: str, suffix: str = ".safetensors") -> Path:
    """Where the cache keeps ``kind`` (e.g. "base", "specialist-programmer") under ``key``."""
    d = cache_root() / kind
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{key}{suffix}"


def save_weights(path: Path, state: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write a state dict as safetensors with JSON metadata, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta or {}, sort_keys=True)})
    tmp.replace(path)


def save_json(path: Path, value: object) -> None:
    """Write ``value`` as JSON, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict written by :func:`save_weights`."""
    return load_file(str(path))


def load_meta(path: Path) -> dict:
    """The JSON metadata stored beside the tensors of ``path``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))
