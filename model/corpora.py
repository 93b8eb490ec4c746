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
* **Real text**: the "stdlib" persona reads the Python standard library's own ``.py`` sources, present
  on every machine; ``folder_sources`` reads ``--corpus DIR`` (one sub-folder per user).

Every random choice takes its seed from an argument; nothing is cached on disk. The eval split of a
synthetic source is drawn from its own random stream, independent of the train split; real sources
split by file (stdlib) or by the tail of the text (user folders).

This module imports nothing else of ours.
"""

from __future__ import annotations

import abc
import bisect
import hashlib
import os
import re
import sysconfig
import zlib
from dataclasses import dataclass, field
from functools import cache, cached_property, lru_cache
from pathlib import Path

import numpy as np

# Bump when a vocabulary, grammar or sampling rule changes: it enters every synthetic fingerprint,
# so caches keyed on a corpus never mix texts from two versions of the generator.
GENERATOR_VERSION = 1

SPLITS = ("train", "eval")
CORPUS_PERSONA = "corpus"  # the persona of every user read by folder_sources
_SPLIT_STREAM = {"train": 1, "eval": 2}
_STRUCTURE_STREAM = 0
_USER_STREAM = 3
_CHUNK = 8192  # uniforms drawn per numpy call while sampling


class CorpusError(ValueError):
    """A corpus cannot be built or read: unknown persona or split, missing, empty or unreadable folder."""


def _stable_hash(text: str) -> int:
    """A 32-bit hash that, unlike ``hash()``, is the same in every process."""
    return zlib.crc32(text.encode("utf-8"))


def _check_split(split: str, n_chars: int) -> None:
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if isinstance(n_chars, bool) or not isinstance(n_chars, int) or n_chars < 0:
        raise CorpusError(f"n_chars must be a non-negative integer, got {n_chars!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CorpusError(f"seed must be a non-negative integer, got {seed!r}")


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


# ----------------------------------------------------------------------------------------------------
# Persona grammars and vocabularies
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mark:
    """A non-word token (punctuation, operator, line break) and how it joins its neighbours."""

    text: str
    cls: str
    space_before: bool = True
    space_after: bool = True
    capitalize_next: bool = False


@dataclass(frozen=True, kw_only=True)
class PersonaSpec:
    """What a synthetic persona's chain is built from (before the seed picks its rows)."""

    name: str
    words: dict[str, str]  # word class -> whitespace-separated words
    marks: tuple[Mark, ...]
    grammar: dict[str, dict[str, float]]  # class -> {next class: weight}
    capitalize: bool  # capital letter at the start of the text and after a sentence end
    successors: int = 24  # distinct favoured successors per next class in a word's row
    concentration: float = 3.0  # Dirichlet concentration per successor (lower: peakier rows, lower floor)
    eps: float = 0.08  # mass spread over every word of the allowed classes: makes the chain irreducible
    zipf: float = 0.7  # exponent of the words' popularity 1/rank**zipf within a class

    def __post_init__(self) -> None:
        classes = set(self.words) | {m.cls for m in self.marks}
        for cls in classes:
            if not self.grammar.get(cls):
                raise CorpusError(f"persona {self.name!r}: class {cls!r} has no successors in the grammar")
        for cls, nxt in self.grammar.items():
            unknown = set(nxt) - classes
            if cls in classes and unknown:
                raise CorpusError(f"persona {self.name!r}: class {cls!r} leads to unknown classes {sorted(unknown)}")
        if not (self.successors >= 1 and self.concentration > 0 and 0 < self.eps < 1):
            raise CorpusError(f"persona {self.name!r}: bad successors/concentration/eps")


_PROSE_MARKS = (
    Mark(".", ".", space_before=False, capitalize_next=True),
    Mark(",", ",", space_before=False),
    Mark("\n", "\n", space_before=False, space_after=False, capitalize_next=True),
)

_PROSE_FUNCTION_WORDS = {
    "DET": "the a this every some no another each his her their its our",
    "PREP": "of in on with from into under over after before through across at by for to near without about",
    "CONJ": "and but while because although when as so until",
    "PRON": "she he they we it you",
}

