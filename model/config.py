"""Validated configurations: the model's shape, training runs, and the named presets.

Every preset keeps 16 experts per block: the expert count is what the federation is about.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

N_EXPERTS = 16


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


GATES = ("unit", "prob")  # how a chosen expert's output is scaled: see ModelConfig.gate
MAX_BASE_STEPS = 10_000_000  # the largest base pretraining a preset, model train or a scenario may ask for


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a FractalMoE model."""

    vocab_size: int
    d_model: int
    n_layers: int = 4
    n_heads: int
    n_experts: int = N_EXPERTS
    d_ff: int
    top_k: int = 1
    context: int
    aux_loss_coef: float = 0.01
    # How the chosen expert's output is scaled. "unit": by 1 in the forward pass, with the router's
    # gradient passed straight through (p / stop_grad(p)); "prob": by the router's probability p, as
    # the Switch Transformer does. With top-1 of 16 experts p starts near 1/16, so "prob" damps every
    # expert's output (and gradient) about sixteen-fold and the trained model leaves its knowledge in
    # attention and embeddings (zeroing all experts cost x1.3-2.6 at `small`); "unit" makes the
    # experts load-bearing (x79-156) for a 2-5% higher perplexity. See docs/design.md, "Regime".
    gate: str = "unit"

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 260, f"vocab_size must be >= 260 (bytes + specials), got {self.vocab_size}")
        _require(self.d_model > 0 and self.d_model % self.n_heads == 0,
                 f"d_model ({self.d_model}) must be a positive multiple of n_heads ({self.n_heads})")
        _require(self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}")
        _require(self.n_experts >= 1, f"n_experts must be >= 1, got {self.n_experts}")
        _require(self.top_k == 1, f"FractalMoE routes top-1; top_k={self.top_k} is not supported")
        _require(self.d_ff > 0, f"d_ff must be > 0, got {self.d_ff}")
        _require(self.context >= 8, f"context must be >= 8, got {self.context}")
        _require(0.0 <= self.aux_loss_coef < 1.0, f"aux_loss_coef must be in [0, 1), got {self.aux_loss_coef}")
        _require(self.gate in GATES, f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: base pretraining, a specialist fine-tune or a user adapter."""

    steps: int
    batch_size: int = 16
    seq_len: int
    lr: float
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named bundle of everything needed to build the federation's models."""

    name: str
    model: ModelConfig
    base: TrainConfig
    specialist: TrainConfig
    adapter: TrainConfig
    corpus_chars: int = field(default=200_000)  # characters of training text per persona
    eval_chars: int = field(default=20_000)  # characters of held-out text per persona / user
    users_per_persona: int = 2

    def __post_init__(self) -> None:
        _require(self.model.n_experts == N_EXPERTS,
                 f"preset {self.name!r}: every preset keeps {N_EXPERTS} experts per block")
        for tc in (self.base, self.specialist, self.adapter):
            _require(tc.seq_len <= self.model.context,
                     f"preset {self.name!r}: seq_len {tc.seq_len} exceeds context {self.model.context}")
        _require(self.corpus_chars >= 1000 and self.eval_chars >= 200,
                 f"preset {self.name!r}: corpus_chars/eval_chars too small")
        _require(self.users_per_persona >= 1, f"preset {self.name!r}: users_per_persona must be >= 1")

    def with_base_steps(self, steps: int) -> Preset:
        """The same preset with the base pretrained for ``steps`` steps (0: the preset's own).

        A federation that pretrains on its users' text (``--corpus-pretrain``) may want a longer
        pretraining than the default's, which is sized for a cold run on 2 cores; warm-up and
        schedule scale with it because they are set in the same TrainConfig.
        """
        _require(0 <= steps <= MAX_BASE_STEPS,
                 f"base steps must be 0 (the preset's) or 1..{MAX_BASE_STEPS}, got {steps}")
        if not steps:
            return self
        return dataclasses.replace(self, base=dataclasses.replace(self.base, steps=steps))

    def with_seed(self, seed: int) -> Preset:
        """The same preset with every training seed derived from ``seed``."""
        return dataclasses.replace(
            self,
            base=dataclasses.replace(self.base, seed=seed),
            specialist=dataclasses.replace(self.specialist, seed=seed + 1),
            adapter=dataclasses.replace(self.adapter, seed=seed + 2),
        )


def config_key(*parts: object) -> str:
    """A short stable hash of dataclasses / JSON-able values, used as a cache key."""
    def norm(x: object) -> object:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.asdict(x)
        return x
    blob = json.dumps([norm(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


PRESETS: dict[str, Preset] = {
    # tests: trains in seconds
    "tiny": Preset(
        name="tiny",
        model=ModelConfig(vocab_size=384, d_model=32, n_heads=2, d_ff=128, context=64),
        base=TrainConfig(steps=150, batch_size=16, seq_len=64, lr=3e-3, warmup=10),
        specialist=TrainConfig(steps=40, batch_size=16, seq_len=64, lr=1e-3, warmup=5),
        adapter=TrainConfig(steps=40, batch_size=16, seq_len=64, lr=1e-2, warmup=5, weight_decay=0.0),
        corpus_chars=40_000,
        eval_chars=4_000,
        users_per_persona=1,
    ),
    # the default: trains on a 2-core machine in a few minutes
    "small": Preset(
        name="small",
        model=ModelConfig(vocab_size=1024, d_model=128, n_heads=4, d_ff=512, context=128),
        base=TrainConfig(steps=600, batch_size=16, seq_len=128, lr=2e-3, warmup=30),
        specialist=TrainConfig(steps=150, batch_size=16, seq_len=128, lr=5e-4, warmup=10),
        adapter=TrainConfig(steps=80, batch_size=16, seq_len=128, lr=5e-3, warmup=5, weight_decay=0.0),
        corpus_chars=300_000,
        eval_chars=20_000,
        users_per_persona=2,
    ),
    # the catalogue's shape: 4 blocks x 16 experts, d_model 256, ~38M parameters, vocab near 8k
    "30m": Preset(
        name="30m",
        model=ModelConfig(vocab_size=8192, d_model=256, n_heads=8, d_ff=1024, context=256),
        base=TrainConfig(steps=3000, batch_size=16, seq_len=128, lr=1e-3, warmup=100),
        specialist=TrainConfig(steps=1000, batch_size=16, seq_len=128, lr=3e-4, warmup=50),
        adapter=TrainConfig(steps=200, batch_size=16, seq_len=128, lr=3e-3, warmup=10, weight_decay=0.0),
        corpus_chars=2_000_000,
        eval_chars=50_000,
        users_per_persona=2,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ConfigError naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
