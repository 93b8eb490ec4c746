"""Resumable training: a run interrupted at a checkpoint and resumed ends with the weights of a run
that was never interrupted (tiny preset, one thread)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import get_preset
from model.data import WindowSampler
from model.fractal_moe import build_model
from model.train import resolve_device, train


def _run(tmp_path, *, stop_after=None, checkpoint=None, every=7):
    preset = get_preset("tiny")
    tc = dataclasses.replace(preset.base, steps=23, warmup=3)
    stream = torch.arange(4000) % 97 * 3 % preset.model.vocab_size  # (N,) a deterministic token stream
    model = build_model(preset.model, 0)
    sampler = WindowSampler([stream], batch_size=4, seq_len=32, seed=5)
    losses = train(model, sampler, tc, progress=False, checkpoint=checkpoint, checkpoint_every=every,
                   stop_after=stop_after)
    return model, losses


def test_resumed_training_equals_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    ckpt = tmp_path / "base.ckpt.safetensors"
    straight, straight_losses = _run(tmp_path)
    _, first = _run(tmp_path, stop_after=10, checkpoint=ckpt)  # interrupted after step 10 (not a multiple of 7)
    assert len(first) == 10 and ckpt.exists()
    resumed, losses = _run(tmp_path, checkpoint=ckpt)  # a fresh process would start exactly like this
    assert losses == straight_losses
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_resume_restores_the_losses_so_far(tmp_path):
    """The checkpoint really carries state: resuming from one taken later skips steps."""
    ckpt = tmp_path / "c.safetensors"
    _run(tmp_path, stop_after=14, checkpoint=ckpt)
    _, losses = _run(tmp_path, checkpoint=ckpt)
    assert len(losses) == 23  # 14 restored + 9 new


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
