"""Tests for model/corpora.py: persona sources, their exact entropy floors, stdlib text and --corpus folders."""

from __future__ import annotations

import itertools
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.corpora import (
    ALL_PERSONAS,
    CORPUS_PERSONA,
    HELD_OUT_PERSONA,
    REAL_PERSONAS,
    SYNTHETIC_PERSONAS,
    TRAIN_PERSONAS,
    CorpusError,
    SyntheticSource,
    TextSource,
    chain_period,
    entropy_rate_bpc,
    folder_sources,
    kl_rate_bpc,
    persona_source,
    stationary_distribution,
    user_sources,
)
from model.real_text import spread_sample

SYNTHETIC = SYNTHETIC_PERSONAS + (HELD_OUT_PERSONA,)

# A small chain with words of different lengths (each followed by a space), used for brute force.
# The stationary distribution is far from uniform, so a length average without it would be wrong.
TOY_P = np.array([[0.1, 0.2, 0.7],
                  [0.2, 0.1, 0.7],
                  [0.3, 0.3, 0.4]])
TOY_WORDS = ("a ", "bb ", "ccc ")


def left_eigenvector(P: np.ndarray) -> np.ndarray:
    """Stationary distribution computed independently of the module: P's left eigenvector for 1."""
    values, vectors = np.linalg.eig(P.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    return pi / pi.sum()


def entropy_bits(probs) -> float:
    return -sum(p * math.log2(p) for p in probs if p > 0)


# ---------------------------------------------------------------------------------------------
# persona lists
# ---------------------------------------------------------------------------------------------

def test_persona_lists() -> None:
    assert {"programmer", "novelist", "scientist", "journalist"} <= set(SYNTHETIC_PERSONAS)
    assert "stdlib" in REAL_PERSONAS
    assert TRAIN_PERSONAS == SYNTHETIC_PERSONAS + REAL_PERSONAS
    assert HELD_OUT_PERSONA not in TRAIN_PERSONAS
    assert set(ALL_PERSONAS) == set(TRAIN_PERSONAS) | {HELD_OUT_PERSONA}
    held_out = persona_source(HELD_OUT_PERSONA, 0)
    assert held_out.floor_bpc is not None  # the unknown user is synthetic: its floor is known


# ---------------------------------------------------------------------------------------------
# entropy math, checked against independent computations
# ---------------------------------------------------------------------------------------------

def test_iid_uniform_source_has_known_rate() -> None:
    # Four equiprobable one-character tokens: exactly 2 bits per character; with a trailing space
    # (two characters per token) exactly 1.
    P = np.full((4, 4), 0.25)
    assert entropy_rate_bpc(P, np.ones(4)) == pytest.approx(2.0, abs=1e-12)
    assert entropy_rate_bpc(P, np.full(4, 2)) == pytest.approx(1.0, abs=1e-12)


def test_word_entropy_matches_exact_enumeration_of_joint_entropy() -> None:
    """H(W_1..W_n) - H(W_1..W_{n-1}) of the stationary chain, by enumerating all 3^n sequences,
    divided by the expected characters per word, must equal the formula exactly."""
    pi = left_eigenvector(TOY_P)
    lengths = np.array([len(w) for w in TOY_WORDS])

    def joint(n: int) -> tuple[float, float]:
        h, chars = 0.0, 0.0
        for seq in itertools.product(range(3), repeat=n):
            p = pi[seq[0]] * math.prod(TOY_P[a, b] for a, b in zip(seq, seq[1:]))
            h -= p * math.log2(p)
            chars += p * lengths[list(seq)].sum()
        return h, chars

    (h6, c6), (h7, c7) = joint(6), joint(7)
    assert entropy_rate_bpc(TOY_P, lengths) == pytest.approx((h7 - h6) / (c7 - c6), rel=1e-9)


def test_character_entropy_matches_brute_force_block_entropy() -> None:
    """The character process itself: enumerate every text the chain can start with, take the exact
    distribution of its first N characters, and check that the conditional block entropy
    H(X_1..X_N) - H(X_1..X_{N-1}) converges to the formula.

    Tolerance: at N = 19..24 the increments still oscillate by about +-0.006 (the position of the
    word boundaries is not yet certain; the oscillation dies out geometrically), and their mean is
    within 1e-3 of the limit; 3e-3 is still far tighter than the error of plausible mistakes, such as
    averaging the word lengths without the stationary weights (off by 0.04 here), which the test
    checks it would catch.
    """
    N = 24
    pi = left_eigenvector(TOY_P)
    frontier = {(TOY_WORDS[i], i): pi[i] for i in range(3)}
    prefixes: defaultdict[str, float] = defaultdict(float)
    while frontier:
        grown: defaultdict[tuple[str, int], float] = defaultdict(float)
        for (text, last), p in frontier.items():
            if len(text) >= N:
                prefixes[text[:N]] += p
                continue
            for j, word in enumerate(TOY_WORDS):
                grown[(text + word, j)] += p * TOY_P[last, j]
        frontier = grown

    def block_entropy(n: int) -> float:
        cut: defaultdict[str, float] = defaultdict(float)
        for text, p in prefixes.items():
            cut[text[:n]] += p
        return entropy_bits(cut.values())

    increments = [block_entropy(n) - block_entropy(n - 1) for n in range(19, N + 1)]
    estimate = float(np.mean(increments))
    lengths = [len(w) for w in TOY_WORDS]
    assert entropy_rate_bpc(TOY_P, lengths) == pytest.approx(estimate, abs=3e-3)
    naive = float(pi @ [entropy_bits(row) for row in TOY_P] / np.mean(lengths))
    assert abs(naive - estimate) > 5 * 3e-3


def test_edge_dependent_lengths_match_the_expanded_character_chain() -> None:
    """With a separator that depends on the left token, the formula must agree with the entropy rate
    of the equivalent character-level chain whose states are (token, position in its emission)."""
    rng = np.random.default_rng(5)
    V = 4
    P = rng.dirichlet(np.ones(V), size=V)
    L = rng.integers(1, 5, size=(V, V)).astype(float)  # characters written when stepping i -> j
    # Expanded chain: stepping i -> j enters state (i, j, 0) and walks L_ij - 1 more characters
    # deterministically; only the first character of an emission carries the choice of j.
    states = [(i, j, k) for i in range(V) for j in range(V) for k in range(int(L[i, j]))]
    index = {s: n for n, s in enumerate(states)}
    Q = np.zeros((len(states), len(states)))
    for (i, j, k), n in index.items():
        if k + 1 < L[i, j]:
            Q[n, index[(i, j, k + 1)]] = 1.0
        else:
            for m in range(V):
                Q[n, index[(j, m, 0)]] = P[j, m]
    mu = left_eigenvector(Q)
    expanded_rate = float(mu @ [entropy_bits(row) for row in Q])
    assert entropy_rate_bpc(P, L) == pytest.approx(expanded_rate, rel=1e-6)


def test_stationary_distribution_and_period() -> None:
    P = np.random.default_rng(0).dirichlet(np.ones(6), size=6)
    np.testing.assert_allclose(stationary_distribution(P), left_eigenvector(P), atol=1e-10)
    # a chain that mixes too slowly for power iteration still gets its exact pi (from the solve)
    sticky = np.array([[1 - 1e-6, 1e-6], [2e-6, 1 - 2e-6]])
    np.testing.assert_allclose(stationary_distribution(sticky), [2 / 3, 1 / 3], rtol=1e-9)
    np.testing.assert_allclose(stationary_distribution(np.array([[0.0, 1.0], [1.0, 0.0]])), [0.5, 0.5])
    assert chain_period(P) == 1
    cycle = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert chain_period(cycle) == 2
    with pytest.raises(CorpusError, match="irreducible"):
        stationary_distribution(np.array([[1.0, 0.0], [0.5, 0.5]]))
    with pytest.raises(CorpusError, match="sum to 1"):
        entropy_rate_bpc(np.array([[0.5, 0.4], [0.5, 0.5]]), [1, 1])
    with pytest.raises(CorpusError, match="shape"):
        entropy_rate_bpc(np.full((2, 2), 0.5), [1, 1, 1])


def test_kl_rate() -> None:
    lengths = [len(w) for w in TOY_WORDS]
    assert kl_rate_bpc(TOY_P, TOY_P, lengths) == pytest.approx(0.0, abs=1e-12)
    uniform = np.full((3, 3), 1 / 3)
    # Against a uniform chain, KL = log2(3) - H per word: cross-entropy minus entropy.
    pi = left_eigenvector(TOY_P)
    chars = pi @ (TOY_P * np.array(lengths)[None, :]).sum(axis=1)
    expected = (math.log2(3) - pi @ [entropy_bits(r) for r in TOY_P]) / chars
    assert kl_rate_bpc(TOY_P, uniform, lengths) == pytest.approx(expected, rel=1e-9)
    blocked = np.array([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
    assert kl_rate_bpc(TOY_P, blocked, lengths) == float("inf")


@pytest.mark.parametrize("persona", ["novelist", "programmer"])
def test_floor_matches_log_loss_of_a_long_sample(persona: str) -> None:
    """The chain's own log-loss on a long sample estimates the rate without the stationary
    distribution or the length weighting; it must agree within 5 standard errors (batch means,
    which account for the correlation between neighbouring tokens)."""
    source = persona_source(persona, 0)
    assert isinstance(source, SyntheticSource)
    text, tokens = source.chain.sample((99, 1), 1_000_000)
    bits = source.chain.log_loss_bits(tokens)
    chars = np.array([len(source.chain.vocab.first[tokens[0]])]
                     + [len(source.chain.vocab.emit[a][b]) for a, b in zip(tokens, tokens[1:])])
    batch_bits = np.array_split(bits, 100)
    batch_chars = np.array_split(chars, 100)
    rates = np.array([b.sum() / c.sum() for b, c in zip(batch_bits, batch_chars)])
    estimate = bits.sum() / chars.sum()
    se = rates.std(ddof=1) / math.sqrt(len(rates))
    assert se < 0.01
    assert abs(estimate - source.floor_bpc) < 5 * se


# ---------------------------------------------------------------------------------------------
# synthetic sources
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("persona", SYNTHETIC)
def test_text_is_deterministic_and_split_streams_are_independent(persona: str) -> None:
    a, b = persona_source(persona, 0), persona_source(persona, 0)
    train = a.text("train", 50_000)
    assert len(train) == 50_000
    assert train == b.text("train", 50_000)
    assert persona_source(persona, 1).text("train", 2000) != train[:2000]
    evals = a.text("eval", 5000)
    assert len(evals) == 5000 and evals != train[:5000]
    # an independent draw does not reproduce a stretch of the other split
    assert evals[1000:1200] not in train


@settings(max_examples=25, deadline=None)
@given(persona=st.sampled_from(SYNTHETIC), split=st.sampled_from(("train", "eval")),
       n=st.integers(0, 3000), extra=st.integers(0, 3000))
def test_shorter_text_is_a_prefix_of_longer(persona: str, split: str, n: int, extra: int) -> None:
    source = persona_source(persona, 0)
    short, long = source.text(split, n), source.text(split, n + extra)
    assert len(short) == n and len(long) == n + extra
    assert long.startswith(short)


@pytest.mark.parametrize("persona", SYNTHETIC)
def test_text_decodes_uniquely_into_the_sampled_tokens(persona: str) -> None:
    """The floor is exact only if the text decodes uniquely: decoding must give back the tokens."""
    source = persona_source(persona, 0)
    assert isinstance(source, SyntheticSource)
    text, tokens = source.chain.sample((7,), 20_000)
    vocab = source.chain.vocab
    full = vocab.render(tokens)
    assert full.startswith(text)
    assert vocab.decode(full) == tokens


def test_floors_are_in_a_sane_range_and_differ() -> None:
    floors = {}
    for persona in SYNTHETIC:
        floors[persona] = persona_source(persona, 0).floor_bpc
        for user in user_sources(persona, 2, 0):
            assert user.floor_bpc is not None and 0.6 < user.floor_bpc < 2.5
            assert user.floor_bpc != floors[persona]
    assert all(0.7 < f < 2.5 for f in floors.values()), floors
    assert len({round(f, 3) for f in floors.values()}) == len(floors)


def test_texts_look_like_their_persona() -> None:
    code = persona_source("programmer", 0).text("train", 20_000)
    assert "(" in code and "\n    " in code and " = " in code
    prose = persona_source("novelist", 0).text("train", 20_000)
    assert ". " in prose and ", " in prose and prose[0].isupper()
    sentences = [s for s in prose.split(". ") if s]
    assert sum(s[0].isupper() for s in sentences) == len(sentences)  # capital after every full stop
    recipe = persona_source("chef", 0).text("train", 20_000).lower()
    assert any(w in recipe.split() for w in ("stir", "add", "bake", "simmer"))


def word_distribution(text: str) -> Counter:
    return Counter(w.lower() for w in re.findall(r"[A-Za-z0-9_]+", text))


def total_variation(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[w] / na - b[w] / nb) for w in set(a) | set(b))


def test_personas_are_distinguishable_and_users_stay_close() -> None:
    n = 100_000
    persona_words = {p: word_distribution(persona_source(p, 0).text("train", n)) for p in SYNTHETIC}
    # A model of one persona meets words it never saw in another's text: a large share of it.
    for a, b in itertools.permutations(SYNTHETIC, 2):
        unseen = sum(c for w, c in persona_words[b].items() if w not in persona_words[a])
        assert unseen / sum(persona_words[b].values()) > 0.3, (a, b)
    between_personas = min(total_variation(persona_words[a], persona_words[b])
                           for a, b in itertools.combinations(SYNTHETIC, 2))
    for persona in SYNTHETIC:
        u0, u1 = user_sources(persona, 2, 0)
        w0, w1 = word_distribution(u0.text("train", n)), word_distribution(u1.text("train", n))
        to_persona = total_variation(w0, persona_words[persona])
        between_users = total_variation(w0, w1)
        noise = total_variation(w0, word_distribution(u0.text("eval", n)))  # same user, two samples
        assert between_personas > 2 * to_persona, (persona, between_personas, to_persona)
        assert between_users > noise + 0.1, (persona, between_users, noise)  # users differ measurably


@pytest.mark.parametrize("persona", SYNTHETIC)
def test_users_differ_from_persona_and_each_other_by_a_small_kl_rate(persona: str) -> None:
    base = persona_source(persona, 0)
    users = user_sources(persona, 3, 0)
    assert [u.name for u in users] == [f"{persona}-{k}" for k in range(3)]
    assert all(u.persona == persona for u in users)
    lengths = base.chain.vocab.lengths
    for user in users:
        kl = kl_rate_bpc(user.chain.transitions, base.chain.transitions, lengths)
        assert 0.02 < kl < 0.2 * base.floor_bpc, kl
    assert kl_rate_bpc(users[0].chain.transitions, users[1].chain.transitions, lengths) > 0.02
    # user k does not depend on how many users were asked for
    assert user_sources(persona, 1, 0)[0].text("eval", 500) == users[0].text("eval", 500)


def test_true_bpc_fluctuates_around_the_floor() -> None:
    source = persona_source("journalist", 0)
    assert isinstance(source, SyntheticSource)
    assert source.true_bpc("eval", 200_000) == pytest.approx(source.floor_bpc, abs=0.02)
    assert source.true_bpc("eval", 2000) != source.true_bpc("train", 2000)


def test_fingerprints() -> None:
    a, b = persona_source("novelist", 0), persona_source("novelist", 1)
    assert a.fingerprint == persona_source("novelist", 0).fingerprint != b.fingerprint
    assert user_sources("novelist", 1, 0)[0].fingerprint != a.fingerprint


def test_bad_arguments_raise_corpus_error() -> None:
    with pytest.raises(CorpusError, match="unknown persona 'pirate'"):
        persona_source("pirate", 0)
    source = persona_source("novelist", 0)
    with pytest.raises(CorpusError, match="unknown split 'test'"):
        source.text("test", 10)
    with pytest.raises(CorpusError, match="n_chars"):
        source.text("train", -1)
    with pytest.raises(CorpusError, match="seed"):
        persona_source("novelist", -3)
    with pytest.raises(CorpusError, match="n_users"):
        user_sources("novelist", -1, 0)


# ---------------------------------------------------------------------------------------------
# real text: the standard library
# ---------------------------------------------------------------------------------------------

def test_stdlib_source_is_real_python() -> None:
    source = persona_source("stdlib", 0)
    assert isinstance(source, TextSource) and source.floor_bpc is None and source.persona == "stdlib"
    train = source.text("train", 300_000)
    assert len(train) == 300_000
    assert "def " in train and "import " in train and "return" in train
    assert train == persona_source("stdlib", 0).text("train", 300_000)
    assert persona_source("stdlib", 1).text("train", 5000) != train[:5000]  # the seed orders the files
    evals = source.text("eval", 100_000)
    assert len(evals) == 100_000 and evals[:2000] not in train
    first = (Path(source.root) / source.eval_files[0]).read_text(encoding="utf-8")
    assert evals.startswith(first[:5000])  # whole files, verbatim
    compile(first, source.eval_files[0], "exec")  # real Python, not an imitation
    assert set(source.train_files).isdisjoint(source.eval_files)
    assert set(source.eval_files) == set(persona_source("stdlib", 1).eval_files)  # eval never trained on


def test_stdlib_users_hold_different_modules() -> None:
    users = user_sources("stdlib", 3, 0)
    assert [u.name for u in users] == ["stdlib-0", "stdlib-1", "stdlib-2"]
    files = [set(u.train_files) | set(u.eval_files) for u in users]
    assert all(files) and not (files[0] & files[1]) and not (files[1] & files[2])
    assert all(len(u.text("train", 2000)) == 2000 and u.text("eval", 100) for u in users)


# ---------------------------------------------------------------------------------------------
# --corpus DIR
# ---------------------------------------------------------------------------------------------

def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def test_folder_sources_happy_path(tmp_path: Path) -> None:
    alice_lines = [f"alice line {i} about gardens and soil\n" for i in range(100)]
    write(tmp_path / "alice" / "a.txt", "".join(alice_lines[:60]))
    write(tmp_path / "alice" / "notes" / "b.md", "".join(alice_lines[60:]).replace("\n", "\r\n"))
    write(tmp_path / "alice" / ".hidden", b"\xff\xfe not text, but hidden")
    write(tmp_path / "bob" / "only.txt", "".join(f"bob writes line {i}\n" for i in range(30)))
    write(tmp_path / "README", "files at the top are not a user")
    sources = folder_sources(tmp_path)
    assert [s.name for s in sources] == ["alice", "bob"]
    alice = sources[0]
    assert alice.persona == CORPUS_PERSONA and alice.floor_bpc is None
    train, evals = alice.text("train", 10**9), alice.text("eval", 10**9)
    assert train + evals == "".join(alice_lines)  # all of it, in path order, CRLF normalised
    assert evals.startswith("alice line") and evals.endswith("\n")  # cut at a line start
    assert 0.05 < len(evals) / (len(train) + len(evals)) < 0.15
    assert alice.text("train", 50) == train[:50]  # a single piece: the head
    assert folder_sources(tmp_path)[0].fingerprint == alice.fingerprint != sources[1].fingerprint


def test_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=f"{tmp_path / 'nope'} does not exist"):
        folder_sources(tmp_path / "nope")


def test_folder_is_a_file(tmp_path: Path) -> None:
    write(tmp_path / "f.txt", "hello")
    with pytest.raises(CorpusError, match="is not a folder"):
        folder_sources(tmp_path / "f.txt")


def test_folder_without_user_subfolders(tmp_path: Path) -> None:
    write(tmp_path / "loose.txt", "text but no user folder\n")
    with pytest.raises(CorpusError, match=f"{tmp_path} has no user sub-folders"):
        folder_sources(tmp_path)


def test_empty_user_folder(tmp_path: Path) -> None:
    write(tmp_path / "alice" / "a.txt", "plenty of text\n" * 20)
    (tmp_path / "bob").mkdir()
    with pytest.raises(CorpusError, match=f"user folder {tmp_path / 'bob'} is empty"):
        folder_sources(tmp_path)


def test_user_folder_with_only_blank_files(tmp_path: Path) -> None:
    write(tmp_path / "carol" / "a.txt", "")
    write(tmp_path / "carol" / "b.txt", "  \n\n")
    with pytest.raises(CorpusError, match=f"{tmp_path / 'carol'} holds no text"):
        folder_sources(tmp_path)


def test_user_folder_with_too_little_text(tmp_path: Path) -> None:
    write(tmp_path / "dave" / "a.txt", "x")
    with pytest.raises(CorpusError, match=f"{tmp_path / 'dave'} holds too little text"):
        folder_sources(tmp_path)


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "erin" / "good.txt", "fine\n" * 10)
    write(tmp_path / "erin" / "bad.txt", "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=f"{tmp_path / 'erin' / 'bad.txt'} is not UTF-8 text"):
        folder_sources(tmp_path)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "frank" / "good.txt", "fine\n" * 10)
    (tmp_path / "frank" / "gone.txt").symlink_to(tmp_path / "does-not-exist")
    with pytest.raises(CorpusError, match=f"cannot read {tmp_path / 'frank' / 'gone.txt'}"):
        folder_sources(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_file_without_read_permission_is_named(tmp_path: Path) -> None:
    write(tmp_path / "gina" / "locked.txt", "secret\n" * 10)
    (tmp_path / "gina" / "locked.txt").chmod(0)
    try:
        with pytest.raises(CorpusError, match="cannot read .*locked.txt"):
            folder_sources(tmp_path)
    finally:
        (tmp_path / "gina" / "locked.txt").chmod(0o600)


def test_folder_source_rejects_unknown_split(tmp_path: Path) -> None:
    write(tmp_path / "hal" / "a.txt", "line\n" * 50)
    with pytest.raises(CorpusError, match="unknown split"):
        folder_sources(tmp_path)[0].text("validation", 10)


def test_a_big_folder_is_sampled_across_its_whole_length(tmp_path: Path) -> None:
    # 120 documents in path order; the user's split is far longer than what training and scoring take
    for d in range(120):
        write(tmp_path / "carol" / f"doc{d:03d}.txt",
              "".join(f"document {d:03d} line {i} of carol's notes\n" for i in range(100)))
    carol = folder_sources(tmp_path)[0]
    whole = carol.text("train", 10**9)
    train = carol.text("train", 60_000)
    assert len(train) == 60_000 and len(whole) > 5 * 60_000
    docs = {int(m) for m in re.findall(r"document (\d{3})", train)}
    # the head alone would hold documents 0-16; spread pieces reach the split's last documents too
    assert min(docs) == 0 and max(docs) >= 100 and len(docs) >= 15
    # every piece after the first starts at a line start of the original, pieces in order, no overlap
    assert train.count("\n") >= 60_000 // 40 - 20
    assert carol.text("train", 60_000) == train  # deterministic
    evals = carol.text("eval", 5_000)
    assert len(evals) == 5_000 and "document 119" in carol.text("eval", 20_000)


@given(st.text(alphabet="ab\n", min_size=1, max_size=3000), st.integers(1, 3000), st.integers(1, 500))
def test_spread_sample_is_exactly_n_chars_of_in_order_pieces(text: str, n: int, piece: int) -> None:
    got = spread_sample(text, n, piece=piece)
    if len(text) <= n:
        assert got == text
        return
    assert len(got) == n
    # pieces are disjoint, in order: each piece of the output is found at or after the previous one's end
    k = -(-n // piece)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    at, prev_end = 0, 0
    for size in sizes:
        chunk = got[at:at + size]
        found = text.find(chunk, prev_end)
        assert found >= prev_end
        prev_end, at = found + size, at + size
