"""The planned population: schools with their links, users with a home school and a persona.

Every draw comes from one ``numpy.random.Generator`` seeded by the scenario, so a seed gives the same
population. Shares (link mix, personas, users without an adapter) are met exactly by largest remainders,
then shuffled; school sizes are log-normal (``population.school_size_sigma``), every school with a user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..network import LinkProfile, resolve_link
from .config import PlanScenario


@dataclass(frozen=True, kw_only=True)
class Population:
    """Schools (index 0..S-1) and users (0..U-1), as arrays."""

    link_names: list[str]  # the scenario's link profiles, in order
    links: list[LinkProfile]
    school_link: np.ndarray  # (S,) index into links
    user_school: np.ndarray  # (U,) home school: the node holding the user's adapter (sorted by school)
    user_persona: np.ndarray  # (U,) index into persona_names
    user_known: np.ndarray  # (U,) bool: has an adapter
    persona_names: list[str]

    @property
    def schools(self) -> int:
        """Number of schools (nodes)."""
        return len(self.school_link)

    @property
    def down_bps(self) -> np.ndarray:
        """(S,) each school's download bandwidth, bits/s."""
        return np.array([lk.down_bps for lk in self.links])[self.school_link]

    @property
    def up_bps(self) -> np.ndarray:
        """(S,) each school's upload bandwidth, bits/s."""
        return np.array([lk.up_bps for lk in self.links])[self.school_link]

    @property
    def rtt_s(self) -> np.ndarray:
        """(S,) each school's round trip to the core, seconds."""
        return np.array([lk.rtt_s for lk in self.links])[self.school_link]

    def classes(self, class_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Each school's users (in index order) cut into classes of ``class_size``: (first user, size) per class."""
        first_of_school = np.searchsorted(self.user_school, np.arange(self.schools))
        rank = np.arange(len(self.user_school)) - first_of_school[self.user_school]
        starts = np.flatnonzero((rank % class_size) == 0)
        sizes = np.diff(np.append(starts, len(self.user_school)))
        return starts, sizes

    def users_per_school(self, known_only: bool = False) -> np.ndarray:
        """(S,) users whose home is each school (only those with an adapter when ``known_only``)."""
        mask = self.user_known if known_only else np.ones(len(self.user_school), bool)
        return np.bincount(self.user_school[mask], minlength=self.schools)


def exact_counts(shares: list[float], total: int) -> np.ndarray:
    """Split ``total`` into integer counts proportional to ``shares`` (largest remainders, ties to the first)."""
    w = np.asarray(shares, dtype=float)
    raw = w / w.sum() * total
    counts = np.floor(raw).astype(np.int64)
    left = total - int(counts.sum())
    order = sorted(range(len(w)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def build(scn: PlanScenario, rng: np.random.Generator) -> Population:
    """Draw the scenario's population with ``rng``."""
    pop = scn.population
    names = list(pop.links)
    links = [resolve_link(n, where=f"population.links.{n}", profiles=pop.profiles) for n in names]
    school_link = np.repeat(np.arange(len(names)), exact_counts([pop.links[n] for n in names], pop.schools))
    rng.shuffle(school_link)
    # school sizes: one user each, the rest spread by log-normal weights
    weights = rng.lognormal(0.0, pop.school_size_sigma, pop.schools) if pop.school_size_sigma else np.ones(pop.schools)
    extra = rng.multinomial(pop.users - pop.schools, weights / weights.sum())
    user_school = np.repeat(np.arange(pop.schools), 1 + extra)
    personas = list(scn.personas)
    user_persona = np.repeat(np.arange(len(personas)),
                             exact_counts([scn.personas[p].share for p in personas], pop.users))
    rng.shuffle(user_persona)
    unknown = int(round(pop.unknown_share * pop.users))
    user_known = np.ones(pop.users, bool)
    user_known[rng.choice(pop.users, size=unknown, replace=False)] = False
    return Population(link_names=names, links=links, school_link=school_link, user_school=user_school,
                      user_persona=user_persona, user_known=user_known, persona_names=personas)
