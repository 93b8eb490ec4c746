"""Training a Soup-of-Experts bank: the meta-distribution over domain weights, batches drawn from a
mixture of persona corpora, the training loop, and cached training (of a bank, and of the
same-compute fine-tune it is compared with).

Each step draws domain weights h from the meta-distribution (``support`` personas chosen uniformly,
Dirichlet weights over them), instantiates the model for h, and takes one AdamW step on a batch whose
every sequence comes from a persona drawn from h. S starts at the trained base, so the bank trains
in minutes; the trained bank is cached (safetensors) under a key of its config and of the content of
the base and the text it trained from.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from . import cache
from .config import ConfigError, ModelConfig, Preset, TrainConfig, config_key
from .data import WindowSampler
from .fractal_moe import build_model
from .soup_of_experts import SoupConfig, SoupError, SoupOfExperts
from .train import lr_at, optimizer_step, train


def sample_domain_weights(n_domains: int, support: int, concentration: float, gen: torch.Generator) -> torch.Tensor:
    """One draw of the meta-distribution: ``support`` of ``n_domains`` chosen uniformly, Dirichlet
    (``concentration``) weights over them, zero elsewhere: (D,) float32 summing to 1."""
    if not 1 <= support <= n_domains:
        raise ConfigError(f"support must be in 1..{n_domains} (the number of domains), got {support}")
    chosen = torch.randperm(n_domains, generator=gen)[:support]  # (s,)
    # Dirichlet by normalised Gamma draws: torch.distributions takes no generator, this does
    gam = torch._standard_gamma(torch.full((support,), float(concentration), dtype=torch.float64), generator=gen)
    w = gam / gam.sum()  # (s,)
    h = torch.zeros(n_domains, dtype=torch.float64)
    h[chosen] = w
    return h.to(torch.float32)


class MixtureSampler:
    """Batches of (input, target) windows whose every sequence's domain is drawn from h, seeded."""

    def __init__(self, streams: Sequence[torch.Tensor], *, batch_size: int, seq_len: int, seed: int) -> None:
        short = [i for i, s in enumerate(streams) if s.numel() <= seq_len + 1]
        if short:
            raise SoupError(f"domain stream {short[0]} is not longer than seq_len + 1 = {seq_len + 1}")
        # one single-window sampler per domain, each with its own seeded generator
        self.domains = [WindowSampler([s], batch_size=1, seq_len=seq_len, seed=seed + 1 + i)
                        for i, s in enumerate(streams)]
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch for domain weights ``h`` (D,): x, y both (B, T) long, y shifted by one."""
        which = torch.multinomial(h.to(torch.float64), self.batch_size, replacement=True, generator=self.gen)  # (B,)
        xs, ys = zip(*(self.domains[d]() for d in which.tolist()))  # B x ((1, T), (1, T))
        return torch.cat(xs), torch.cat(ys)  # (B, T), (B, T)


def train_soup(soup: SoupOfExperts, streams: Sequence[torch.Tensor], *, progress: bool = False,
               desc: str = "soup") -> list[float]:
    """Train ``soup`` in place on the domain ``streams`` (one token stream per domain, in ``soup.domains``
    order) for ``soup.cfg.steps`` steps; returns each step's cross-entropy (nats).

    The objective is next-token cross-entropy plus the load-balancing loss, as for the base.
    """
    cfg = soup.cfg
    if len(streams) != len(soup.domains):
        raise SoupError(f"need one stream per domain ({len(soup.domains)}), got {len(streams)}")
    if cfg.seq_len > soup.model_cfg.context:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's context {soup.model_cfg.context}")
    tc = cfg.train_config()
    # decay follows the model parameter's own rank: a bank of norm gains (n, C) is not a matrix;
    # the bank and the MLP may take a larger step than S, which starts trained
    groups: list[dict] = []
    for dicts, scale in (((soup.shared,), 1.0),
                         ((soup.bank, soup.bank_u, soup.bank_v), cfg.bank_lr_scale)):
        for decays in (True, False):
            ps = [p for d in dicts for k, p in d.items() if (soup.shared[k].dim() >= 2) == decays]
            groups.append({"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0, "scale": scale})
    for decays in (True, False):
        ps = [p for p in soup.mlp.parameters() if (p.dim() >= 2) == decays]
        groups.append({"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0, "scale": cfg.mlp_lr_scale})
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = MixtureSampler(streams, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed + 1)
    soup.train()
    soup.template.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc) * g["scale"]
        h = sample_domain_weights(len(soup.domains), cfg.support, cfg.concentration, gen)  # (D,)
        x, y = sampler(h)
        losses.append(optimizer_step(opt, soup(h, x, y), aux_loss_coef=soup.model_cfg.aux_loss_coef, params=params,
                                     grad_clip=cfg.grad_clip))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    soup.eval()
    soup.template.eval()
    return losses


# ---- cached training ------------------------------------------------------------------------------

def content_hash(state: dict[str, torch.Tensor] | None = None, streams: Sequence[torch.Tensor] = ()) -> str:
    """A short hash of a state dict's tensors and of token streams: what a cache key must cover."""
    h = hashlib.sha256()
    tensors = state or {}
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    for s in streams:
        h.update(b"\0stream")
        h.update(s.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def trained_soup(model_cfg: ModelConfig, cfg: SoupConfig, domains: Sequence[str], streams: Sequence[torch.Tensor],
                 *, shared: dict[str, torch.Tensor], seed: int = 0, use_cache: bool = True,
                 progress: bool = False) -> tuple[SoupOfExperts, dict]:
    """The bank of ``cfg`` with S initialised from ``shared`` (e.g. the trained base) and trained on
    ``streams`` (one per domain), and {"seconds", "cached", "final_loss"}.

    Cached as safetensors under a key of the configs, the domains and the content of ``shared`` and
    ``streams``, so any change of base or text retrains.
    """
    if cfg.support > len(domains):
        raise ConfigError(f"support {cfg.support} exceeds the {len(domains)} domains")
    soup = SoupOfExperts(model_cfg, cfg, domains, shared=shared, seed=seed)
    key = config_key("soup-of-experts", model_cfg, cfg, list(domains), seed, content_hash(shared, streams))
    path = cache.entry_path("soup-of-experts", key)
    t0 = time.perf_counter()
    if path.exists() and use_cache:
        soup.load_state_dict(cache.load_weights(path))
        soup.eval()
        meta = cache.load_meta(path)
        return soup, {"seconds": round(time.perf_counter() - t0, 2), "cached": True,
                      "final_loss": meta.get("final_loss")}
    losses = train_soup(soup, streams, progress=progress, desc=f"soup {cfg.kind} n={cfg.bank_size} s={cfg.support}")
    cache.save_weights(path, soup.state_dict(), {"final_loss": losses[-1] if losses else None, "steps": cfg.steps,
                                                 "domains": list(domains)})
    return soup, {"seconds": round(time.perf_counter() - t0, 2), "cached": False,
                  "final_loss": losses[-1] if losses else None}


def preset_soup_config(preset: Preset, seed: int, *, bank_size: int = 4, rank: int = 0, support: int = 2,
                       mlp_hidden: int = 32, lr: float = 1e-3, bank_lr_scale: float = 3.0, mlp_lr_scale: float = 10.0,
                       steps: int | None = None) -> SoupConfig:
    """The bank a preset trains by default: what `sim.run` ships and Bet 100 measures (one cache entry).

    Batches, sequence length, warm-up and weight decay are the preset's specialist's, so a bank step
    costs what a specialist step costs; ``steps`` defaults to twice a specialist's (the catalogue's
    2000 bank steps against its 1000-step specialists). S takes ``lr`` (it starts at the trained
    base); the bank and the MLP start at zero / random and take ``lr`` times their scales.
    """
    spec = preset.specialist
    return SoupConfig(bank_size=bank_size, rank=rank, support=support, mlp_hidden=mlp_hidden,
                      bank_lr_scale=bank_lr_scale, mlp_lr_scale=mlp_lr_scale,
                      steps=2 * spec.steps if steps is None else steps, batch_size=spec.batch_size,
                      seq_len=spec.seq_len, lr=lr, warmup=spec.warmup, weight_decay=spec.weight_decay, seed=seed)


def suite_soup(suite, cfg: SoupConfig) -> SoupOfExperts:
    """The bank of ``cfg`` for a `model.pipeline.Suite`: S from its base, trained on its training personas.

    Kept in ``suite.soups``: asked again, the suite returns the same bank (and keeps the timing of
    the first call, which trained or loaded it).
    """
    if cfg in suite.soups:
        return suite.soups[cfg]
    soup, info = trained_soup(suite.preset.model, cfg, suite.personas, [suite.ids(p, "train") for p in suite.personas],
                              shared=suite.base_state(), seed=suite.seed, use_cache=suite.use_cache,
                              progress=suite.progress)
    suite.timings[f"soup:{cfg.kind}:n{cfg.bank_size}:s{cfg.support}"] = {"seconds": info["seconds"],
                                                                         "cached": info["cached"]}
    suite.soups[cfg] = soup
    return soup


def finetuned_state(base: dict[str, torch.Tensor], model_cfg: ModelConfig, streams: Sequence[torch.Tensor],
                    tc: TrainConfig, *, use_cache: bool = True, progress: bool = False) -> dict[str, torch.Tensor]:
    """A full fine-tune of ``base`` on ``streams`` with ``tc`` (e.g. a bank's own compute), cached by content."""
    key = config_key("finetune", model_cfg, tc, content_hash(base, streams))
    path = cache.entry_path("finetune", key)
    if path.exists() and use_cache:
        return cache.load_weights(path)
    model = build_model(model_cfg, 0)
    model.load_state_dict(base)
    sampler = WindowSampler(list(streams), batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed)
    losses = train(model, sampler, tc, desc="finetune", progress=progress)
    state = model.state_dict()
    cache.save_weights(path, state, {"final_loss": losses[-1] if losses else None, "steps": tc.steps})
    return state
