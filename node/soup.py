"""A node's Soup-of-Experts: the specialist it instantiates from the bank it holds, for domain
weights h that it is given or estimates from a sample of its users' text.

``VirtualNode`` holds the bank and serves the instance; the checks and the arithmetic are here.
:func:`instantiate` blocks (it runs on the node's compute thread).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.soup_of_experts import SoupError, SoupOfExperts, estimate_domain_weights
from proto.model_labels import soup_label

from .assembly import DecodedBundle, WeightStore
from .errors import InvalidRequest

MAX_SOUP_SAMPLE_TOKENS = 65536  # InstantiateSoupRequest.sample_token_ids


@dataclass
class SoupInstance:
    """The specialist a node instantiated from its Soup-of-Experts bank."""

    bank: str  # the bank bundle's name
    domains: tuple[str, ...]
    domain_weights: list[float]  # h
    alpha: list[float]  # MLP(h)
    label: str  # what ScoreTokensReply.model says

    def as_dict(self) -> dict:
        """JSON-able."""
        return {"bank": self.bank, "domains": list(self.domains), "domain_weights": self.domain_weights,
                "alpha": self.alpha, "model": self.label}


def bank_of(bundle: DecodedBundle) -> SoupOfExperts:
    """The Soup-of-Experts bank ``bundle`` holds; a ValueError for a model bundle (a caller's mistake)."""
    if bundle.bank is None:
        raise ValueError(f"bundle {bundle.name!r} holds no Soup-of-Experts bank")
    return bundle.bank


def kept_h(bank: DecodedBundle, current: SoupInstance | None) -> torch.Tensor:
    """The h to keep serving with a new bank: the current one if it fits, else uniform."""
    d = len(bank_of(bank).domains)
    if current is not None and len(current.domain_weights) == d:
        return torch.tensor(current.domain_weights)
    return torch.full((d,), 1.0 / d)


def describe(bank: DecodedBundle, h: torch.Tensor) -> SoupInstance:
    """What a node serves from ``bank`` for domain weights ``h`` (d,)."""
    soup = bank_of(bank)
    h = soup.check_h(h)
    return SoupInstance(bank=bank.name, domains=soup.domains, domain_weights=[float(v) for v in h],
                        alpha=[float(v) for v in soup.alpha(h).detach()], label=soup_label(h.tolist()))


def requested_h(bank: DecodedBundle, domain_weights: Sequence[float],
                sample_token_ids: Sequence[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(h (d,) float32, None) or (None, sample (n,) long) from an InstantiateSoup request, checked
    against ``bank``: exactly one of the two, h of the bank's length, sample ids in its vocabulary.
    InvalidRequest otherwise."""
    if bool(domain_weights) == bool(sample_token_ids):
        raise InvalidRequest("give exactly one of domain_weights and sample_token_ids")
    if domain_weights:
        domains = bank_of(bank).domains
        if len(domain_weights) != len(domains):
            raise InvalidRequest(f"domain_weights has {len(domain_weights)} values; the bank has "
                                 f"{len(domains)} domains ({', '.join(domains)})")
        return torch.tensor(list(domain_weights), dtype=torch.float32), None
    n, vocab = len(sample_token_ids), bank.config.vocab_size
    if n > MAX_SOUP_SAMPLE_TOKENS:
        raise InvalidRequest(f"sample of {n} tokens exceeds the limit of {MAX_SOUP_SAMPLE_TOKENS}")
    sample = torch.tensor(list(sample_token_ids), dtype=torch.long)
    if bool((sample >= vocab).any()):
        raise InvalidRequest(f"sample token id {int(sample.max())} is out of range (vocabulary of {vocab})")
    return None, sample


def instantiate(store: WeightStore, bank: DecodedBundle, h: torch.Tensor | None,
                sample: torch.Tensor | None) -> tuple[DecodedBundle, torch.Tensor]:
    """(the decoded pseudo-bundle of the specialist for h, h); blocking. h is estimated from
    ``sample`` (token ids) when not given. Shared with the process's other nodes through ``store``
    by a sha256 of the bank's and h's bytes."""
    soup = bank_of(bank)
    try:
        if h is None:
            if sample is None:
                raise InvalidRequest("give exactly one of domain_weights and sample_token_ids")
            if bank.unigram is None:
                raise InvalidRequest(f"bank {bank.name!r} ships no unigram tables: give domain_weights")
            h = estimate_domain_weights(sample, bank.unigram)
        h = soup.check_h(h)
    except SoupError as exc:
        raise InvalidRequest(str(exc)) from None
    h = h.to(torch.float32)
    sha = hashlib.sha256(bank.sha256 + h.numpy().tobytes()).digest()

    def build() -> DecodedBundle:
        tensors = {k: v.requires_grad_(False) for k, v in soup.instantiate(h).items()}
        return DecodedBundle(name=f"{bank.name}@{sha.hex()[:12]}", sha256=sha, size=0, config=bank.config,
                             meta={"instantiated_from": bank.name, "domain_weights": h.tolist()},
                             tensors=tensors, model=bank.model, codec=bank.codec)
    return store.get_or_decode(sha, build), h
