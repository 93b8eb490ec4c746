"""Soup-of-Experts (Ablin et al. 2025, arXiv 2502.01804): a bank of parameter sets trained so that
their linear combinations are good models.

Every parameter of a FractalMoE is instantiated as

    Theta = S + sum_j alpha_j E_j,        alpha = MLP(h)

with S the shared parameters, E_1..E_n the bank and h a vector of domain weights over the training
personas (non-negative, summing to 1). Bank entries are dense (one full copy of the parameter each) or,
for 2-D matrices, low-rank: E_j = U_j V_j^T of rank r (1-D parameters stay dense). The instantiated
parameters run through an ordinary FractalMoE with ``torch.func.functional_call``, so the bank trains
end to end and a specialist for any h is just :meth:`SoupOfExperts.instantiate` (a state dict that
``FractalMoE.load_state_dict`` accepts), with no further training.

Choices the paper leaves open here (see docs/soup-of-experts.md):
- alpha is the MLP's raw output (no softmax), as the paper's formula reads; the bank starts at zero
  (U at zero for low-rank entries), so at initialisation every h instantiates S exactly.
- h for a target is estimated from a few of its tokens by maximum likelihood over the mixture of the
  personas' unigram models (:func:`estimate_domain_weights`): D x V numbers, small enough to ship with
  the bank, and needing no specialist.

This module imports nothing else of ours outside ``model``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from .codecs import codec_for, encode_state_dict, encode_tensor
from .config import ModelConfig, TrainConfig, _require
from .fractal_moe import FractalMoE, Output, build_model


class SoupError(ValueError):
    """Input to the Soup-of-Experts is malformed: bad domain weights, wrong shapes, unknown state."""


@dataclass(frozen=True, kw_only=True)
class SoupConfig:
    """One Soup-of-Experts bank and its training run.

    ``rank`` 0 means dense bank entries; r > 0 makes every 2-D parameter's entry U_j V_j^T of rank r.
    Training draws h from the meta-distribution: ``support`` personas chosen uniformly, Dirichlet
    weights of concentration ``concentration`` over them.
    """

    bank_size: int = 4
    rank: int = 0
    support: int = 2
    concentration: float = 1.0
    mlp_hidden: int = 32
    bank_lr_scale: float = 1.0  # the bank's and the MLP's learning rates, relative to S's ``lr``
    mlp_lr_scale: float = 1.0
    steps: int
    batch_size: int = 16
    seq_len: int
    lr: float
    warmup: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.bank_size >= 1, f"bank_size must be >= 1, got {self.bank_size}")
        _require(self.rank >= 0, f"rank must be >= 0 (0 = dense), got {self.rank}")
        _require(self.support >= 1, f"support must be >= 1, got {self.support}")
        _require(self.concentration > 0, f"concentration must be > 0, got {self.concentration}")
        _require(self.mlp_hidden >= 1, f"mlp_hidden must be >= 1, got {self.mlp_hidden}")
        _require(self.bank_lr_scale > 0 and self.mlp_lr_scale > 0,
                 f"bank_lr_scale and mlp_lr_scale must be > 0, got {self.bank_lr_scale}, {self.mlp_lr_scale}")
        # the remaining fields are TrainConfig's: build one so its checks apply
        self.train_config()

    def train_config(self) -> TrainConfig:
        """The optimisation part of this config as a :class:`TrainConfig` (for the lr schedule)."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                           warmup=self.warmup, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                           seed=self.seed)

    @property
    def kind(self) -> str:
        """"dense" or "rank-r"."""
        return "dense" if self.rank == 0 else f"rank-{self.rank}"


def _key(name: str) -> str:
    # nn.ParameterDict refuses "." in keys; FractalMoE names never contain "/", so this is reversible
    return name.replace(".", "/")


