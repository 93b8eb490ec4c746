"""From verified bundles to a servable FractalMoE, sharing frozen weights between virtual nodes.

A node's model is the union of the tensors of the bundles it installed, later bundles overriding
earlier ones name by name (a new full bundle of the same model replaces the old one). Every
non-expert tensor must be present; experts may be partial (issue 5, partial materialisation): the
``present`` mask (L, E) says which experts are installed, and the model serves with
``model.serving(available=mask)``, so a token routed to a missing expert goes to the installed expert
the router scores highest (the "substitute" policy). A missing expert's weights are a shared
zero tensor that the router can never pick.

Sharing (issue 8). Many virtual nodes live in one process. Decoded tensors depend only on a
bundle's bytes, so the :class:`WeightStore` keeps one frozen copy per bundle sha256, and one
:class:`ServedModel` (a FractalMoE whose parameters *are* those tensors, built on the meta device
so nothing is allocated twice) per distinct ordered set of bundles. Virtual nodes that installed
the same bundles share it; what differs per node (its adapters, its expert mask, its counters)
lives in the node and is passed to each forward pass. Forward passes on a ServedModel are
serialised by its lock, because the MoE layers' ``available`` mask and ``last_route`` are module
state.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from model.codecs import CODECS, FINITE_CODECS, CodecError, decode_tensor
from model.config import ConfigError, ModelConfig, get_preset
from model.fractal_moe import FractalMoE, expert_of, is_norm_param
from model.soup_of_experts import SOUP_KIND, SoupError, SoupOfExperts, soup_from_wire
from proto.bundle import Bundle, BundleError, read_bundle_verified

T = TypeVar("T")


class AssemblyError(ValueError):
    """Verified bundles do not make a model: wrong config, unknown tensor, wrong shape, missing parts."""


@dataclass(frozen=True)
class DecodedBundle:
    """A verified bundle, decoded: its identity, its metadata, and frozen float32 tensors.

    A Soup-of-Experts bank (meta ``kind`` "soup-of-experts") decodes into ``bank`` (and the
    per-domain ``unigram`` tables it ships) with no model ``tensors``: it makes no model by itself;
    a node instantiates one from it (``node.runtime.VirtualNode.instantiate_soup``).
    """

    name: str
    sha256: bytes
    size: int
    meta: dict
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    model: str = "base"
    codec: str = ""
    bank: SoupOfExperts | None = None
    unigram: torch.Tensor | None = None  # (D, V) log-probs, with a bank

    @property
    def nbytes(self) -> int:
        """Memory of the decoded tensors (a bank's included)."""
        held = list(self.tensors.values()) + (list(self.bank.parameters()) if self.bank is not None else [])
        held += [self.unigram] if self.unigram is not None else []
        return sum(t.numel() * t.element_size() for t in held)


def config_from_meta(meta: dict) -> ModelConfig:
    """The ModelConfig a bundle's metadata names: ``model_config`` (a dict of ModelConfig fields,
    preferred: it survives custom shapes) or else ``preset`` (a name in model.config.PRESETS)."""
    if not isinstance(meta, dict):
        raise AssemblyError("bundle metadata is not an object")
    d = meta.get("model_config")
    if isinstance(d, dict):
        try:
            # bundles written before ModelConfig.gate existed were trained with the probability gate
            return ModelConfig(**{"gate": "prob", **d})
        except (TypeError, ConfigError) as exc:
            raise AssemblyError(f"bundle model_config is invalid: {exc}") from None
    if isinstance(meta.get("preset"), str):
        try:
            return get_preset(meta["preset"]).model
        except ConfigError as exc:
            raise AssemblyError(f"bundle preset: {exc}") from None
    raise AssemblyError("bundle metadata names no model shape (neither model_config nor preset)")


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of a FractalMoE of ``cfg`` (built on the meta device: no memory)."""
    return dict(_param_shapes(cfg))


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    # Cached: building the module runs its initialisers through torch's Python meta kernels, ~10x
    # the cost of decoding a tiny bundle, and every decode and assembly asks (ModelConfig is frozen).
    with torch.device("meta"):
        m = FractalMoE(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


@functools.lru_cache(maxsize=16)
def _meta_module(cfg: ModelConfig) -> FractalMoE:
    # A FractalMoE on the meta device to copy for every assembly: its initialisers run once per shape
    # (they cost ~0.3 s at small through torch's Python meta kernels; a partial node assembles per expert).
    with torch.device("meta"):
        return FractalMoE(cfg)


def check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], *, bundle: str,
                  finite: frozenset[str] = frozenset()) -> None:
    """AssemblyError unless every tensor is a parameter of ``cfg``'s model with its exact shape and
    finite values (not checked again for the names in ``finite``: their codec guarantees it)."""
    shapes = param_shapes(cfg)
    for name, t in tensors.items():
        if name not in shapes:
            raise AssemblyError(f"bundle {bundle!r}: {name!r} is not a parameter of the model")
        if tuple(t.shape) != shapes[name]:
            raise AssemblyError(f"bundle {bundle!r}: {name} has shape {list(t.shape)}, "
                                f"the model's is {list(shapes[name])}")
        # A sum is finite whenever every value is (NaN and inf propagate): one pass, no (N,) bool
        # mask, which halves a 30m decode. Only a sum that overflows needs the exact check.
        if name in finite:
            continue
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            raise AssemblyError(f"bundle {bundle!r}: {name} holds NaN or infinite values")


def pack_mask(mask: torch.Tensor) -> bytes:
    """Bit-pack a (L, E) bool mask: row-major, bit i is byte i // 8, bit i % 8 (LSB first)."""
    flat = mask.reshape(-1).to(torch.uint8)  # (L*E,)
    pad = (-flat.numel()) % 8
    bits = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)  # (nbytes, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return bytes((bits * weights).sum(dim=1, dtype=torch.uint8).tolist())


