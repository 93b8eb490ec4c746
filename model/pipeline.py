"""The model pipeline: tokenizer, base, specialists and user adapters for a preset, cached.

`Suite` is the one entry point the rest of the project uses to get trained models. Every part
is trained on first use and cached as safetensors under a key of its config, its training text
and its seed; later calls (and later runs) load it instead. ``use_cache=False`` retrains.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import cached_property
from pathlib import Path

import torch

from . import cache, corpora
from .config import Preset, config_key, get_preset
from .data import WindowSampler
from .evaluate import bits_per_char, perplexity, token_logps
from .fractal_moe import FractalMoE, build_model
from .reliance import DROP_ONE_TOKENS, expert_reliance
from .tokenizer import encode, load_tokenizer, save_tokenizer, train_tokenizer
from .train import adapter_param_names, adapter_state, apply_adapter, resolve_device, train

USER_TRAIN_FRACTION = 0.25  # a user's own training text, as a fraction of a persona's corpus


def _text_hash(*texts: str) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class Suite:
    """Everything trained for one preset and seed: tokenizer, base, specialists, adapters.

    Sources: the training personas (base and one specialist each), the held-out persona (never
    trained on), known users (a perturbation of a training persona, each with an adapter), unknown
    users (of the held-out persona: no adapter, served by the base) and users brought with
    ``corpus_dir`` (one sub-folder each, with an adapter).

    The tokenizer and the base pretrain on ``pretrain``: the training personas, the built-in real
    prose ("reference") and, with ``pretrain_corpus``, the ``corpus_dir`` users' own training text
    (a federation pretrains on its community's language). ``device`` ("auto", "cpu", "cuda") is
    where training and evaluation run; weights are cached on the CPU either way.
    """

    def __init__(self, preset: Preset | str = "small", seed: int = 0, *, use_cache: bool = True,
                 corpus_dir: str | Path | None = None, corpus_chars: int = 0, progress: bool = True,
                 pretrain_corpus: bool = False, device: str = "cpu") -> None:
        base_preset = get_preset(preset) if isinstance(preset, str) else preset
        self.preset = base_preset.with_seed(seed)
        self.seed = seed
        self.use_cache = use_cache
        self.progress = progress
        self.timings: dict[str, dict] = {}  # part -> {"seconds": float, "cached": bool}
        self.device = resolve_device(device)
        if pretrain_corpus and corpus_dir is None:
            raise corpora.CorpusError("pretraining on the users' text needs --corpus DIR")
        self.personas: tuple[str, ...] = tuple(corpora.TRAIN_PERSONAS)
        self.held_out: str = corpora.HELD_OUT_PERSONA
        self.sources: dict[str, corpora.TextSource] = {}
        for p in (*self.personas, self.held_out):
            self.sources[p] = corpora.persona_source(p, seed)
        self.sources[corpora.REFERENCE] = corpora.reference_source(seed)
        self.known_users: list[str] = []
        for p in corpora.SYNTHETIC_PERSONAS:
            for src in corpora.user_sources(p, self.preset.users_per_persona, seed):
                self.sources[src.name] = src
                self.known_users.append(src.name)
        self.unknown_users: list[str] = []
        for src in corpora.user_sources(self.held_out, self.preset.users_per_persona, seed):
            self.sources[src.name] = src
            self.unknown_users.append(src.name)
        # --corpus users train on corpus_chars characters spread over their text (0: as the built-in users)
        self.corpus_chars = corpus_chars
        self.corpus_users: list[str] = []
        if corpus_dir is not None:
            for src in corpora.folder_sources(corpus_dir):
                if src.name in self.sources:
                    raise corpora.CorpusError(f"--corpus user {src.name!r} clashes with a built-in name")
                self.sources[src.name] = src
                self.known_users.append(src.name)
                self.corpus_users.append(src.name)
        self.pretrain: tuple[str, ...] = (*self.personas, corpora.REFERENCE,
                                          *(self.corpus_users if pretrain_corpus else ()))
        self._ids: dict[tuple[str, str], torch.Tensor] = {}
        self._texts: dict[tuple[str, str], str] = {}
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self.soups: dict = {}  # SoupConfig -> its trained bank, filled by model.soe_train.suite_soup

    # ---- text -------------------------------------------------------------------------------
    def text(self, name: str, split: str) -> str:
        """Text of source ``name`` ("train" or "eval" split), at the preset's size."""
        key = (name, split)
        if key not in self._texts:
            if name not in self.sources:
                raise KeyError(f"unknown source {name!r}")
            n = self.preset.eval_chars if split == "eval" else self.preset.corpus_chars
            if split == "train" and name not in (*self.personas, corpora.REFERENCE):
                n = int(n * USER_TRAIN_FRACTION)
            if split == "train" and name in self.corpus_users and self.corpus_chars:
                n = self.corpus_chars
            self._texts[key] = self.sources[name].text(split, n)
        return self._texts[key]

    def available_chars(self, name: str, split: str) -> int | None:
        """Characters a --corpus user's split holds in all (None for generated text, unbounded)."""
        src = self.sources[name]
        if not isinstance(src, corpora.FolderSource):
            return None
        return len(src.train_text if split == "train" else src.eval_text)

    def ids(self, name: str, split: str) -> torch.Tensor:
        """Token ids of :meth:`text`: (N,) long."""
        key = (name, split)
        if key not in self._ids:
            self._ids[key] = torch.tensor(encode(self.tokenizer, self.text(name, split)), dtype=torch.long)
        return self._ids[key]

    def floor_bpc(self, name: str) -> float | None:
        """The exact entropy rate of source ``name`` in bits per character, where known."""
        return self.sources[name].floor_bpc

    @cached_property
    def corpus_hash(self) -> str:
        """Hash of the base's training text (part of every cache key)."""
        return _text_hash(*(self.text(p, "train") for p in self.pretrain))

    # ---- tokenizer --------------------------------------------------------------------------
    @cached_property
    def tokenizer_path(self) -> Path:
        """tokenizer.json of this suite (trained and cached on first use)."""
        key = config_key("tokenizer", self.preset.model.vocab_size, self.corpus_hash)
        path = cache.entry_path("tokenizer", key, ".json")
        if path.exists() and self.use_cache:
            self.timings["tokenizer"] = {"seconds": 0.0, "cached": True}
            return path
        t0 = time.perf_counter()
        tok = train_tokenizer([self.text(p, "train") for p in self.pretrain], self.preset.model.vocab_size)
        save_tokenizer(tok, path)
        self.timings["tokenizer"] = {"seconds": round(time.perf_counter() - t0, 2), "cached": False}
        return path

    @cached_property
    def tokenizer(self):
        """The `tokenizers.Tokenizer` of this suite."""
        return load_tokenizer(self.tokenizer_path)

    # ---- weights ----------------------------------------------------------------------------
    @cached_property
    def base_key(self) -> str:
        """Cache key of the base model."""
        return config_key("base", self.preset.model, self.preset.base, self.corpus_hash, self.tokenizer_path.name)

    def _cached(self, part: str, kind: str, key: str, build) -> dict[str, torch.Tensor]:
        if part in self._states:
            return self._states[part]
        path = cache.entry_path(kind, key)
        t0 = time.perf_counter()
        if path.exists() and self.use_cache:
            state = cache.load_weights(path)
            self.timings[part] = {"seconds": round(time.perf_counter() - t0, 2), "cached": True}
        else:
            # an interrupted training resumes from here (the next run with the same key finds it)
            checkpoint = path.with_name(path.name.removesuffix(".safetensors") + ".checkpoint.safetensors")
            if not self.use_cache:
                checkpoint.unlink(missing_ok=True)
            state, meta = build(checkpoint)
            state = {k: v.cpu() for k, v in state.items()}
            cache.save_weights(path, state, meta)
            checkpoint.unlink(missing_ok=True)
            self.timings[part] = {"seconds": round(time.perf_counter() - t0, 2), "cached": False}
        self._states[part] = state
        return state

    def new_model(self, state: dict[str, torch.Tensor] | None = None) -> FractalMoE:
        """A fresh FractalMoE of this preset, loaded with ``state`` when given."""
        m = build_model(self.preset.model, self.seed)
        if state is not None:
            m.load_state_dict(state)
        m.eval()
        return m

    def _train_from(self, init: dict | None, streams: list[torch.Tensor], tc, desc: str, checkpoint: Path,
                    params=None):
        model = self.new_model(init).to(self.device)
        sampler = WindowSampler(streams, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed)
        every = max(1, min(200, tc.steps // 10))  # about ten checkpoints a run, never fewer than every 200 steps
        losses = train(model, sampler, tc, params=params, desc=desc, progress=self.progress, checkpoint=checkpoint,
                       checkpoint_every=every)
        return model.cpu(), {"final_loss": losses[-1] if losses else None, "steps": tc.steps,
                             "device": self.device.type}

    def base_state(self) -> dict[str, torch.Tensor]:
        """Weights of the base model, pretrained on every text of :attr:`pretrain`."""
        def build(checkpoint):
            model, meta = self._train_from(None, [self.ids(p, "train") for p in self.pretrain],
                                           self.preset.base, "base", checkpoint)
            return model.state_dict(), meta
        return self._cached("base", "base", self.base_key, build)

    def specialist_state(self, persona: str) -> dict[str, torch.Tensor]:
        """Weights of the specialist of ``persona``: a full fine-tune of the base on its text."""
        if persona not in self.personas:
            raise KeyError(f"no specialist for {persona!r}; training personas: {', '.join(self.personas)}")
        key = config_key("specialist", self.base_key, persona, self.preset.specialist,
                         _text_hash(self.text(persona, "train")))

        def build(checkpoint):
            model, meta = self._train_from(self.base_state(), [self.ids(persona, "train")],
                                           self.preset.specialist, f"specialist {persona}", checkpoint)
            return model.state_dict(), meta
        return self._cached(f"specialist:{persona}", "specialist", key, build)

    def adapter_state(self, user: str) -> dict[str, torch.Tensor]:
        """The norm-only adapter of ``user``, trained from the base on the user's own text."""
        if user not in self.known_users:
            raise KeyError(f"{user!r} is not a known user (unknown users have no adapter)")
        key = config_key("adapter", self.base_key, user, self.preset.adapter, _text_hash(self.text(user, "train")))

        def build(checkpoint):
            base = self.new_model(self.base_state())
            model, meta = self._train_from(base.state_dict(), [self.ids(user, "train")], self.preset.adapter,
                                           f"adapter {user}", checkpoint, params=adapter_param_names(base))
            return adapter_state(model), meta
        return self._cached(f"adapter:{user}", "adapter", key, build)

    def base(self) -> FractalMoE:
        """A fresh copy of the base model."""
        return self.new_model(self.base_state())

    def specialist(self, persona: str) -> FractalMoE:
        """A fresh copy of ``persona``'s specialist."""
        return self.new_model(self.specialist_state(persona))

    def with_adapter(self, user: str) -> FractalMoE:
        """A fresh copy of the base with ``user``'s adapter applied."""
        return apply_adapter(self.base(), self.adapter_state(user))

    def build_all(self) -> None:
        """Train or load every part: base, every specialist, every known user's adapter."""
        self.base_state()
        for p in self.personas:
            self.specialist_state(p)
        for u in self.known_users:
            self.adapter_state(u)

    # ---- evaluation -------------------------------------------------------------------------
    def score(self, model: FractalMoE, name: str) -> dict:
        """ppl, bpc and the source's bpc floor of ``model`` on the held-out text of ``name``; on real
        text (no known floor), ``zlib_bpc``: zlib -9 on exactly the characters the model's bpc covers."""
        ids = self.ids(name, "eval")
        lp = token_logps(model, ids)
        text = self.text(name, "eval")
        scored = text[len(self.tokenizer.decode([int(ids[0])])):]  # the first token is never predicted
        floor = self.floor_bpc(name)
        out = {"ppl": round(perplexity(lp), 4), "bpc": round(bits_per_char(lp, len(scored)), 4),
               "bpc_floor": None if floor is None else round(floor, 4)}
        if floor is None:
            out["zlib_bpc"] = round(corpora.zlib_bpc(scored), 4)
        return out

    def evaluate_all(self) -> dict:
        """Held-out quality of every model on the texts that matter for it (metrics.json's body).

        base on every persona and user; each specialist on every persona; each known user's
        adapter on its own text (the base's figure on the same text sits under "base").
        """
        out: dict[str, dict] = {"base": {}}
        base = self.base()
        texts = [*self.personas, corpora.REFERENCE, self.held_out, *self.known_users, *self.unknown_users]
        for name in texts:
            out["base"][name] = self.score(base, name)
        for p in self.personas:
            spec = self.specialist(p)
            out[f"specialist:{p}"] = {q: self.score(spec, q) for q in (*self.personas, self.held_out)}
        for u in self.known_users:
            out[f"adapter:{u}"] = {u: self.score(self.with_adapter(u), u)}
        return out

    # ---- expert reliance --------------------------------------------------------------------
    def reliance(self) -> dict:
        """The base's expert reliance on the held-out text of every pretraining source
        (`model.reliance.expert_reliance`), computed once per base and cached beside it as JSON."""
        path = cache.entry_path("reliance", config_key("reliance", self.base_key, DROP_ONE_TOKENS, *self.pretrain),
                                ".json")
        if path.exists() and self.use_cache:
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        result = expert_reliance(self.base().to(self.device), {n: self.ids(n, "eval") for n in self.pretrain})
        cache.save_json(path, result)
        self.timings["reliance"] = {"seconds": round(time.perf_counter() - t0, 2), "cached": False}
        return result
