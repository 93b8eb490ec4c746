"""Text sources: seeded synthetic personas with an exact entropy floor, real text, and user folders.

Nothing can be downloaded, so the federation's text comes from three places:

* **Synthetic personas** (programmer, novelist, scientist, journalist, and the held-out "chef"): each is
  a seeded word-level Markov chain over a persona's vocabulary (shared function words plus hand-written
  persona words), shaped by a small part-of-speech grammar so that the text reads like the persona.
  A word's row is sparse (a handful of Dirichlet-weighted successors per next word class) plus a small
  ``eps`` mass spread over every word of the allowed classes, which makes the chain irreducible; the
  builder also checks that it is aperiodic. Every token is rendered by a fixed rule (a space between
  two tokens iff the left one wants a space after and the right one before; capitals after a sentence
  end), so the text decodes uniquely back into tokens and the chain's entropy rate per character,

      H = sum_i pi_i H(P_i.) / sum_i pi_i sum_j P_ij len(e_ij)    (bits per character),

  is a floor on bits per character that no model can beat (``entropy_rate_bpc``).
* **Users** of a synthetic persona are seeded perturbations of its chain (multiplicative Gamma noise on
  every transition and a user-specific set of favourite words), each with its own exact floor;
  ``kl_rate_bpc`` gives how far a user is from its persona in bits per character.
* **Real text** (`model.real_text`): the "stdlib" persona reads the Python standard library's own
  ``.py`` sources, present on every machine; the "reference" source is real English prose (the
  reference documentation and docstrings that ship with Python); ``folder_sources`` reads
  ``--corpus DIR`` (one sub-folder per user). The grammars and vocabularies are in `model.personas`.

Every random choice takes its seed from an argument; nothing is cached on disk. The eval split of a
synthetic source is drawn from its own random stream, independent of the train split; real sources
split by file (stdlib) or by the tail of the text (user folders).

This module imports nothing else of ours.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np

from .personas import PERSONA_SPECS, Mark, PersonaSpec
from .real_text import (
    CORPUS_PERSONA,
    EVAL_FRACTION,
    REFERENCE,
    FolderSource,
    ReferenceSource,
    StdlibSource,
    folder_sources,
    reference_source,
    stdlib_files,
    stdlib_source,
)
from .text_sources import SPLITS, CorpusError, TextSource, check_seed, check_split, stable_hash, zlib_bpc

__all__ = [  # the names the rest of the project reads from here (some defined in the modules above)
    "ALL_PERSONAS", "CORPUS_PERSONA", "EVAL_FRACTION", "HELD_OUT_PERSONA", "REAL_PERSONAS", "REFERENCE", "SPLITS",
    "SYNTHETIC_PERSONAS", "TRAIN_PERSONAS", "CorpusError", "FolderSource", "Mark", "PersonaSpec", "ReferenceSource",
    "StdlibSource", "SyntheticSource", "TextSource", "WordChain", "entropy_rate_bpc", "folder_sources",
    "kl_rate_bpc", "persona_source", "reference_source", "stationary_distribution", "user_sources", "zlib_bpc",
]

GENERATOR_VERSION = 1

_SPLIT_STREAM = {"train": 1, "eval": 2}
_STRUCTURE_STREAM = 0
_USER_STREAM = 3
_CHUNK = 8192  # uniforms drawn per numpy call while sampling

# ----------------------------------------------------------------------------------------------------
# Markov-chain math
# ----------------------------------------------------------------------------------------------------

def _check_transitions(transitions: np.ndarray) -> np.ndarray:
    P = np.asarray(transitions, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] == 0:
        raise CorpusError(f"transition matrix must be square and non-empty, got shape {P.shape}")
    if not np.all(np.isfinite(P)) or np.any(P < 0):
        raise CorpusError("transition matrix must hold finite non-negative probabilities")
    if not np.allclose(P.sum(axis=1), 1.0, atol=1e-9):
        raise CorpusError("every row of the transition matrix must sum to 1")
    return P


def _reachable(adjacency: np.ndarray, start: int) -> np.ndarray:
    """Boolean mask of the states reachable from ``start`` along edges of ``adjacency`` (V, V)."""
    seen = np.zeros(adjacency.shape[0], dtype=bool)
    seen[start] = True
    frontier = seen.copy()
    while frontier.any():
        frontier = adjacency[frontier].any(axis=0) & ~seen
        seen |= frontier
    return seen


def chain_period(transitions: np.ndarray) -> int:
    """The period of an irreducible chain (1 = aperiodic); CorpusError if it is not irreducible."""
    A = _check_transitions(transitions) > 0
    if not (_reachable(A, 0).all() and _reachable(A.T, 0).all()):
        raise CorpusError("the Markov chain is not irreducible: some state cannot reach another")
    # Breadth-first levels from state 0; the period is the gcd of level[u] + 1 - level[v] over edges.
    level = np.full(A.shape[0], -1)
    level[0] = 0
    frontier, depth = np.zeros(A.shape[0], dtype=bool), 0
    frontier[0] = True
    while frontier.any():
        depth += 1
        frontier = A[frontier].any(axis=0) & (level < 0)
        level[frontier] = depth
    u, v = np.nonzero(A)
    return int(np.gcd.reduce(np.abs(level[u] + 1 - level[v])))


def stationary_distribution(transitions: np.ndarray) -> np.ndarray:
    """The unique stationary distribution pi (pi P = pi) of an irreducible chain, shape (V,)."""
    P = _check_transitions(transitions)
    chain_period(P)  # raises unless irreducible: otherwise pi is not unique
    V = P.shape[0]
    # Power iteration on the lazy chain (P + I) / 2 (same pi, never periodic) first: our chains mix
    # in a few dozen steps, and a LAPACK solve of even a 200-state system can cost a hundred times
    # more on a busy machine, where its thread pool competes for the cores.
    lazy = 0.5 * (P + np.eye(V))
    pi = np.full(V, 1.0 / V)
    for _ in range(2000):
        nxt = pi @ lazy
        if np.abs(nxt - pi).sum() < 1e-13:  # a step changes nothing beyond rounding
            return nxt / nxt.sum()
        pi = nxt
    A = P.T - np.eye(V)  # slow mixing: solve the balance equations exactly
    A[-1, :] = 1.0  # replace one (redundant) balance equation by sum(pi) = 1
    b = np.zeros(V)
    b[-1] = 1.0
    pi = np.clip(np.linalg.solve(A, b), 0.0, None)
    return pi / pi.sum()


def _lengths_matrix(lengths: np.ndarray, V: int) -> np.ndarray:
    L = np.asarray(lengths, dtype=np.float64)
    if L.shape == (V,):
        L = np.broadcast_to(L[None, :], (V, V))  # the length of a token does not depend on its left neighbour
    if L.shape != (V, V):
        raise CorpusError(f"emission lengths must have shape ({V},) or ({V}, {V}), got {L.shape}")
    if np.any(L < 1):
        raise CorpusError("every emission must be at least one character long")
    return L


def _row_entropy_bits(P: np.ndarray) -> np.ndarray:
    logs = np.log2(P, out=np.zeros_like(P), where=P > 0)  # 0 log 0 = 0
    return -(P * logs).sum(axis=1)  # (V,)


def entropy_rate_bpc(transitions: np.ndarray, lengths: np.ndarray) -> float:
    """Exact entropy rate, in bits per character, of the text a stationary word chain emits.

    ``transitions`` is the (V, V) row-stochastic matrix; ``lengths`` gives the characters written
    when the chain steps to token j: shape (V,) (``len(e_j)``) or (V, V) (``len(e_ij)``, when a
    separator depends on the left neighbour). Valid when the text decodes uniquely into tokens,
    which every chain of this module guarantees: H = sum_i pi_i H(P_i.) / sum_ij pi_i P_ij L_ij.
    """
    P = _check_transitions(transitions)
    return _entropy_rate(P, _lengths_matrix(lengths, P.shape[0]), stationary_distribution(P))


def _entropy_rate(P: np.ndarray, L: np.ndarray, pi: np.ndarray) -> float:
    bits_per_token = pi @ _row_entropy_bits(P)
    chars_per_token = pi @ (P * L).sum(axis=1)
    return float(bits_per_token / chars_per_token)


def kl_rate_bpc(p: np.ndarray, q: np.ndarray, lengths: np.ndarray) -> float:
    """KL divergence rate of chain ``q`` from chain ``p`` (same tokens), in bits per character.

    This is exactly the excess bits per character that a perfect model of ``q`` pays on text from
    ``p``: sum_i pi_i KL(P_i. || Q_i.) / sum_ij pi_i P_ij L_ij. Infinite if q forbids a step p takes.
    """
    P, Q = _check_transitions(p), _check_transitions(q)
    if P.shape != Q.shape:
        raise CorpusError(f"chains over different token sets: {P.shape} vs {Q.shape}")
    L = _lengths_matrix(lengths, P.shape[0])
    if np.any((P > 0) & (Q == 0)):
        return float("inf")
    pi = stationary_distribution(P)
    ratio = np.log2(P / np.where(Q > 0, Q, 1.0), out=np.zeros_like(P), where=P > 0)
    return float(pi @ (P * ratio).sum(axis=1) / (pi @ (P * L).sum(axis=1)))


SYNTHETIC_PERSONAS: tuple[str, ...] = ("programmer", "novelist", "scientist", "journalist")
REAL_PERSONAS: tuple[str, ...] = ("stdlib",)
HELD_OUT_PERSONA: str = "chef"
TRAIN_PERSONAS: tuple[str, ...] = SYNTHETIC_PERSONAS + REAL_PERSONAS
ALL_PERSONAS: tuple[str, ...] = TRAIN_PERSONAS + (HELD_OUT_PERSONA,)

_WORD_RE = re.compile(r"[A-Za-z0-9_]+")
# One alternative per token kind: a line break with its indent, a word, a single punctuation
# character, or the single space that separates two tokens.
_TOKEN_RE = re.compile(r"\n *|[A-Za-z0-9_]+|[^\sA-Za-z0-9_]| ")


class Vocabulary:
    """A persona's tokens, how each pair renders, and the decoder that inverts the rendering."""

    def __init__(self, spec: PersonaSpec) -> None:
        texts: list[str] = [m.text for m in spec.marks]
        classes: list[str] = [m.cls for m in spec.marks]
        before = [m.space_before for m in spec.marks]
        after = [m.space_after for m in spec.marks]
        cap_next = [m.capitalize_next for m in spec.marks]
        for cls, words in spec.words.items():
            for w in words.split():
                texts.append(w)
                classes.append(cls)
                before.append(True)
                after.append(True)
                cap_next.append(False)
        self._check_decodable(spec, texts)
        self.spec = spec
        self.texts = tuple(texts)
        self.classes = tuple(classes)
        self.class_members = {c: np.array([i for i, k in enumerate(classes) if k == c]) for c in dict.fromkeys(classes)}
        V = len(texts)
        cap = [(t[0].upper() + t[1:]) if spec.capitalize else t for t in texts]
        spaced = np.outer(after, before)  # (V, V): a space between i and j
        # emit[i][j]: the characters written when the chain steps from token i to token j
        self.emit = [[(" " if spaced[i, j] else "") + (cap[j] if cap_next[i] else texts[j]) for j in range(V)]
                     for i in range(V)]
        self.first = tuple(cap)  # the text starts as if after a line break: no space, capital letter
        self.lengths = spaced.astype(np.float64) + np.array([len(t) for t in texts], dtype=np.float64)[None, :]
        self._index = {t: i for i, t in enumerate(texts)}
        self._index.update({c: i for i, c in enumerate(cap) if c not in self._index})

    @staticmethod
    def _check_decodable(spec: PersonaSpec, texts: list[str]) -> None:
        # The floor is exact only if the text decodes uniquely: distinct tokens, words made of word
        # characters, marks a single character (or a line break and its indent).
        seen: set[str] = set()
        for t in texts:
            folded = t[0].lower() + t[1:] if spec.capitalize else t
            if folded in seen:
                raise CorpusError(f"persona {spec.name!r}: token {t!r} appears twice")
            seen.add(folded)
            if not (_WORD_RE.fullmatch(t) or re.fullmatch(r"\n *|[^\sA-Za-z0-9_]", t)):
                raise CorpusError(f"persona {spec.name!r}: token {t!r} would not decode uniquely")

    def decode(self, text: str) -> list[int]:
        """The token ids that render as ``text`` (the inverse of sampling); CorpusError if impossible."""
        ids = []
        for piece in _TOKEN_RE.findall(text):
            if piece == " ":
                continue
            if piece not in self._index:
                raise CorpusError(f"{piece!r} is not a token of persona {self.spec.name!r}")
            ids.append(self._index[piece])
        return ids

    def render(self, ids: list[int]) -> str:
        """The text of a token sequence, exactly as the sampler writes it."""
        if not ids:
            return ""
        return self.first[ids[0]] + "".join(self.emit[a][b] for a, b in zip(ids, ids[1:]))