class SoupOfExperts(nn.Module):
    """Shared parameters S, a bank E_1..E_n over a FractalMoE's parameters, and the MLP h -> alpha.

    ``domains`` names the coordinates of h (the training personas, in order). ``shared`` initialises S
    (e.g. a trained base's state dict); without it S is a fresh FractalMoE of ``seed``.
    """

    template: FractalMoE  # set in __init__ outside the module registry, so declared here

    def __init__(self, model_cfg: ModelConfig, soup_cfg: SoupConfig, domains: Sequence[str], *,
                 shared: dict[str, torch.Tensor] | None = None, seed: int = 0) -> None:
        super().__init__()
        if len(domains) < 1 or len(set(domains)) != len(domains):
            raise SoupError(f"domains must be distinct and non-empty, got {list(domains)}")
        self.model_cfg = model_cfg
        self.cfg = soup_cfg
        self.domains = tuple(domains)
        template = build_model(model_cfg, seed)
        template.eval()
        # the template only supplies the forward pass; keeping it out of the module's registry keeps
        # its own (unused) parameters out of parameters(), state_dict() and the optimiser
        object.__setattr__(self, "template", template)
        init = template.state_dict() if shared is None else shared
        missing = set(template.state_dict()) ^ set(init)
        if missing:
            raise SoupError(f"shared state does not match the model: {sorted(missing)[:3]}")
        self.names: tuple[str, ...] = tuple(template.state_dict())
        n, r = soup_cfg.bank_size, soup_cfg.rank
        gen = torch.Generator().manual_seed(seed + 7919)
        self.shared = nn.ParameterDict()
        self.bank = nn.ParameterDict()  # dense entries: (n, *shape)
        self.bank_u = nn.ParameterDict()  # low-rank entries: (n, out, r)
        self.bank_v = nn.ParameterDict()  # low-rank entries: (n, in, r)
        for name in self.names:
            s = init[name].detach().to(torch.float32).clone()
            self.shared[_key(name)] = nn.Parameter(s)
            if r > 0 and s.dim() == 2:
                out_f, in_f = s.shape
                self.bank_u[_key(name)] = nn.Parameter(torch.zeros(n, out_f, r))
                # V random, U zero (as LoRA does): the entry starts at 0 yet U's gradient is not 0
                self.bank_v[_key(name)] = nn.Parameter(torch.randn(n, in_f, r, generator=gen) / math.sqrt(in_f))
            else:
                self.bank[_key(name)] = nn.Parameter(torch.zeros(n, *s.shape))
        with torch.random.fork_rng():  # the MLP's default init draws from the global generator
            torch.manual_seed(seed + 104729)
            self.mlp = nn.Sequential(nn.Linear(len(self.domains), soup_cfg.mlp_hidden), nn.GELU(),
                                     nn.Linear(soup_cfg.mlp_hidden, n))

    # ---- coefficients and instantiation ----------------------------------------------------------
    def check_h(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` as a float32 (D,) tensor, validated (non-negative, finite, summing to 1 within 1e-3)
        and renormalised."""
        h = torch.as_tensor(h, dtype=torch.float32)
        if h.shape != (len(self.domains),):
            raise SoupError(f"h must have shape ({len(self.domains)},) (one weight per domain), got {tuple(h.shape)}")
        if not torch.isfinite(h).all() or (h < 0).any() or abs(float(h.sum()) - 1.0) > 1e-3:
            raise SoupError(f"h must be non-negative and sum to 1, got {[round(float(v), 4) for v in h]}")
        # weights rounded for transport sum to 1 only within rounding: make the sum exact
        return h / h.sum()

    def alpha(self, h: torch.Tensor) -> torch.Tensor:
        """The bank coefficients for domain weights ``h`` (D,): (n,)."""
        return self.mlp(self.check_h(h))  # (n,)

    def instantiate_alpha(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Theta = S + sum_j alpha_j E_j for explicit coefficients ``alpha`` (n,); differentiable."""
        if alpha.shape != (self.cfg.bank_size,):
            raise SoupError(f"alpha must have shape ({self.cfg.bank_size},), got {tuple(alpha.shape)}")
        out = {}
        for name in self.names:
            k = _key(name)
            s = self.shared[k]
            if k in self.bank:
                delta = torch.tensordot(alpha, self.bank[k], dims=1)  # (*shape,)
            else:
                delta = torch.einsum("j,jor,jir->oi", alpha, self.bank_u[k], self.bank_v[k])  # (out, in)
            out[name] = s + delta
        return out

    def entry(self, j: int) -> dict[str, torch.Tensor]:
        """Bank entry E_j as a state dict of the model's shapes (U_j V_j^T for low-rank matrices)."""
        if not 0 <= j < self.cfg.bank_size:
            raise SoupError(f"bank entry {j} out of range 0..{self.cfg.bank_size - 1}")
        out = {}
        for name in self.names:
            k = _key(name)
            out[name] = (self.bank[k][j] if k in self.bank else self.bank_u[k][j] @ self.bank_v[k][j].T).detach()
        return out

    def shared_state(self) -> dict[str, torch.Tensor]:
        """S as a state dict of the model's names."""
        return {name: self.shared[_key(name)].detach() for name in self.names}

    @torch.no_grad()
    def instantiate(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """The specialist for domain weights ``h``: a state dict for ``FractalMoE.load_state_dict``."""
        return {k: v.detach().clone() for k, v in self.instantiate_alpha(self.alpha(h)).items()}

    def model_for(self, h: torch.Tensor) -> FractalMoE:
        """A fresh FractalMoE loaded with the specialist for ``h`` (eval mode)."""
        m = build_model(self.model_cfg, 0)
        m.load_state_dict(self.instantiate(h))
        m.eval()
        return m

    def forward(self, h: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Output:
        """Run the model instantiated for ``h`` on ``idx`` ((B, T) long); gradients reach S, the bank and the MLP."""
        params = self.instantiate_alpha(self.alpha(h))
        return functional_call(self.template, params, (idx, targets), strict=True)

    # ---- sizes ----------------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Number of values in S, in the bank and in the MLP."""
        bank = sum(p.numel() for d in (self.bank, self.bank_u, self.bank_v) for p in d.values())
        return {"shared": sum(p.numel() for p in self.shared.values()), "bank": bank,
                "mlp": sum(p.numel() for p in self.mlp.parameters())}


# ---- bytes: shipping the bank against shipping specialists ------------------------------------------

def state_bytes(state: dict[str, torch.Tensor], bytes_per_value: int = 2) -> int:
    """Bytes of a state dict's tensors at ``bytes_per_value`` (2 = fp16), without framing."""
    return sum(t.numel() for t in state.values()) * bytes_per_value


def bytes_comparison(soup: SoupOfExperts, ks: Sequence[int] = (1, 2, 4, 8, 16, 32), *,
                     bytes_per_value: int = 2, expert_codec: str | None = None) -> dict:
    """Bytes of shipping the whole bank (S + bank + MLP) against shipping k full specialists.

    A specialist is a full state dict of the model. With ``expert_codec`` (a codec of model.codecs),
    also the payload bytes of one specialist and of the bank encoded by ``encode_state_dict``
    (experts in the codec, everything else fp16): the bank as S plus its dense entries at their model
    shapes, plus the low-rank factors U_j, V_j and the MLP in fp16.
    ``break_even_k`` is the smallest k at which shipping k specialists costs more than the bank.
    """
    counts = soup.param_counts()
    bank_total = (counts["shared"] + counts["bank"] + counts["mlp"]) * bytes_per_value
    spec = state_bytes(soup.shared_state(), bytes_per_value)
    out = {
        "bytes_per_value": bytes_per_value,
        "bank_size": soup.cfg.bank_size,
        "bank_kind": soup.cfg.kind,
        "bank": {"shared": counts["shared"] * bytes_per_value, "entries": counts["bank"] * bytes_per_value,
                 "mlp": counts["mlp"] * bytes_per_value, "total": bank_total},
        "specialist": spec,
        "specialists": {str(k): k * spec for k in ks},
        "break_even_k": math.floor(bank_total / spec) + 1,
    }
    if expert_codec is not None:
        spec_c = sum(len(e.payload) for e in encode_state_dict(soup.shared_state(), expert_codec=expert_codec,
                                                                 other_codec="fp16"))
        # exactly what a bank bundle carries (without its unigram tables): S and the dense entries
        # at the model's shapes in the model's codecs, the low-rank factors and the MLP in fp16
        bank_c = sum(len(e.payload) for e in wire_records(soup, expert_codec=expert_codec))
        out["codec"] = {"expert_codec": expert_codec, "specialist": spec_c, "bank_total": bank_c,
                        "specialists": {str(k): k * spec_c for k in ks},
                        "break_even_k": math.floor(bank_c / spec_c) + 1}
    return out


# ---- the bank on the wire ------------------------------------------------------------------------------

SOUP_KIND = "soup-of-experts"  # meta["kind"] of a bundle that carries a bank rather than a model
UNIGRAM = "unigram"  # wire name of the (D, V) per-domain unigram log-probabilities


def wire_tensors(soup: SoupOfExperts, log_tables: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every tensor a node needs to instantiate ``soup``, flat, under wire names.

    ``shared:<param>`` (S), ``bank:<j>:<param>`` (dense entries, at the model's shapes),
    ``bank_u:<j>:<param>`` / ``bank_v:<j>:<param>`` (low-rank factors), ``mlp:<name>`` (the MLP), and
    ``unigram`` (the (D, V) tables of :func:`unigram_log_tables`, when given) so that the node can
    estimate h from a sample itself. The model parameter a name stands for is :func:`wire_param`.
    """
    out: dict[str, torch.Tensor] = {f"shared:{n}": t for n, t in soup.shared_state().items()}
    for name in soup.names:
        k = _key(name)
        for j in range(soup.cfg.bank_size):
            if k in soup.bank:
                out[f"bank:{j}:{name}"] = soup.bank[k][j].detach()
            else:
                out[f"bank_u:{j}:{name}"] = soup.bank_u[k][j].detach()  # (out, r)
                out[f"bank_v:{j}:{name}"] = soup.bank_v[k][j].detach()  # (in, r)
    out.update({f"mlp:{n}": t.detach() for n, t in soup.mlp.state_dict().items()})
    if log_tables is not None:
        if log_tables.shape[0] != len(soup.domains):
            raise SoupError(f"log_tables has {log_tables.shape[0]} rows, the bank {len(soup.domains)} domains")
        out[UNIGRAM] = log_tables.detach().to(torch.float32)  # (D, V)
    return out


def wire_records(soup: SoupOfExperts, log_tables: torch.Tensor | None = None, *, expert_codec: str,
                 other_codec: str = "fp16") -> list:
    """:func:`wire_tensors` encoded for a bundle (``model.codecs.EncodedTensor`` records): S and the
    dense entries in the codec of the parameter they stand for (experts ``expert_codec``, the rest
    ``other_codec``), the low-rank factors, the MLP and the unigram tables in ``other_codec``."""
    out = []
    for name, t in wire_tensors(soup, log_tables).items():
        param = wire_param(name)
        codec = other_codec if param is None else codec_for(param, expert_codec=expert_codec, other_codec=other_codec)
        out.append(encode_tensor(name, t, codec))
    return out


def wire_param(wire_name: str) -> str | None:
    """The model parameter a shared or dense bank tensor stands for (so that its codec is the
    parameter's: experts compressed like the model's, the rest like the model's rest); None for
    low-rank factors, the MLP and the unigram tables."""
    kind, _, rest = wire_name.partition(":")
    if kind == "shared":
        return rest
    if kind == "bank":
        return rest.partition(":")[2]
    return None


def wire_meta(soup: SoupOfExperts) -> dict:
    """The bundle metadata that lets a node rebuild ``soup`` (with the model's own ``model_config``)."""
    return {"kind": SOUP_KIND, "domains": list(soup.domains), "bank_size": soup.cfg.bank_size,
            "rank": soup.cfg.rank, "mlp_hidden": soup.cfg.mlp_hidden}


def soup_from_wire(model_cfg: ModelConfig, meta: dict, tensors: dict[str, torch.Tensor]
                   ) -> tuple[SoupOfExperts, torch.Tensor | None]:
    """Rebuild a bank from :func:`wire_meta` and decoded :func:`wire_tensors`; (soup, unigram tables or None).

    SoupError names the first thing that does not fit: a missing or unknown tensor, a wrong shape,
    non-finite values (``tensors`` is then untouched). The rebuilt bank instantiates exactly what the
    shipped tensors say. On success the bank's tensors are moved out of ``tensors`` (only the
    unigram tables stay), so that a node never holds two copies of a bank.
    """
    try:
        domains = [str(d) for d in meta["domains"]]
        n, rank, hidden = int(meta["bank_size"]), int(meta["rank"]), int(meta["mlp_hidden"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SoupError(f"soup metadata is incomplete: {exc!r}") from None
    # the training fields are not shipped; placeholders satisfy SoupConfig's checks
    cfg = SoupConfig(bank_size=n, rank=rank, mlp_hidden=hidden, support=1, steps=1,
                     seq_len=model_cfg.context, lr=1e-3, warmup=0)
    with torch.device("meta"):  # shapes only: the shipped tensors are assigned below
        soup = SoupOfExperts(model_cfg, cfg, domains)
    expected = {k: tuple(t.shape) for k, t in wire_tensors(soup).items()}
    got = {k: v for k, v in tensors.items() if k != UNIGRAM}
    missing, unknown = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unknown:
        raise SoupError(f"soup tensors do not match the bank: missing {missing[:2]}, unknown {unknown[:2]}")
    for k, t in got.items():
        if tuple(t.shape) != expected[k]:
            raise SoupError(f"soup tensor {k} has shape {list(t.shape)}, expected {list(expected[k])}")
        if not bool(torch.isfinite(t).all()):
            raise SoupError(f"soup tensor {k} holds NaN or infinite values")
    def take(key: str) -> torch.Tensor:
        # moved out of the caller's dict: each entry is freed as soon as it is stacked, so the peak
        # is one bank and one parameter's entries, not two banks
        tensors.pop(key, None)
        return got.pop(key)

    state: dict[str, torch.Tensor] = {}
    for name in soup.names:
        k = _key(name)
        state[f"shared.{k}"] = take(f"shared:{name}")
        if k in soup.bank:
            state[f"bank.{k}"] = torch.stack([take(f"bank:{j}:{name}") for j in range(n)])  # (n, *shape)
        else:
            state[f"bank_u.{k}"] = torch.stack([take(f"bank_u:{j}:{name}") for j in range(n)])  # (n, out, r)
            state[f"bank_v.{k}"] = torch.stack([take(f"bank_v:{j}:{name}") for j in range(n)])  # (n, in, r)
    state.update({f"mlp.{k[4:]}": take(k) for k in [k for k in got if k.startswith("mlp:")]})
    soup.load_state_dict(state, assign=True, strict=True)
    soup.requires_grad_(False)
    soup.eval()
    tables = tensors.get(UNIGRAM)
    if tables is not None and (tables.dim() != 2 or tables.shape[0] != len(domains)
                               or tables.shape[1] != model_cfg.vocab_size or not bool(torch.isfinite(tables).all())):
        raise SoupError(f"unigram tables of shape {list(tables.shape)}: expected finite "
                        f"[{len(domains)}, {model_cfg.vocab_size}]")
    return soup, tables


# ---- specialisation: domain weights from a few samples ------------------------------------------------

def unigram_log_tables(streams: Sequence[torch.Tensor], vocab_size: int, *, smoothing: float = 0.5) -> torch.Tensor:
    """Add-``smoothing`` unigram log-probabilities of each domain's token stream: (D, V) float64."""
    if not streams:
        raise SoupError("need at least one domain stream")
    counts = torch.stack([torch.bincount(s.to(torch.long), minlength=vocab_size)[:vocab_size] for s in streams])
    counts = counts.to(torch.float64) + smoothing  # (D, V)
    return torch.log(counts / counts.sum(dim=1, keepdim=True))  # (D, V)


def estimate_domain_weights(sample_ids: torch.Tensor, log_tables: torch.Tensor, *, iters: int = 500,
                            tol: float = 1e-10) -> torch.Tensor:
    """Maximum-likelihood domain weights of ``sample_ids`` under the mixture of domain unigram models.

    Maximises sum_t log sum_i h_i p_i(x_t) over the simplex by EM (the objective is concave, so EM
    reaches the maximum): responsibilities r_ti = h_i p_i(x_t) / sum_k h_k p_k(x_t), then h_i = mean_t r_ti.
    ``log_tables`` is (D, V) from :func:`unigram_log_tables`; returns h, (D,) float32.
    """
    ids = torch.as_tensor(sample_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise SoupError("need at least one sample token to estimate domain weights")
    if int(ids.max()) >= log_tables.size(1) or int(ids.min()) < 0:
        raise SoupError(f"sample token ids must lie in [0, {log_tables.size(1)})")
    lp = log_tables[:, ids].T  # (N, D)
    d = log_tables.size(0)
    log_h = torch.full((d,), -math.log(d), dtype=torch.float64)
    prev = -math.inf
    for _ in range(iters):
        joint = lp + log_h  # (N, D)
        norm = torch.logsumexp(joint, dim=1, keepdim=True)  # (N, 1)
        ll = float(norm.sum())
        log_h = torch.logsumexp(joint - norm, dim=0) - math.log(ids.numel())  # (D,)
        if ll - prev < tol * ids.numel():
            break
        prev = ll
    h = log_h.exp()
    return (h / h.sum()).to(torch.float32)


def one_hot(domains: Sequence[str], domain: str) -> torch.Tensor:
    """The domain weights that put all the mass on ``domain``: (D,) float32."""
    if domain not in domains:
        raise SoupError(f"unknown domain {domain!r}; domains: {', '.join(domains)}")
    h = torch.zeros(len(domains))
    h[list(domains).index(domain)] = 1.0
    return h
