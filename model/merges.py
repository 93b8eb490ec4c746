"""Weight-space merges of state dicts, in the style of mergekit and peft's add_weighted_adapter.

The catalogue falsifies most of these in the federation's regime (Bet 31 linear soup, Bet 33 task
arithmetic, Bet 38 expert averaging, Bet 54 adapter averaging); seed 002 lists the methods that
work elsewhere (uniform and greedy soup, WiSE-FT, task arithmetic, TIES, DARE). They live here so
that the simulator measures them instead of quoting them.

Every function takes state dicts (``dict[str, torch.Tensor]``) with identical keys, shapes and
dtypes, and returns a new state dict that shares no storage with its inputs (safetensors refuses
shared tensors). Arithmetic runs in at least float32 and is cast back to each tensor's dtype.
Tensors that are not floating point (integer buffers) must be equal in every input and are copied.
Bad input raises :class:`MergeError`. This module imports nothing of ours but the model's
parameter-naming contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .fractal_moe import expert_of, is_norm_param

StateDict = dict[str, torch.Tensor]


class MergeError(ValueError):
    """State dicts cannot be merged as asked: mismatched keys, shapes or dtypes, or bad options."""


# ---- validation --------------------------------------------------------------------------------

def _check(sds: Sequence[Mapping[str, torch.Tensor]], what: str = "state dicts") -> list[str]:
    """The common keys of ``sds`` (in the first one's order) after checking they all match."""
    if isinstance(sds, Mapping) or not isinstance(sds, Sequence) or len(sds) == 0:
        raise MergeError(f"expected a non-empty sequence of {what}")
    first = sds[0]
    for i, sd in enumerate(sds):
        if not isinstance(sd, Mapping):
            raise MergeError(f"{what}[{i}] is a {type(sd).__name__}, not a state dict")
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise MergeError(f"{what}[{i}][{k!r}] is a {type(v).__name__}, not a tensor")
    keys = list(first)
    for i, sd in enumerate(sds[1:], start=1):
        missing, extra = set(first) - set(sd), set(sd) - set(first)
        if missing or extra:
            detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(extra)[:3]}"
            raise MergeError(f"{what}[{i}] has different keys from {what}[0]: {detail}")
        for k in keys:
            a, b = first[k], sd[k]
            if a.shape != b.shape:
                raise MergeError(f"{k!r}: shape {tuple(b.shape)} in {what}[{i}] != {tuple(a.shape)} in {what}[0]")
            if a.dtype != b.dtype:
                raise MergeError(f"{k!r}: dtype {b.dtype} in {what}[{i}] != {a.dtype} in {what}[0]")
    return keys


