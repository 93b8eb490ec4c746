"""The synthetic personas' grammars and vocabularies: what each persona's word chain is built from.

Data, not sampling: `model.corpora` turns a `PersonaSpec` and a seed into a chain.
This module imports nothing else of ours outside ``model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .text_sources import CorpusError


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
           **knobs: Any) -> PersonaSpec:
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

