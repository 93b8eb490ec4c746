"""Real text found on every machine, and the users' own folders.

* **stdlib**: the Python standard library's own ``.py`` sources (real code), split by file.
* **reference**: real English prose that ships with every Python install: the language reference
  and library topics of ``pydoc_data.topics`` (the text ``help()`` shows) and the standard library's
  docstrings (module, class and function), one document per topic or per source file. Split by
  document with the same rule as stdlib, so a file whose source is held out has its docstrings held
  out too: no document lies in both splits.
* **folders**: ``--corpus DIR``, one sub-folder per user; the last tenth of a user's text is eval.

This module imports nothing else of ours outside ``model``.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
import warnings
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from .text_sources import CorpusError, TextSource, check_split

CORPUS_PERSONA = "corpus"  # the persona of every user read by folder_sources
REFERENCE = "reference"  # the built-in real-prose source


def stdlib_root() -> Path:
    """Where this Python's standard library sources are."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root if (root / "os.py").is_file() else Path(os.__file__).parent


_STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Relative paths of the standard library's own .py sources (tests and third-party packages excluded)."""
    root = stdlib_root()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if p.is_file() and not (_STDLIB_SKIP & set(p.relative_to(root).parts)))
    if len(files) < 50:
        raise CorpusError(f"the Python standard library's sources were not found under {root}")
    return tuple(files)


def is_eval_doc(relpath: str) -> bool:
    """Whether a document (a source file or a reference topic) is held out: a fixed tenth, by name."""
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
        check_split(split, n_chars)
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


def stdlib_source(name: str, files: list[str], seed: int) -> StdlibSource:
    """A stdlib source over ``files`` (relative paths) in a seeded order, split by :func:`is_eval_doc`."""
    order = sorted(files, key=lambda rel: hashlib.sha256(f"{seed}:{rel}".encode()).digest())
    train = [f for f in order if not is_eval_doc(f)]
    evals = [f for f in order if is_eval_doc(f)]
    if not evals and len(train) > 1:
        evals = [train.pop()]  # a user with few files still gets an eval split
    if not train or not evals:
        raise CorpusError(f"stdlib user {name!r} has too few files to split into train and eval")
    return StdlibSource(name=name, persona="stdlib", floor_bpc=None, root=str(stdlib_root()),
                        train_files=tuple(train), eval_files=tuple(evals))



def _docstrings(path: Path) -> str:
    """The module, class and function docstrings of one source file, blank-line separated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old escape sequences in a few stdlib files
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:  # one-liners such as "Return self." say little
                docs.append(doc)
    return "\n\n".join(docs) + "\n\n" if docs else ""


@lru_cache(maxsize=1)
def reference_topics() -> dict[str, str]:
    """The reference documentation of ``pydoc_data.topics`` (topic -> text), or {} where it is absent."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped Python without pydoc_data: the docstrings remain
        return {}
    return {k: v if v.endswith("\n") else v + "\n" for k, v in sorted(topics.items()) if v.strip()}


@dataclass(frozen=True, kw_only=True)
class ReferenceSource(TextSource):
    """Real prose: reference topics and stdlib docstrings, whole documents in a seeded order."""

    root: str
    train_docs: tuple[str, ...] = field(repr=False)  # "topic:NAME" or "doc:RELPATH"
    eval_docs: tuple[str, ...] = field(repr=False)

    def document(self, doc: str) -> str:
        """The text of one document id."""
        kind, _, name = doc.partition(":")
        if kind == "topic":
            return reference_topics()[name]
        return _docstrings(Path(self.root) / name)

    def text(self, split: str, n_chars: int) -> str:
        """Whole documents of the split in a fixed order until ``n_chars``."""
        check_split(split, n_chars)
        parts, total = [], 0
        for doc in self.train_docs if split == "train" else self.eval_docs:
            if total >= n_chars:
                break
            body = self.document(doc)
            if body:
                parts.append(body)
                total += len(body)
        return "".join(parts)[:n_chars]

    @property
    def fingerprint(self) -> str:
        listing = "\n".join(self.train_docs + ("--",) + self.eval_docs)
        topics = hashlib.sha256("".join(reference_topics().values()).encode()).hexdigest()[:16]
        return hashlib.sha256(f"reference:{self.root}:{topics}:{listing}".encode()).hexdigest()[:16]


def reference_source(seed: int) -> ReferenceSource:
    """The built-in real-prose source; ``seed`` fixes the order of documents (not the split)."""
    docs = [f"topic:{k}" for k in reference_topics()] + [f"doc:{rel}" for rel in stdlib_files()]
    # topics and docstrings interleaved in a seeded order; a document's split never depends on the seed
    order = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).digest())
    train = tuple(d for d in order if not is_eval_doc(d.partition(":")[2]))
    evals = tuple(d for d in order if is_eval_doc(d.partition(":")[2]))
    return ReferenceSource(name=REFERENCE, persona=REFERENCE, floor_bpc=None, root=str(stdlib_root()),
                           train_docs=train, eval_docs=evals)

# ----------------------------------------------------------------------------------------------------
# --corpus DIR: one sub-folder per user
# ----------------------------------------------------------------------------------------------------

EVAL_FRACTION = 0.1  # the tail of each user's text held out for evaluation
# A split longer than asked is sampled in pieces of about this many characters spread evenly over it:
# many context windows each, and enough pieces (19 at small's default 75,000) to cover a big folder.
SPREAD_PIECE_CHARS = 4000


def spread_sample(text: str, n_chars: int, *, piece: int = SPREAD_PIECE_CHARS) -> str:
    """``n_chars`` characters of ``text`` taken as pieces spread evenly from its start to its end.

    The whole text when it is no longer. A user's folder is read in path order, so its head is its
    alphabetically first files: a model trained (or scored) on the head alone sees a few documents of
    a big folder, not the user's language. Each piece but the first starts at a line start where one
    lies in reach, pieces never overlap, and the result is exactly ``n_chars`` long. Deterministic.
    """
    if len(text) <= n_chars:
        return text
    k = max(1, -(-n_chars // piece))
    sizes = [n_chars // k + (1 if i < n_chars % k else 0) for i in range(k)]
    out, prev_end = [], 0
    for i, size in enumerate(sizes):
        start = (i * (len(text) - size)) // (k - 1) if k > 1 else 0
        line = text.find("\n", start, start + size // 2) + 1 if start else 0
        start = max(line or start, prev_end)
        start = min(start, len(text) - sum(sizes[i:]))  # room left for this piece and the rest
        out.append(text[start:start + size])
        prev_end = start + size
    return "".join(out)


@dataclass(frozen=True, kw_only=True)
class FolderSource(TextSource):
    """A user's own text from a sub-folder of ``--corpus DIR``: the last tenth is the eval split.

    A split longer than asked is sampled across its whole length (:func:`spread_sample`)."""

    path: str
    train_text: str = field(repr=False)
    eval_text: str = field(repr=False)

    def text(self, split: str, n_chars: int) -> str:
        """``n_chars`` characters spread over the split (all of it when the split is shorter)."""
        check_split(split, n_chars)
        return spread_sample(self.train_text if split == "train" else self.eval_text, n_chars)

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