def _finite(x: float, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise MergeError(f"{name} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise MergeError(f"{name} must be finite, got {v}")
    return v


def _coefficients(values: float | Sequence[float], n: int, name: str) -> list[float]:
    """One finite coefficient per input: a scalar is repeated, a sequence must have length ``n``."""
    if isinstance(values, (int, float)):
        return [_finite(values, name)] * n
    vals = [_finite(v, name) for v in values]
    if len(vals) != n:
        raise MergeError(f"{name} has {len(vals)} values for {n} state dicts")
    return vals


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype: at least float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _copy_if_not_float(sds: Sequence[Mapping[str, torch.Tensor]], k: str) -> torch.Tensor | None:
    """A copy of a non-float tensor (equal in every input), or None for a float tensor."""
    t = sds[0][k]
    if t.is_floating_point():
        return None
    if any(not torch.equal(t, sd[k]) for sd in sds[1:]):
        raise MergeError(f"{k!r} is not floating point and differs between inputs: cannot merge it")
    return t.clone()


def _clone(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().clone() for k, v in sd.items()}


# ---- soups -------------------------------------------------------------------------------------

def weighted_soup(sds: Sequence[Mapping[str, torch.Tensor]], *, weights: Sequence[float] | None = None,
                  normalize: bool = True) -> StateDict:
    """sum_i w_i * sds[i] for every tensor (N-way linear soup; uniform weights by default).

    ``normalize`` divides the weights by their sum. Weights that pick exactly one input (one 1,
    the rest 0) return a bitwise copy of it: 1*x + 0*y would turn -0.0 into 0.0 and inf into NaN.
    """
    keys = _check(sds)
    n = len(sds)
    w = _coefficients(1.0 if weights is None else weights, n, "weights")
    if normalize:
        total = sum(w)
        if total == 0:
            raise MergeError("weights sum to 0: cannot normalise them")
        w = [x / total for x in w]
    ones = [i for i, x in enumerate(w) if x == 1.0]
    if len(ones) == 1 and all(x == 0.0 for i, x in enumerate(w) if i != ones[0]):
        return _clone(sds[ones[0]])
    out: StateDict = {}
    for k in keys:
        fixed = _copy_if_not_float(sds, k)
        if fixed is not None:
            out[k] = fixed
            continue
        acc = w[0] * _acc(sds[0][k])
        for wi, sd in zip(w[1:], sds[1:]):
            acc = acc + wi * _acc(sd[k])
        out[k] = acc.to(sds[0][k].dtype)
    return out


def uniform_soup(sds: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """The arithmetic mean of every tensor over ``sds`` (Wortsman et al.'s uniform soup)."""
    return weighted_soup(sds)


def linear_soup(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *, alpha: float) -> StateDict:
    """alpha * a + (1 - alpha) * b (Bet 31); alpha = 1 returns ``a`` and alpha = 0 ``b``, bitwise.

    alpha outside [0, 1] extrapolates.
    """
    alpha = _finite(alpha, "alpha")
    return weighted_soup([a, b], weights=[alpha, 1.0 - alpha], normalize=False)


def wise_ft(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], *, alpha: float) -> StateDict:
    """WiSE-FT: (1 - alpha) * base + alpha * finetuned; alpha = 0 is the base, 1 the fine-tune."""
    return linear_soup(finetuned, base, alpha=alpha)


@dataclass(frozen=True)
class GreedySoup:
    """The outcome of :func:`greedy_soup`."""

    state: StateDict
    ingredients: tuple[int, ...]  # indices into the inputs, in the order they were added
    score: float  # the soup's score
    solo_scores: tuple[float, ...]  # every input's own score, in input order


def greedy_soup(sds: Sequence[Mapping[str, torch.Tensor]], *, evaluate: Callable[[StateDict], float],
                maximize: bool = False) -> GreedySoup:
    """Wortsman et al.'s greedy soup: add inputs best-first, keeping each one only if it does not hurt.

    ``evaluate`` scores a state dict (a held-out loss by default; ``maximize`` for accuracy). The soup
    is always the uniform mean of the kept ingredients; ties keep the ingredient, as in the paper.
    """
    _check(sds)
    sign = -1.0 if maximize else 1.0  # internally lower is better

    def score(sd: Mapping[str, torch.Tensor]) -> float:
        return _finite(evaluate(dict(sd)), "evaluate(...)")

    solo = tuple(score(sd) for sd in sds)
    order = sorted(range(len(sds)), key=lambda i: (sign * solo[i], i))
    kept = [order[0]]
    best_state, best = _clone(sds[order[0]]), solo[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([sds[j] for j in (*kept, i)])
        s = score(candidate)
        if sign * s <= sign * best:
            kept.append(i)
            best_state, best = candidate, s
    return GreedySoup(state=best_state, ingredients=tuple(kept), score=best, solo_scores=solo)


# ---- task vectors --------------------------------------------------------------------------------

def task_vector(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> StateDict:
    """finetuned - base for every floating-point tensor (Ilharco et al.)."""
    keys = _check([base, finetuned])
    return {k: (_acc(finetuned[k]) - _acc(base[k])).to(base[k].dtype) for k in keys if base[k].is_floating_point()}


def _deltas(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], k: str) -> torch.Tensor:
    """The fine-tunes' deltas of tensor ``k`` stacked: (M, *shape) in the accumulation dtype."""
    b = _acc(base[k])
    return torch.stack([_acc(ft[k]) - b for ft in finetuned])


def _finetuned(finetuned: Sequence[Mapping[str, torch.Tensor]]) -> list[Mapping[str, torch.Tensor]]:
    """``finetuned`` as a list, refusing a lone state dict or an empty sequence."""
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence) or len(finetuned) == 0:
        raise MergeError("finetuned must be a non-empty sequence of state dicts")
    return list(finetuned)


def _apply_deltas(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                  merged_delta: Callable[[str, torch.Tensor], torch.Tensor]) -> StateDict:
    """base + merged_delta(key, deltas (M, *shape)) for every float tensor; the rest copied."""
    finetuned = _finetuned(finetuned)
    keys = _check([base, *finetuned])
    out: StateDict = {}
    for k in keys:
        fixed = _copy_if_not_float([base, *finetuned], k)
        if fixed is not None:
            out[k] = fixed
            continue
        out[k] = (_acc(base[k]) + merged_delta(k, _deltas(base, finetuned, k))).to(base[k].dtype)
    return out


def _per_model(x: torch.Tensor, coeffs: Sequence[float]) -> torch.Tensor:
    """(M,) coefficients shaped to broadcast over stacked deltas (M, *shape)."""
    return torch.tensor(coeffs, dtype=x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def task_arithmetic(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                    lambdas: float | Sequence[float] = 1.0) -> StateDict:
    """base + sum_i lambdas[i] * (finetuned[i] - base) (Bet 33); all lambdas 0 returns the base bitwise."""
    finetuned = _finetuned(finetuned)
    lam = _coefficients(lambdas, len(finetuned), "lambdas")
    if all(x == 0.0 for x in lam):
        _check([base, *finetuned])
        return _clone(base)
    return _apply_deltas(base, finetuned, lambda k, d: (_per_model(d, lam) * d).sum(dim=0))


def _top_magnitude_mask(d: torch.Tensor, density: float) -> torch.Tensor:
    """True for the ceil(density * numel) largest |values| of each model's delta: (M, *shape) bool."""
    flat = d.reshape(d.size(0), -1).abs()  # (M, P)
    keep = min(flat.size(1), max(1, math.ceil(density * flat.size(1))))
    idx = torch.topk(flat, keep, dim=1).indices  # (M, keep)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return mask.reshape(d.shape)


def ties_merge(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
               density: float = 0.2, scale: float = 1.0) -> StateDict:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean; base + scale * merged delta.

    Per tensor (as mergekit does): each delta keeps its ceil(density * numel) largest magnitudes;
    the elected sign of each entry is the sign of the sum of the trimmed deltas; the merged delta is
    the mean of the trimmed deltas that are non-zero and agree with it (0 where none does).
    """
    density = _finite(density, "density")
    if not 0.0 < density <= 1.0:
        raise MergeError(f"density must lie in (0, 1], got {density}")
    scale = _finite(scale, "scale")

    def merge(_k: str, d: torch.Tensor) -> torch.Tensor:
        trimmed = d * _top_magnitude_mask(d, density)  # (M, *shape)
        elected = torch.sign(trimmed.sum(dim=0))  # (*shape)
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)  # (M, *shape)
        count = agree.sum(dim=0).clamp(min=1)
        return scale * (trimmed * agree).sum(dim=0) / count

    return _apply_deltas(base, finetuned, merge)


def dare_merge(base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
               drop_p: float, seed: int, lambdas: float | Sequence[float] = 1.0) -> StateDict:
    """DARE (Yu et al. 2024): drop each delta entry with probability ``drop_p``, rescale the survivors
    by 1 / (1 - drop_p), then task arithmetic with ``lambdas``.

    The masks come from one generator seeded with ``seed``, drawn per tensor in key order and per
    fine-tune in input order: the same seed gives the same merge.
    """
    drop_p = _finite(drop_p, "drop_p")
    if not 0.0 <= drop_p < 1.0:
        raise MergeError(f"drop_p must lie in [0, 1), got {drop_p}")
    finetuned = _finetuned(finetuned)
    lam = _coefficients(lambdas, len(finetuned), "lambdas")
    gen = torch.Generator().manual_seed(int(seed))

    def merge(_k: str, d: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(d.shape, generator=gen, dtype=torch.float64) >= drop_p  # (M, *shape)
        return (_per_model(d, lam) * d * keep / (1.0 - drop_p)).sum(dim=0)

    return _apply_deltas(base, finetuned, merge)


# ---- experts and adapters ----------------------------------------------------------------------

def _expert_groups(sd: Mapping[str, torch.Tensor]) -> dict[tuple[int, str], list[str]]:
    """(block, parameter suffix) -> the names of that parameter in experts 0..E-1, in expert order."""
    groups: dict[tuple[int, str], dict[int, str]] = {}
    for name in sd:
        be = expert_of(name)
        if be is None:
            continue
        block, e = be
        suffix = name.split(f".experts.{e}.", 1)[1]
        groups.setdefault((block, suffix), {})[e] = name
    if not groups:
        raise MergeError("no expert parameters (blocks.{b}.moe.experts.{e}.*) in the state dict")
    counts = {len(g) for g in groups.values()}
    if len(counts) != 1:
        raise MergeError(f"blocks disagree on their number of experts: {sorted(counts)}")
    out = {}
    for key, g in groups.items():
        if sorted(g) != list(range(len(g))):
            raise MergeError(f"block {key[0]} {key[1]}: experts are not numbered 0..{len(g) - 1}")
        out[key] = [g[e] for e in range(len(g))]
    return out


def average_experts(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Bet 38: every expert of each block replaced by the mean of that block's experts.

    All experts are kept, as identical copies, so shapes, names and the wire format stay unchanged
    (the router still routes, but every choice computes the same function). Every other tensor is
    copied unchanged.
    """
    keys = _check([sd])
    groups = _expert_groups(sd)
    out = {k: sd[k].detach().clone() for k in keys if expert_of(k) is None}
    for names in groups.values():
        stack = torch.stack([_acc(sd[n]) for n in names])  # (E, *shape)
        mean = stack.mean(dim=0).to(sd[names[0]].dtype)
        for n in names:
            out[n] = mean.clone()
    return {k: out[k] for k in keys}


def expert_spread(sd: Mapping[str, torch.Tensor]) -> list[float]:
    """How different the experts of each block are: per block, the mean squared deviation of the
    experts' weights from their block mean, divided by the mean squared weight (0 when all equal).
    A Bet 38 diagnostic; a list with one value per block.
    """
    groups = _expert_groups(sd)
    per_block: dict[int, list[float]] = {}
    for (block, _suffix), names in sorted(groups.items()):
        stack = torch.stack([sd[n].to(torch.float64) for n in names])  # (E, *shape)
        dev = ((stack - stack.mean(dim=0)) ** 2).sum()
        power = (stack ** 2).sum()
        per_block.setdefault(block, []).extend([float(dev), float(power)])
    return [(sum(v[0::2]) / sum(v[1::2])) if sum(v[1::2]) > 0 else 0.0 for _, v in sorted(per_block.items())]


def average_adapters(adapters: Sequence[Mapping[str, torch.Tensor]], *,
                     weights: Sequence[float] | None = None) -> StateDict:
    """Bet 54: one adapter from many norm-only user adapters, their (weighted) mean.

    Every key must be a LayerNorm gain or bias (an adapter, not a whole model).
    """
    _check(adapters, "adapters")
    for i, ad in enumerate(adapters):
        stray = [k for k in ad if not is_norm_param(k)]
        if stray:
            raise MergeError(f"adapters[{i}] holds non-adapter parameter {stray[0]!r}: adapters are norm-only")
    return weighted_soup(adapters, weights=weights)


# ---- loss along a path -----------------------------------------------------------------------------

def loss_barrier(losses_along_path: Sequence[float], *, alphas: Sequence[float] | None = None) -> float:
    """Height of the loss barrier on a linear path: max over alpha of loss(alpha) minus the straight
    line between the endpoint losses, (1 - alpha) * loss(0) + alpha * loss(1).

    ``losses_along_path`` holds the loss at ``alphas`` (default: evenly spaced from 0 to 1; given,
    they must rise strictly from 0 to 1). 0 means the path is no worse than the straight line (linear
    mode connectivity); a large value is the saddle between two basins.
    """
    losses = [_finite(x, "loss") for x in losses_along_path]
    if len(losses) < 2:
        raise MergeError("loss_barrier needs the losses of both endpoints at least")
    if alphas is None:
        a = [i / (len(losses) - 1) for i in range(len(losses))]
    else:
        a = [_finite(x, "alpha") for x in alphas]
        if len(a) != len(losses):
            raise MergeError(f"{len(a)} alphas for {len(losses)} losses")
        if a[0] != 0.0 or a[-1] != 1.0 or any(y <= x for x, y in zip(a, a[1:])):
            raise MergeError("alphas must rise strictly from 0 to 1")
    l0, l1 = losses[0], losses[-1]
    return max(loss - ((1.0 - al) * l0 + al * l1) for al, loss in zip(a, losses))