def unpack_mask(data: bytes, n_blocks: int, n_experts: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: (n_blocks, n_experts) bool."""
    n = n_blocks * n_experts
    if len(data) != -(-n // 8):
        raise AssemblyError(f"expert mask of {len(data)} bytes, expected {-(-n // 8)} for {n_blocks}x{n_experts}")
    raw = torch.tensor(list(data), dtype=torch.uint8)[:, None]  # (nbytes, 1)
    bits = (raw >> torch.arange(8, dtype=torch.uint8)) & 1  # (nbytes, 8)
    return bits.reshape(-1)[:n].bool().view(n_blocks, n_experts)


@dataclass
class ServedModel:
    """A FractalMoE assembled from an ordered set of bundles, shared by the nodes that hold them."""

    key: tuple[bytes, ...]
    config: ModelConfig
    module: FractalMoE
    present: torch.Tensor  # (L, E) bool: experts whose weights are installed
    sources: dict[str, bytes]  # tensor name -> sha256 of the bundle it came from
    norm_shapes: dict[str, tuple[int, ...]]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, mask: torch.Tensor | None, fn: Callable[[FractalMoE], T]) -> T:
        """``fn(module)`` with the module restricted to ``mask`` ((L, E) bool; None: all experts).

        Blocking; call it from a worker thread. Holds the lock for the whole call, so the mask,
        an adapter substituted by ``functional_call`` and the routes read afterwards all belong to
        this call.
        """
        full = mask is None or bool(mask.all())
        with self.lock, torch.inference_mode(), self.module.serving(available=None if full else mask) as module:
            return fn(module)


class WeightStore:
    """Frozen decoded bundles by sha256 and served models by bundle set, shared in one process.

    Reference-counted: a node ``acquire``s the model of its bundle set when it installs and
    ``release``s it when it moves to another set or stops; the last release frees the weights.
    """

    def __init__(self) -> None:
        self._bundles: dict[bytes, DecodedBundle] = {}
        self._models: dict[tuple[bytes, ...], ServedModel] = {}
        self._refs: dict[tuple[bytes, ...], int] = {}
        self._zeros: dict[tuple[int, ...], torch.Tensor] = {}
        self._decoding: dict[bytes, threading.Lock] = {}
        self._mutex = threading.Lock()

    def bundle(self, sha256: bytes) -> DecodedBundle | None:
        """The decoded bundle with this sha256 if some node of this process holds it."""
        return self._bundles.get(sha256)

    def add_bundle(self, decoded: DecodedBundle) -> DecodedBundle:
        """Keep ``decoded`` (or return the copy already kept for its sha256)."""
        with self._mutex:
            return self._bundles.setdefault(decoded.sha256, decoded)

    def get_or_decode(self, sha256: bytes, decode: Callable[[], DecodedBundle]) -> DecodedBundle:
        """The decoded bundle of ``sha256``, decoding it with ``decode()`` only if no node has yet.

        Blocking (run it in a worker thread). Two nodes installing the same bundle at once decode
        it once: the second waits on the bundle's own lock and then finds it kept. The bytes were
        verified against ``sha256`` by the caller, so equal digests mean equal tensors.
        """
        with self._mutex:
            lock = self._decoding.setdefault(sha256, threading.Lock())
        with lock:
            kept = self._bundles.get(sha256)
            if kept is not None:
                return kept
            decoded = decode()
            if decoded.sha256 != sha256:
                raise AssemblyError(f"bundle {decoded.name!r} decoded under another sha256")
            return self.add_bundle(decoded)

    def _zero(self, shape: tuple[int, ...]) -> torch.Tensor:
        z = self._zeros.get(shape)
        if z is None:
            z = self._zeros[shape] = torch.zeros(shape)
        return z

    def acquire(self, bundles: Iterable[DecodedBundle]) -> ServedModel:
        """The served model of ``bundles`` (in install order), built once and shared.

        AssemblyError if they do not make a model.
        """
        bundles = list(bundles)
        key = tuple(b.sha256 for b in bundles)
        with self._mutex:
            for b in bundles:
                self._bundles.setdefault(b.sha256, b)
            model = self._models.get(key)
            if model is None:
                try:
                    model = self._models[key] = self._assemble(key, bundles)
                except AssemblyError:
                    self._prune_locked()
                    raise
            self._refs[key] = self._refs.get(key, 0) + 1
            return model

    def release(self, model: ServedModel | None) -> None:
        """Drop one reference; free the model and the bundles no remaining model uses."""
        if model is None:
            return
        with self._mutex:
            left = self._refs.get(model.key, 0) - 1
            if left > 0:
                self._refs[model.key] = left
                return
            self._refs.pop(model.key, None)
            self._models.pop(model.key, None)
            self._prune_locked()

    def prune(self) -> None:
        """Free decoded bundles that no served model uses (e.g. after an install that failed)."""
        with self._mutex:
            self._prune_locked()

    def _prune_locked(self) -> None:
        used = {sha for key in self._models for sha in key}
        for sha in [s for s in self._bundles if s not in used]:
            del self._bundles[sha]
            self._decoding.pop(sha, None)

    def stats(self) -> dict:
        """How much is shared: bundles, models and the bytes of decoded weights held."""
        return {
            "bundles": len(self._bundles),
            "models": len(self._models),
            "references": sum(self._refs.values()),
            "weight_bytes": sum(b.nbytes for b in self._bundles.values()),
        }

    def _assemble(self, key: tuple[bytes, ...], bundles: list[DecodedBundle]) -> ServedModel:
        if not bundles:
            raise AssemblyError("no bundle to assemble a model from")
        cfg = bundles[0].config
        for b in bundles[1:]:
            if b.config != cfg:
                raise AssemblyError(f"bundle {b.name!r} is for another model shape than {bundles[0].name!r}")
        shapes = param_shapes(cfg)
        tensors: dict[str, torch.Tensor] = {}
        sources: dict[str, bytes] = {}
        for b in bundles:
            for name, t in b.tensors.items():
                tensors[name] = t
                sources[name] = b.sha256
        missing_core = [n for n in shapes if n not in tensors and expert_of(n) is None]
        if missing_core:
            raise AssemblyError(f"the installed bundles lack {len(missing_core)} non-expert tensors "
                                f"(e.g. {missing_core[0]})")
        # An expert is installed only when every one of its matrices is; a missing one is a shared zero.
        present = torch.ones(cfg.n_layers, cfg.n_experts, dtype=torch.bool)
        full: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            held = tensors.get(name)
            if held is None:
                present[expert_of(name)] = False
            full[name] = self._zero(shape) if held is None else held
        empty = [b for b in range(cfg.n_layers) if not bool(present[b].any())]
        if empty:
            raise AssemblyError(f"block {empty[0]} has no expert installed; a block needs at least one")
        module = copy.deepcopy(_meta_module(cfg))  # ~20x cheaper than running the initialisers again
        module.load_state_dict(full, assign=True, strict=True)
        module.requires_grad_(False)
        module.eval()
        return ServedModel(key=key, config=cfg, module=module, present=present, sources=sources,
                           norm_shapes={k: v for k, v in shapes.items() if is_norm_param(k)})


def used_bundles(bundles: list[DecodedBundle]) -> list[DecodedBundle]:
    """The bundles that still contribute a tensor once later ones override earlier ones by name."""
    last: dict[str, int] = {}
    for i, b in enumerate(bundles):
        for name in b.tensors:
            last[name] = i
    keep = set(last.values())
    return [b for i, b in enumerate(bundles) if i in keep]


def describe(model: ServedModel) -> dict[str, Any]:
    """Shape and materialisation of a served model, JSON-able."""
    return {
        "n_blocks": model.config.n_layers,
        "n_experts": model.config.n_experts,
        "vocab_size": model.config.vocab_size,
        "context": model.config.context,
        "experts_installed": int(model.present.sum()),
    }


def decode_records(bundle: Bundle, *, name: str, sha256: bytes, size: int, model: str = "",
                   codec: str = "") -> DecodedBundle:
    """Decode a verified bundle's tensor records into frozen float32 tensors; AssemblyError on any fault.

    The records' checksums were verified by ``proto.bundle``; ``model.codecs`` decodes each one,
    and the result is checked against the model shape that the bundle's metadata names
    (``meta["model_config"]``), so a bundle for another shape is refused before installing.
    """
    cfg = config_from_meta(bundle.meta)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for r in bundle.records:
            if r.name in tensors:
                raise AssemblyError(f"bundle {name!r}: tensor {r.name!r} appears twice")
            tensors[r.name] = decode_tensor(r).requires_grad_(False)
    except CodecError as exc:
        raise AssemblyError(f"bundle {name!r}: {exc}") from None
    meta = bundle.meta
    model, codec = model or str(meta.get("model", "base")), codec or str(meta.get("codec", ""))
    if meta.get("kind") == SOUP_KIND:
        try:
            bank, unigram = soup_from_wire(cfg, meta, tensors)
        except SoupError as exc:
            raise AssemblyError(f"bundle {name!r}: {exc}") from None
        return DecodedBundle(name=name, sha256=sha256, size=size, meta=dict(meta), config=cfg, tensors={},
                             model=model, codec=codec, bank=bank, unigram=unigram)
    check_tensors(cfg, tensors, bundle=name,
                  finite=frozenset(r.name for r in bundle.records if r.codec in FINITE_CODECS))
    return DecodedBundle(name=name, sha256=sha256, size=size, meta=dict(meta), config=cfg, tensors=tensors,
                         model=model, codec=codec)


def decode_bundle(data: bytes, *, name: str, model: str = "", codec: str = "",
                  sha256: bytes | None = None) -> DecodedBundle:
    """Verify (all or nothing) and decode a whole bundle held in memory; AssemblyError on any fault.

    ``sha256``: the bundle's identity when the caller was given it (a coordinator's ``BundleRef``, a
    store's record), as a node is; otherwise it is computed here, a second pass over every byte
    (verifying needs only the per-tensor digests, which cover every byte once).
    """
    try:
        bundle = read_bundle_verified([data], allowed_codecs=CODECS)
    except BundleError as exc:
        raise AssemblyError(f"bundle {name!r}: {exc}") from None
    return decode_records(bundle, name=name, sha256=sha256 or hashlib.sha256(data).digest(), size=len(data),
                          model=model, codec=codec)
