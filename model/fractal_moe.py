"""FractalMoE: a decoder-only transformer whose feed-forward layer is 16 experts behind a top-1 router.

Parameter names are part of the federation's contract (bundles, adapters, merges use them):

    tok_emb.weight                          (V, C)
    pos_emb.weight                          (T, C)
    blocks.{b}.ln1.weight / .bias           (C,)      norm-only user adapter
    blocks.{b}.attn.qkv.weight              (3C, C)
    blocks.{b}.attn.proj.weight             (C, C)
    blocks.{b}.ln2.weight / .bias           (C,)      norm-only user adapter
    blocks.{b}.moe.router.weight            (E, C)
    blocks.{b}.moe.experts.{e}.fc1.weight   (F, C)    expert e of block b
    blocks.{b}.moe.experts.{e}.fc2.weight   (C, F)
    ln_f.weight / .bias                     (C,)      norm-only user adapter
    lm_head.weight                          (V, C)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

_EXPERT_RE = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.")
_NORM_RE = re.compile(r"(^|\.)(ln1|ln2|ln_f)\.(weight|bias)$")


def expert_of(name: str) -> tuple[int, int] | None:
    """(block, expert) if ``name`` is a parameter of an expert, else None."""
    m = _EXPERT_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_norm_param(name: str) -> bool:
    """True for the LayerNorm gains and biases: the parameters of a norm-only user adapter."""
    return bool(_NORM_RE.search(name))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)


class Expert(nn.Module):
    """One feed-forward expert: C -> F -> C."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # (N, C)


class MoE(nn.Module):
    """16 experts behind a top-1 linear router over the residual stream.

    Two hooks let the federation serve with part of the model:
    ``available`` (bool, (E,), or (N, E) per token) restricts the choice to installed experts, so a
    missing expert is replaced by the installed one the router scores highest; ``forced_route``
    ((N,) long) overrides the router's choice (with ``gate = "prob"`` the gate stays the router's
    probability of the forced expert). After each forward, ``last_route`` ((B, T) long) and
    ``last_logits`` ((B, T, E)) hold what the router did, detached, for routing statistics and
    prefetch predictors, and with ``record_input`` ``last_input`` ((B, T, C)) the MoE's input.
    The hooks are set only through :meth:`FractalMoE.serving`, which restores them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_experts
        self.unit_gate = cfg.gate == "unit"
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.n_experts))
        self.available: torch.Tensor | None = None
        self.forced_route: torch.Tensor | None = None
        self.last_route: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None
        self.last_input: torch.Tensor | None = None
        self.record_input = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        logits = self.router(flat)  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        if self.forced_route is not None:
            route = self.forced_route.reshape(B * T).to(x.device)  # (N,)
        else:
            choice = logits
            if self.available is not None:
                choice = logits.masked_fill(~self.available.to(x.device), float("-inf"))
            route = choice.argmax(dim=-1)  # (N,)
        gate = self.gate(probs, route)  # (N, 1)
        out = torch.zeros_like(flat)  # (N, C)
        for e in torch.unique(route).tolist():
            rows = (route == e).nonzero(as_tuple=True)[0]
            out.index_add_(0, rows, self.experts[e](flat[rows]) * gate[rows])
        # Switch-style load balancing: E * sum_e (fraction routed to e) * (mean router prob of e)
        frac = torch.bincount(route, minlength=self.n_experts).to(probs.dtype) / route.numel()  # (E,)
        aux = self.n_experts * (frac * probs.mean(dim=0)).sum()
        self.last_route = route.detach().view(B, T)
        self.last_logits = logits.detach().view(B, T, self.n_experts)
        self.last_input = flat.detach().view(B, T, C) if self.record_input else None
        return out.view(B, T, C), aux

    def gate(self, probs: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """The scale (N, 1) of each token's expert output: ``probs`` (N, E) at ``route`` (N,) long, or,
        with the unit gate, 1 in value with that probability's gradient (straight-through)."""
        gate = probs.gather(1, route[:, None])  # (N, 1)
        return gate / gate.detach() if self.unit_gate else gate

    def route(self) -> torch.Tensor:
        """The experts chosen in the last forward pass ((B, T) long); an error before the first pass."""
        if self.last_route is None:
            raise RuntimeError("no forward pass yet: the MoE has no routes to report")
        return self.last_route

    def recorded_input(self) -> torch.Tensor:
        """The input of the last forward pass ((B, T, C)); an error unless ``record_input`` was on for it."""
        if self.last_input is None:
            raise RuntimeError("no input recorded: set record_input before the forward pass")
        return self.last_input


class Block(nn.Module):
    """Pre-norm transformer block: attention, then the mixture of experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoE(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x))  # (B, T, C)
        h, aux = self.moe(self.ln2(x))
        return x + h, aux


@dataclass
class Output:
    """What a forward pass returns."""

    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # mean next-token cross-entropy (nats), without the aux loss
    aux_loss: torch.Tensor  # load-balancing loss summed over blocks


class FractalMoE(nn.Module):
    """The federation's language model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "fc2.weight")):
                # scaled residual init (GPT-2): keeps the residual stream's variance flat with depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def moes(self) -> list[MoE]:
        """The MoE layer of each block, in order."""
        # nn.ModuleList yields plain nn.Module; __init__ fills it with Blocks only
        return [cast(Block, b).moe for b in self.blocks]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Output:
        """Logits for every position; loss when ``targets`` ((B, T) long, -100 ignored) is given."""
        B, T = idx.shape
        if self.cfg.context < T:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.cfg.context}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        aux = x.new_zeros(())
        for block in self.blocks:
            x, a = block(x)
            aux = aux + a
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return Output(logits=logits, loss=loss, aux_loss=aux)

    def routes(self) -> torch.Tensor:
        """The experts chosen in the last forward pass: (L, B, T) long."""
        return torch.stack([m.route() for m in self.moes])

    @contextmanager
    def serving(self, *, available: torch.Tensor | None = None, forced_route: torch.Tensor | None = None,
                record_input: bool = False) -> Iterator[FractalMoE]:
        """Serve with part of the model inside the ``with`` block; every MoE hook and the training flag
        are restored when it ends, by an exception too.

        ``available``: the installed experts, (L, E) bool, or per token (L, N, E) for the N = B*T
        positions of the forward passes inside (one pass can then serve rows with different
        installed sets); None for all. ``forced_route`` (L, N) long: the expert each block must use
        at each position. ``record_input``: keep each MoE's input in ``last_input``. The model is in
        eval mode inside; grad mode is the caller's.
        """
        L = self.cfg.n_layers
        for name, t in (("available", available), ("forced_route", forced_route)):
            if t is not None and (t.dim() < 2 or t.size(0) != L):
                raise ValueError(f"{name} must have one row per block (L={L}), got shape {tuple(t.shape)}")
        if available is not None and available.dtype != torch.bool:
            raise ValueError(f"available must be bool, got {available.dtype}")
        saved = [(m.available, m.forced_route, m.record_input) for m in self.moes]
        was_training = self.training
        try:
            self.eval()
            for b, m in enumerate(self.moes):
                m.available = None if available is None else available[b]
                m.forced_route = None if forced_route is None else forced_route[b]
                m.record_input = record_input
            yield self
        finally:
            for m, (avail, forced, record) in zip(self.moes, saved):
                m.available, m.forced_route, m.record_input = avail, forced, record
            self.train(was_training)

    def num_params(self) -> int:
        """Total parameter count."""
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, seed: int) -> FractalMoE:
    """A freshly initialised FractalMoE; the same seed gives the same weights."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        return FractalMoE(cfg)