@cache
def _vocabulary(persona: str) -> Vocabulary:
    return Vocabulary(PERSONA_SPECS[persona])


class WordChain:
    """A stationary word-level Markov chain over a vocabulary, with its exact entropy floor."""

    def __init__(self, vocab: Vocabulary, transitions: np.ndarray) -> None:
        P = _check_transitions(transitions)
        if chain_period(P) != 1:
            raise CorpusError(f"persona {vocab.spec.name!r}: the chain is periodic")
        self.vocab = vocab
        self.transitions = P  # (V, V)
        self.stationary = stationary_distribution(P)  # (V,)
        self.floor_bpc = _entropy_rate(P, vocab.lengths, self.stationary)
        cum = np.cumsum(P, axis=1)  # (V, V)
        cum /= cum[:, -1:]
        cum[:, -1] = 1.0  # a uniform in [0, 1) always lands on a token
        self._cum_rows = cum.tolist()  # Python lists: bisect on them beats numpy for one draw at a time
        start = np.cumsum(self.stationary)
        start /= start[-1]
        start[-1] = 1.0
        self._cum_start = start.tolist()

    def sample(self, entropy: tuple[int, ...], n_chars: int) -> tuple[str, list[int]]:
        """``n_chars`` characters of text started in the stationary distribution, and the tokens behind them.

        The random stream is fixed by ``entropy`` and consumed in the same order whatever ``n_chars``
        is, so a shorter text is always a prefix of a longer one.
        """
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))
        prev = bisect.bisect_right(self._cum_start, rng.random())
        tokens = [prev]
        pieces = [self.vocab.first[prev]]
        total = len(pieces[0])
        emit, cum, find = self.vocab.emit, self._cum_rows, bisect.bisect_right
        while total < n_chars:
            for u in rng.random(_CHUNK).tolist():
                cur = find(cum[prev], u)
                piece = emit[prev][cur]
                pieces.append(piece)
                tokens.append(cur)
                total += len(piece)
                prev = cur
                if total >= n_chars:
                    break
        return "".join(pieces)[:n_chars], tokens

    def log_loss_bits(self, tokens: list[int]) -> np.ndarray:
        """-log2 p of each token of a sequence under this chain (the first one under pi), shape (n,)."""
        t = np.asarray(tokens)
        first = -np.log2(self.stationary[t[:1]])
        with np.errstate(divide="ignore"):
            rest = -np.log2(self.transitions[t[:-1], t[1:]])
        return np.concatenate([first, rest])


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf popularity weights 1/rank**exponent for ``n`` words, in a seeded random order."""
    return 1.0 / (1.0 + rng.permutation(n)) ** exponent


@lru_cache(maxsize=64)
def _persona_chain(persona: str, seed: int) -> WordChain:
    vocab = _vocabulary(persona)
    spec = vocab.spec
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, stable_hash(persona), _STRUCTURE_STREAM, GENERATOR_VERSION])))
    V = len(vocab.texts)
    popularity = np.zeros(V)
    for members in vocab.class_members.values():
        popularity[members] = _zipf(len(members), spec.zipf, rng)
    P = np.zeros((V, V))
    for i, cls in enumerate(vocab.classes):
        for nxt, weight in spec.grammar[cls].items():
            members = vocab.class_members[nxt]
            pop = popularity[members] / popularity[members].sum()
            k = min(spec.successors, len(members))
            chosen = rng.choice(len(members), size=k, replace=False, p=pop)
            # Popular words are chosen as successors more often; the weights among the chosen are
            # symmetric Dirichlet, so a row is not dominated by its class's most popular word.
            P[i, members[chosen]] += weight * (1 - spec.eps) * rng.dirichlet(np.full(k, spec.concentration))
            P[i, members] += weight * spec.eps * pop
    return WordChain(vocab, P / P.sum(axis=1, keepdims=True))


# How far a user strays from its persona: Gamma(shape) noise on every transition (coefficient of
# variation 1/sqrt(shape)) and a boost on the probability of stepping into a favourite word.
_USER_NOISE_SHAPE = 3.0
_USER_FAVOURITE_SHARE = 0.1
_USER_FAVOURITE_BOOST = 3.0


@lru_cache(maxsize=64)
def _user_chain(persona: str, seed: int, index: int) -> WordChain:
    base = _persona_chain(persona, seed)
    vocab = base.vocab
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, stable_hash(persona), _USER_STREAM, index, GENERATOR_VERSION])))
    P = base.transitions * rng.gamma(_USER_NOISE_SHAPE, 1.0 / _USER_NOISE_SHAPE, size=base.transitions.shape)
    words = np.array([i for i, t in enumerate(vocab.texts) if _WORD_RE.fullmatch(t)])
    n_fav = max(3, round(_USER_FAVOURITE_SHARE * len(words)))
    P[:, rng.choice(words, size=n_fav, replace=False)] *= _USER_FAVOURITE_BOOST
    return WordChain(vocab, P / P.sum(axis=1, keepdims=True))


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SyntheticSource(TextSource):
    """A persona's (or user's) seeded word chain."""

    seed: int
    chain: WordChain = field(repr=False, compare=False)

    def _entropy(self, split: str) -> tuple[int, ...]:
        return (self.seed, stable_hash(self.name), _SPLIT_STREAM[split], GENERATOR_VERSION)

    def text(self, split: str, n_chars: int) -> str:
        """``n_chars`` characters of the split; train and eval come from independent random streams."""
        check_split(split, n_chars)
        return self.chain.sample(self._entropy(split), n_chars)[0]

    def true_bpc(self, split: str, n_chars: int) -> float:
        """The source's own log-loss on exactly ``text(split, n_chars)`` (whole tokens), in bits per char.

        ``floor_bpc`` is its expectation; on a finite text it fluctuates around the floor, so this is
        the fair line to draw beside a model's bits per character on the same text.
        """
        check_split(split, n_chars)
        _, tokens = self.chain.sample(self._entropy(split), n_chars)
        ends = np.cumsum([len(self.chain.vocab.first[tokens[0]])]
                         + [len(self.chain.vocab.emit[a][b]) for a, b in zip(tokens, tokens[1:])])
        whole = int(np.searchsorted(ends, n_chars, side="right"))  # tokens that end inside the text
        if whole == 0:
            raise CorpusError(f"{n_chars} characters hold no whole token of {self.name!r}")
        return float(self.chain.log_loss_bits(tokens[:whole]).sum() / ends[whole - 1])

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"synthetic:{GENERATOR_VERSION}:{self.name}:{self.seed}".encode()).hexdigest()[:16]


def _check_persona(persona: str) -> None:
    if persona not in ALL_PERSONAS:
        raise CorpusError(f"unknown persona {persona!r}; choose one of {', '.join(ALL_PERSONAS)}")


def persona_source(persona: str, seed: int) -> TextSource:
    """The text source of a built-in persona; ``seed`` fixes a synthetic chain and both its splits."""
    _check_persona(persona)
    check_seed(seed)
    if persona == "stdlib":
        return stdlib_source("stdlib", list(stdlib_files()), seed)
    chain = _persona_chain(persona, seed)
    return SyntheticSource(name=persona, persona=persona, floor_bpc=chain.floor_bpc, seed=seed, chain=chain)


def user_sources(persona: str, n_users: int, seed: int) -> list[TextSource]:
    """Users "persona-0" ... "persona-{n-1}" of a built-in persona.

    A synthetic user is a seeded perturbation of ``persona_source(persona, seed)``'s chain (user k is
    the same whatever ``n_users`` is), with its own exact floor. A stdlib user holds the top-level
    modules and packages that a seeded hash assigns to it, so it depends on ``n_users``.
    """
    _check_persona(persona)
    check_seed(seed)
    if isinstance(n_users, bool) or not isinstance(n_users, int) or n_users < 0:
        raise CorpusError(f"n_users must be a non-negative integer, got {n_users!r}")
    if persona == "stdlib":
        buckets: list[list[str]] = [[] for _ in range(n_users)]
        for rel in stdlib_files():
            top = rel.split("/")[0].removesuffix(".py")
            buckets[stable_hash(f"{seed}:{top}") % n_users].append(rel)
        return [stdlib_source(f"stdlib-{k}", files, seed) for k, files in enumerate(buckets)]
    sources: list[TextSource] = []
    for k in range(n_users):
        chain = _user_chain(persona, seed, k)
        sources.append(SyntheticSource(name=f"{persona}-{k}", persona=persona, floor_bpc=chain.floor_bpc,
                                       seed=seed, chain=chain))
    return sources