_PROSE_GRAMMAR = {
    "DET": {"ADJ": 0.3, "NOUN": 0.7},
    "ADJ": {"NOUN": 0.9, "ADJ": 0.1},
    "NOUN": {"VERB": 0.3, "PREP": 0.25, ",": 0.12, ".": 0.2, "CONJ": 0.08, "NOUN": 0.05},
    "NAME": {"VERB": 0.6, ",": 0.15, ".": 0.1, "CONJ": 0.05, "PREP": 0.1},
    "PRON": {"VERB": 0.8, "ADV": 0.2},
    "VERB": {"DET": 0.35, "PREP": 0.2, "ADV": 0.12, "PRON": 0.08, ".": 0.15, ",": 0.05, "NAME": 0.05},
    "ADV": {"VERB": 0.25, ".": 0.25, "PREP": 0.2, ",": 0.1, "DET": 0.2},
    "PREP": {"DET": 0.7, "NOUN": 0.15, "NAME": 0.1, "PRON": 0.05},
    "CONJ": {"DET": 0.35, "PRON": 0.35, "NAME": 0.15, "ADV": 0.1, "ADJ": 0.05},
    ",": {"CONJ": 0.45, "DET": 0.2, "PRON": 0.15, "PREP": 0.1, "ADV": 0.1},
    ".": {"DET": 0.35, "PRON": 0.3, "NAME": 0.1, "PREP": 0.1, "ADV": 0.05, "\n": 0.1},
    "\n": {"DET": 0.4, "PRON": 0.35, "NAME": 0.15, "PREP": 0.1},
}


def _prose(name: str, words: dict[str, str], grammar: dict[str, dict[str, float]] | None = None,
           **knobs: float) -> PersonaSpec:
    """A prose persona: shared function words and grammar, plus its own words (and grammar tweaks)."""
    merged = dict(_PROSE_FUNCTION_WORDS)
    for cls, extra in words.items():
        merged[cls] = f"{merged.get(cls, '')} {extra}".strip()
    rules = {cls: dict(nxt) for cls, nxt in _PROSE_GRAMMAR.items()}
    rules.update(grammar or {})
    present = set(merged) | {m.cls for m in _PROSE_MARKS}
    # A persona without a class (the scientist names nobody) simply never steps into it.
    rules = {cls: {d: w for d, w in nxt.items() if d in present} for cls, nxt in rules.items() if cls in present}
    return PersonaSpec(name=name, words=merged, marks=_PROSE_MARKS, grammar=rules, capitalize=True, **knobs)


_CODE_MARKS = (
    Mark("(", "(", space_before=False, space_after=False),
    Mark(")", ")", space_before=False),
    Mark("[", "[", space_before=False, space_after=False),
    Mark("]", "]", space_before=False),
    Mark(":", ":", space_before=False),
    Mark(",", ",", space_before=False),
    Mark(".", ".", space_before=False, space_after=False),
    Mark("\n", "NL", space_before=False, space_after=False),
    Mark("\n    ", "NL", space_before=False, space_after=False),
    Mark("\n        ", "NL", space_before=False, space_after=False),
    Mark("=", "="),
    *(Mark(op, "OP") for op in "+-*<>%"),
)

