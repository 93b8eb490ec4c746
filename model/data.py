"""Token streams and seeded batch sampling."""

from __future__ import annotations

from typing import Sequence

import torch


class WindowSampler:
    """Random (input, target) windows from one or more token streams, seeded.

    Each stream is drawn with probability proportional to its length, so a mixture of persona
    corpora of equal size is sampled evenly.
    """

    def __init__(self, streams: Sequence[torch.Tensor], *, batch_size: int, seq_len: int, seed: int) -> None:
        self.streams = [s for s in streams if s.numel() > seq_len + 1]
        if not self.streams:
            raise ValueError(f"no token stream is longer than seq_len + 1 = {seq_len + 1}")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.gen = torch.Generator().manual_seed(seed)
        sizes = torch.tensor([s.numel() - seq_len - 1 for s in self.streams], dtype=torch.float64)
        self.weights = sizes / sizes.sum()

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: x, y both (B, T) long, y shifted by one."""
        which = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.gen)
        xs, ys = [], []
        for w in which.tolist():
            s = self.streams[w]
            start = int(torch.randint(0, s.numel() - self.seq_len - 1, (1,), generator=self.gen))
            chunk = s[start:start + self.seq_len + 1]
            xs.append(chunk[:-1])
            ys.append(chunk[1:])
        return torch.stack(xs), torch.stack(ys)  # (B, T), (B, T)


def eval_windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows covering ``ids`` for evaluation.

    Returns x, y of shape (W, context) where y is x shifted by one and padded with -100 (ignored)
    past the end; every token but the first is predicted exactly once.
    """
    n = ids.numel() - 1  # predicted positions
    w = max(1, -(-n // context))
    x = torch.zeros(w, context, dtype=torch.long)
    y = torch.full((w, context), -100, dtype=torch.long)
    for i in range(w):
        seg = ids[i * context:i * context + context + 1]
        x[i, :seg.numel() - 1] = seg[:-1]
        y[i, :seg.numel() - 1] = seg[1:]
    return x, y  # (W, T), (W, T)
