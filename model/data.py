"""Token streams and seeded batch sampling."""

from __future__ import annotations

from collections.abc import Sequence

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
    """Non-overlapping windows covering every token of ``ids`` (n,) for evaluation.

    Returns x, y of shape (W, context), W = ceil(n / context): x holds the tokens in order (0 past
    the end), y the token after each (-100, ignored, at the last token and past the end). Every
    token but the first is predicted exactly once, and every token, the last included, passes
    through the model (a node reports the route of each).
    """
    n = ids.numel()
    w = max(1, -(-n // context))
    x = torch.zeros(w * context, dtype=torch.long)
    x[:n] = ids
    y = torch.full((w * context,), -100, dtype=torch.long)
    y[:n - 1] = ids[1:]
    return x.view(w, context), y.view(w, context)  # (W, T), (W, T)