PERSONA_SPECS: dict[str, PersonaSpec] = {
    "programmer": PersonaSpec(
        name="programmer",
        words={
            "KW": "return if for while def import yield assert raise elif with class del from",
            "NAME": "x y i j n data result items count value key node buf path config self size index line "
                    "user cache args kwargs text name total row offset token parts entry record queue buffer "
                    "state response request payload header status url port host db conn session client server "
                    "msg err exc obj cls fn callback handler chunk lines rows batch ctx env opts limit timeout",
            "FUNC": "len range print open sorted append get split join parse load encode decode read write "
                    "update format int str isinstance enumerate zip min max sum strip keys pop add extend "
                    "lower startswith replace dumps loads sleep connect send recv close flush render validate "
                    "compile match search sub copy deepcopy insert remove sort reverse hexdigest setdefault",
            "VAL": "None True False 0 1 2 10 100",
            "OPW": "in and or is not",
        },
        marks=_CODE_MARKS,
        grammar={
            "NL": {"KW": 0.48, "NAME": 0.48, "NL": 0.04},
            "KW": {"NAME": 0.55, "FUNC": 0.2, "VAL": 0.15, "OPW": 0.05, "NL": 0.05},
            "NAME": {"=": 0.18, "OP": 0.08, ".": 0.2, ")": 0.1, ",": 0.1, ":": 0.07, "[": 0.07, "OPW": 0.08,
                     "NL": 0.12},
            "=": {"NAME": 0.4, "FUNC": 0.35, "VAL": 0.25},
            "FUNC": {"(": 1.0},
            "VAL": {"NL": 0.35, ")": 0.25, ",": 0.15, ":": 0.1, "OP": 0.1, "]": 0.05},
            "OP": {"NAME": 0.55, "FUNC": 0.25, "VAL": 0.2},
            "OPW": {"NAME": 0.6, "VAL": 0.2, "FUNC": 0.2},
            ".": {"FUNC": 0.7, "NAME": 0.3},
            "(": {"NAME": 0.55, "VAL": 0.25, ")": 0.15, "FUNC": 0.05},
            ")": {"NL": 0.4, ")": 0.1, ":": 0.15, ".": 0.1, ",": 0.1, "OP": 0.1, "]": 0.05},
            ",": {"NAME": 0.6, "VAL": 0.3, "FUNC": 0.1},
            ":": {"NL": 1.0},
            "[": {"NAME": 0.6, "VAL": 0.4},
            "]": {"NL": 0.3, "=": 0.1, "OP": 0.1, ".": 0.15, ")": 0.1, ",": 0.1, ":": 0.05, "[": 0.1},
        },
        capitalize=False,
    ),
    "novelist": _prose("novelist", {
        "NOUN": "house window door garden river road night morning evening light shadow rain wind letter "
                "voice face hand hands eyes heart room kitchen stairs hallway field forest village town sea "
                "shore boat bridge memory silence dream dress coat hat candle fire table chair bed mirror "
                "photograph sister brother mother father child stranger horse dog winter summer autumn wall floor "
                "roof ceiling street station train platform ticket map island harbour lamp clock bell key book page "
                "song name story secret promise cup glass bread knife ring necklace",
        "VERB": "walked turned looked smiled whispered remembered waited opened closed carried watched "
                "listened followed wondered laughed cried slept woke knew felt heard saw held left stood sat "
                "ran fell gave took found kept returned crossed climbed touched answered asked pulled pushed "
                "dropped lifted breathed trembled forgot noticed imagined hoped",
        "ADJ": "old quiet dark cold warm small narrow empty pale soft bright heavy tired distant strange "
               "gentle broken silent wet lonely golden grey faint sudden familiar bitter tender hollow ancient "
               "crooked frozen restless",
        "ADV": "slowly softly quietly again suddenly still almost never always once gently already perhaps "
               "carefully finally barely",
        "NAME": "Anna Thomas Margaret Elias Clara Jonah Helen Samuel",
    }),
    "scientist": _prose("scientist", {
        "NOUN": "data sample samples model experiment results analysis method measurement measurements "
                "temperature pressure energy signal noise error variance distribution hypothesis theory "
                "evidence effect parameter parameters cell cells protein gene genes rate concentration "
                "surface particle particles field spectrum frequency equation solution system structure "
                "network study observation observations value values figure function mass density sensor detector "
                "instrument laboratory protocol threshold gradient coefficient interval trial trials population "
                "species membrane molecule molecules reaction catalyst enzyme climate ocean atmosphere carbon "
                "oxygen uncertainty correlation regression simulation simulations dataset bias dose response layer",
        "VERB": "shows suggests indicates measures increases decreases depends remains yields predicts "
                "reveals confirms explains describes requires reduces produces exceeds follows determines "
                "estimate observe measure compare assume find report correlates varies decays converges differs "
                "matches supports contradicts accounts emerges limits",
        "ADJ": "significant relative linear thermal stable observed expected statistical experimental "
               "theoretical consistent higher lower large small initial final mean average independent "
               "complex previous robust negative positive spatial temporal molecular empirical quantitative "
               "dominant negligible",
        "ADV": "significantly approximately directly consistently further however therefore rapidly "
               "slightly strongly notably typically substantially",
        "CONJ": "that whereas since",
    }, grammar={
        "NOUN": {"VERB": 0.25, "PREP": 0.35, ",": 0.1, ".": 0.18, "CONJ": 0.07, "NOUN": 0.05},
        "VERB": {"DET": 0.3, "PREP": 0.15, "ADV": 0.1, "CONJ": 0.2, ".": 0.15, ",": 0.05, "ADJ": 0.05},
    }),
    "journalist": _prose("journalist", {
        "NOUN": "government minister council police officials report election vote city residents company "
                "workers percent million year week statement spokesman court judge case investigation mayor "
                "budget tax plan protest crowd hospital school street market prices economy official "
                "families students leaders party campaign agreement deal crisis border ministry parliament senator "
                "governor voters ballot strike union wages jobs inflation bank banks shares investors lawmakers bill "
                "law reform refugees aid troops ceasefire talks summit storm flood damage victims witnesses suspect "
                "charges",
        "VERB": "said announced reported confirmed denied warned told added claimed voted rejected approved "
                "arrested opened closed raised cut promised expected called released faced agreed launched resigned "
                "demanded urged insisted estimated suspended ordered condemned pledged signed",
        "ADJ": "local national public former federal new senior annual recent political economic major "
               "private foreign early late second third key interim regional urban rural controversial "
               "widespread emergency",
        "ADV": "yesterday today recently also officially publicly nearly later reportedly immediately sharply",
        "NAME": "Smith Johnson Garcia Brown Lee Martin Patel Davis",
        "CONJ": "that",
    }),
    # The held-out "unknown user": recipes, imperative sentences. Never trained on.
    "chef": _prose("chef", {
        "NOUN": "butter flour sugar salt pepper garlic onion onions oil water sauce pan pot oven dough "
                "cream milk eggs egg lemon juice minutes bowl spoon knife mixture stock rice pasta tomatoes "
                "herbs cheese bread chicken fish meat vegetables thyme skillet dish plate crust basil parsley cumin "
                "paprika cinnamon vanilla honey vinegar mustard yeast batter broth soup salad potatoes carrots "
                "mushrooms beans lentils shallots ginger chili lime olives almonds walnuts chocolate cake tart tray "
                "rack lid saucepan colander board",
        "VERB": "stir add chop whisk bake simmer season pour fold slice roast mix serve drain boil fry melt "
                "sprinkle cover remove taste cook heat knead grate rest toss reduce beat brush caramelize crush dice "
                "glaze marinate peel puree rinse scatter sear shred soak strain trim",
        "ADJ": "fresh hot golden crisp tender smooth thick fine warm sweet sour fragrant chopped melted soft "
               "creamy light large medium small ripe crumbly juicy lukewarm salty spicy buttery bitter dry",
        "ADV": "gently slowly thoroughly evenly lightly quickly constantly briefly occasionally well finely "
               "roughly generously carefully",
    }, grammar={
        ".": {"VERB": 0.45, "DET": 0.15, "PRON": 0.1, "ADV": 0.1, "PREP": 0.1, "\n": 0.1},
        "\n": {"VERB": 0.6, "DET": 0.2, "PREP": 0.1, "ADV": 0.1},
        "VERB": {"DET": 0.5, "PREP": 0.15, "ADV": 0.1, "PRON": 0.1, ".": 0.1, ",": 0.05},
    }),
}

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
        [seed, _stable_hash(persona), _STRUCTURE_STREAM, GENERATOR_VERSION])))
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
        [seed, _stable_hash(persona), _USER_STREAM, index, GENERATOR_VERSION])))
    P = base.transitions * rng.gamma(_USER_NOISE_SHAPE, 1.0 / _USER_NOISE_SHAPE, size=base.transitions.shape)
    words = np.array([i for i, t in enumerate(vocab.texts) if _WORD_RE.fullmatch(t)])
    n_fav = max(3, round(_USER_FAVOURITE_SHARE * len(words)))
    P[:, rng.choice(words, size=n_fav, replace=False)] *= _USER_FAVOURITE_BOOST
    return WordChain(vocab, P / P.sum(axis=1, keepdims=True))


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class TextSource(abc.ABC):
    """A stream of text for one persona or user, with a train split and an independent eval split."""

    name: str  # "programmer" (a persona), "programmer-0" (a user), or a --corpus sub-folder's name
    persona: str
    floor_bpc: float | None  # exact entropy rate in bits per character; None for real text

    @abc.abstractmethod
    def text(self, split: str, n_chars: int) -> str:
        """Deterministic text of the split ("train" or "eval"): exactly ``n_chars`` characters for a
        synthetic source; at most ``n_chars`` for real text (fewer when the split holds less)."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short stable digest of everything the text depends on, for cache keys."""


