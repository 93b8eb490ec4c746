"""Training a Soup-of-Experts bank: the meta-distribution over domain weights, batches drawn from a
mixture of persona corpora, the training loop, and the cached bank of a `Suite`.

Each step draws domain weights h from the meta-distribution (``support`` personas chosen uniformly,
Dirichlet weights over them), instantiates the model for h, and takes one AdamW step on a batch whose
every sequence comes from a persona drawn from h. S starts at the trained base, so the bank trains
in minutes; the trained bank is cached (safetensors) under a key of its config and the base's key.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from . import cache
from .config import ConfigError, TrainConfig, config_key
from .data import WindowSampler
from .soup_of_experts import SoupConfig, SoupError, SoupOfExperts
from .train import lr_at, train


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
    # decay follows the model parameter's own rank: a bank of norm gains (n, C) is not a matrix
    decay, no_decay = [], []
    for d in (soup.shared, soup.bank, soup.bank_u, soup.bank_v):
        for k, p in d.items():
            (decay if soup.shared[k].dim() >= 2 else no_decay).append(p)
    for p in soup.mlp.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    params = decay + no_decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = MixtureSampler(streams, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed + 1)
    soup.train()
    soup.template.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        h = sample_domain_weights(len(soup.domains), cfg.support, cfg.concentration, gen)  # (D,)
        x, y = sampler(h)
        out = soup(h, x, y)
        loss = out.loss + soup.model_cfg.aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(float(out.loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    soup.eval()
    soup.template.eval()
    return losses


# ---- cached training from a Suite -----------------------------------------------------------------

def soup_key(suite, cfg: SoupConfig) -> str:
    """Cache key of the bank of ``cfg`` trained from ``suite``'s base on its training personas."""
    return config_key("soup-of-experts", suite.base_key, cfg, list(suite.personas))


def trained_soup(suite, cfg: SoupConfig) -> SoupOfExperts:
    """The bank of ``cfg`` for ``suite`` (a `model.pipeline.Suite`): S from its base, trained on its
    training personas; loaded from the cache when present (and ``suite.use_cache``)."""
    if cfg.support > len(suite.personas):
        raise ConfigError(f"support {cfg.support} exceeds the {len(suite.personas)} training personas")
    soup = SoupOfExperts(suite.preset.model, cfg, suite.personas, shared=suite.base_state(), seed=suite.seed)
    path = cache.entry_path("soup-of-experts", soup_key(suite, cfg))
    t0 = time.perf_counter()
    part = f"soup:{cfg.kind}:n{cfg.bank_size}:s{cfg.support}"
    if path.exists() and suite.use_cache:
        soup.load_state_dict(cache.load_weights(path))
        soup.eval()
        suite.timings[part] = {"seconds": round(time.perf_counter() - t0, 2), "cached": True}
        return soup
    losses = train_soup(soup, [suite.ids(p, "train") for p in suite.personas], progress=suite.progress, desc=part)
    cache.save_weights(path, soup.state_dict(), {"final_loss": losses[-1] if losses else None, "steps": cfg.steps,
                                                 "domains": list(soup.domains)})
    suite.timings[part] = {"seconds": round(time.perf_counter() - t0, 2), "cached": False}
    return soup


def finetuned_specialist_state(suite, persona: str, tc: TrainConfig) -> dict[str, torch.Tensor]:
    """A full fine-tune of ``suite``'s base on ``persona`` with ``tc`` (e.g. the bank's own compute), cached."""
    if persona not in suite.personas:
        raise KeyError(f"no specialist for {persona!r}; training personas: {', '.join(suite.personas)}")
    path = cache.entry_path("specialist-same-compute", config_key("finetune", suite.base_key, persona, tc))
    if path.exists() and suite.use_cache:
        return cache.load_weights(path)
    model = suite.base()
    sampler = WindowSampler([suite.ids(persona, "train")], batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed)
    losses = train(model, sampler, tc, desc=f"finetune {persona}", progress=suite.progress)
    state = model.state_dict()
    cache.save_weights(path, state, {"final_loss": losses[-1] if losses else None, "steps": tc.steps})
    return state