@dataclass(frozen=True, kw_only=True)
class SyntheticSource(TextSource):
    """A persona's (or user's) seeded word chain."""

    seed: int
    chain: WordChain = field(repr=False, compare=False)

    def _entropy(self, split: str) -> tuple[int, ...]:
        return (self.seed, _stable_hash(self.name), _SPLIT_STREAM[split], GENERATOR_VERSION)

    def text(self, split: str, n_chars: int) -> str:
        """``n_chars`` characters of the split; train and eval come from independent random streams."""
        _check_split(split, n_chars)
        return self.chain.sample(self._entropy(split), n_chars)[0]

    def true_bpc(self, split: str, n_chars: int) -> float:
        """The source's own log-loss on exactly ``text(split, n_chars)`` (whole tokens), in bits per char.

        ``floor_bpc`` is its expectation; on a finite text it fluctuates around the floor, so this is
        the fair line to draw beside a model's bits per character on the same text.
        """
        _check_split(split, n_chars)
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


def _stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    return root if (root / "os.py").is_file() else Path(os.__file__).parent


_STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, ...]:
    """Relative paths of the standard library's own .py sources (tests and third-party packages excluded)."""
    root = _stdlib_root()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if p.is_file() and not (_STDLIB_SKIP & set(p.relative_to(root).parts)))
    if len(files) < 50:
        raise CorpusError(f"the Python standard library's sources were not found under {root}")
    return tuple(files)


def _is_eval_file(relpath: str) -> bool:
    # A fixed tenth of the files, the same for every seed: eval text is never trained on.
    return hashlib.sha256(relpath.encode()).digest()[0] % 10 == 0


@dataclass(frozen=True, kw_only=True)
class StdlibSource(TextSource):
    """Real Python: the standard library's own sources, whole files concatenated in a seeded order."""

    root: str
    train_files: tuple[str, ...] = field(repr=False)
    eval_files: tuple[str, ...] = field(repr=False)

    def text(self, split: str, n_chars: int) -> str:
        """Whole files of the split in a fixed order until ``n_chars`` (files that fail to decode are skipped)."""
        _check_split(split, n_chars)
        parts, total = [], 0
        for rel in self.train_files if split == "train" else self.eval_files:
            if total >= n_chars:
                break
            try:
                body = (Path(self.root) / rel).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            parts.append(body if body.endswith("\n") else body + "\n")
            total += len(parts[-1])
        return "".join(parts)[:n_chars]

    @property
    def fingerprint(self) -> str:
        listing = "\n".join(self.train_files + ("--",) + self.eval_files)
        return hashlib.sha256(f"stdlib:{self.root}:{listing}".encode()).hexdigest()[:16]


def _stdlib_source(name: str, files: list[str], seed: int) -> StdlibSource:
    order = sorted(files, key=lambda rel: hashlib.sha256(f"{seed}:{rel}".encode()).digest())
    train = [f for f in order if not _is_eval_file(f)]
    evals = [f for f in order if _is_eval_file(f)]
    if not evals and len(train) > 1:
        evals = [train.pop()]  # a user with few files still gets an eval split
    if not train or not evals:
        raise CorpusError(f"stdlib user {name!r} has too few files to split into train and eval")
    return StdlibSource(name=name, persona="stdlib", floor_bpc=None, root=str(_stdlib_root()),
                        train_files=tuple(train), eval_files=tuple(evals))


def _check_persona(persona: str) -> None:
    if persona not in ALL_PERSONAS:
        raise CorpusError(f"unknown persona {persona!r}; choose one of {', '.join(ALL_PERSONAS)}")


def persona_source(persona: str, seed: int) -> TextSource:
    """The text source of a built-in persona; ``seed`` fixes a synthetic chain and both its splits."""
    _check_persona(persona)
    _check_seed(seed)
    if persona == "stdlib":
        return _stdlib_source("stdlib", list(_stdlib_files()), seed)
    chain = _persona_chain(persona, seed)
    return SyntheticSource(name=persona, persona=persona, floor_bpc=chain.floor_bpc, seed=seed, chain=chain)


def user_sources(persona: str, n_users: int, seed: int) -> list[TextSource]:
    """Users "persona-0" ... "persona-{n-1}" of a built-in persona.

    A synthetic user is a seeded perturbation of ``persona_source(persona, seed)``'s chain (user k is
    the same whatever ``n_users`` is), with its own exact floor. A stdlib user holds the top-level
    modules and packages that a seeded hash assigns to it, so it depends on ``n_users``.
    """
    _check_persona(persona)
    _check_seed(seed)
    if isinstance(n_users, bool) or not isinstance(n_users, int) or n_users < 0:
        raise CorpusError(f"n_users must be a non-negative integer, got {n_users!r}")
    if persona == "stdlib":
        buckets: list[list[str]] = [[] for _ in range(n_users)]
        for rel in _stdlib_files():
            top = rel.split("/")[0].removesuffix(".py")
            buckets[_stable_hash(f"{seed}:{top}") % n_users].append(rel)
        return [_stdlib_source(f"stdlib-{k}", files, seed) for k, files in enumerate(buckets)]
    sources: list[TextSource] = []
    for k in range(n_users):
        chain = _user_chain(persona, seed, k)
        sources.append(SyntheticSource(name=f"{persona}-{k}", persona=persona, floor_bpc=chain.floor_bpc,
                                       seed=seed, chain=chain))
    return sources


# ----------------------------------------------------------------------------------------------------
# --corpus DIR: one sub-folder per user
# ----------------------------------------------------------------------------------------------------

EVAL_FRACTION = 0.1  # the tail of each user's text held out for evaluation


@dataclass(frozen=True, kw_only=True)
class FolderSource(TextSource):
    """A user's own text from a sub-folder of ``--corpus DIR``: the last tenth is the eval split."""

    path: str
    train_text: str = field(repr=False)
    eval_text: str = field(repr=False)

    def text(self, split: str, n_chars: int) -> str:
        """The first ``n_chars`` characters of the split (all of it when the split is shorter)."""
        _check_split(split, n_chars)
        return (self.train_text if split == "train" else self.eval_text)[:n_chars]

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"folder:{self.name}\0".encode())
        digest.update(self.train_text.encode())
        digest.update(b"\0")
        digest.update(self.eval_text.encode())
        return digest.hexdigest()[:16]


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_user_folder(folder: Path) -> FolderSource:
    try:
        files = sorted(p for p in folder.rglob("*") if not _hidden(p, folder) and not p.is_dir())
    except OSError as e:
        raise CorpusError(f"cannot read user folder {folder}: {e.strerror or e}") from None
    if not files:
        raise CorpusError(f"user folder {folder} is empty: put the user's text files in it")
    texts = []
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise CorpusError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            body = raw.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
        if body.strip():
            texts.append(body if body.endswith("\n") else body + "\n")
    if not texts:
        raise CorpusError(f"user folder {folder} holds no text: its {len(files)} file(s) are empty")
    whole = "".join(texts)
    cut = int(len(whole) * (1 - EVAL_FRACTION))
    line_start = whole.find("\n", cut) + 1  # keep the eval split to whole lines where possible
    if 0 < line_start < len(whole):
        cut = line_start
    if not whole[:cut].strip() or not whole[cut:].strip():
        raise CorpusError(f"user folder {folder} holds too little text to split into train and eval "
                          f"({len(whole)} characters)")
    return FolderSource(name=folder.name, persona=CORPUS_PERSONA, floor_bpc=None, path=str(folder),
                        train_text=whole[:cut], eval_text=whole[cut:])


def folder_sources(root: str | Path) -> list[TextSource]:
    """One source per sub-folder of ``root`` (``--corpus DIR``), in name order; files at the top are ignored.

    Every file under a user's sub-folder (hidden ones excepted) is read as UTF-8 text, in path order;
    the last tenth of the concatenation, cut at a line start, is the eval split. CorpusError names the
    folder or file for a missing or unreadable folder, no sub-folders, an empty folder or non-UTF-8 text.
    """
    root = Path(root)
    if not root.exists():
        raise CorpusError(f"corpus folder {root} does not exist")
    if not root.is_dir():
        raise CorpusError(f"corpus path {root} is not a folder")
    try:
        users = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise CorpusError(f"cannot read corpus folder {root}: {e.strerror or e}") from None
    if not users:
        raise CorpusError(f"corpus folder {root} has no user sub-folders: expected {root}/<user>/<files>")
    return [_read_user_folder(folder) for folder in users]
