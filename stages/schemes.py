"""Which pairwise comparisons the quality judge makes: comparison schemes (IO-free).

A prefix with K candidates has K(K-1)/2 pairs; judged in both shown orders (the paper's
all-pairs) that is K(K-1) judge calls, 272 at K = 17, every online step. DPO needs only the
best and the worst candidate, so cheaper schemes pick comparisons that find those two:

========== ============================================ ================================
scheme     comparisons (pairs of candidates)            quality score of a candidate
========== ============================================ ================================
all_pairs  every pair: K(K-1)/2                         mean win rate over all others
pivot      each candidate vs the original: K-1           its win rate against the original
           (the paper's saving; it trained a worse        (the original: 0.5)
           model)
tournament max-min tournament: round one pairs them      mean win rate in its matches; the
           up, winners play a knockout for the best,     tournament's best 1, its worst 0
           losers one for the worst: 3K/2 - 2 (K even),
           3(K-1)/2 (K odd)
sparse_bt  a random connected graph of degree d          Bradley-Terry strengths fitted to
           (a cycle plus random matchings):              the soft outcomes, as the mean
           min(ceil(K d / 2), K(K-1)/2)                  win probability against all others
adaptive   sparse_bt's graph, then every pair among the  as sparse_bt, fitted again on all
           3 best and among the 3 worst by its fit that   the comparisons
           the graph left out: at most 6 more
========== ============================================ ================================

Each comparison is judged in both shown orders with ``judging.order: both`` (x2 calls) or in
one order drawn from the seed with ``seeded``. Every draw (shown orders, pairings, graphs,
coin flips) comes from a hash of the run seed, the pair id and the candidates' texts, so a
scheme repeats exactly on resume and does not depend on chunking.

A scheme is a generator: it yields a round of comparisons ``(shown first, shown second)``,
receives their outcomes (the probability that the first shown is better, 0.5 a tie, None
when unparsable), and returns one score per candidate (None: no parsed comparison). Rounds
let a scheme choose comparisons from earlier outcomes (the tournament's rounds), while the
judge sends one round of all the pairs of a batch as one engine call.

Unparsable comparisons and ties are handled as in all-pairs: an unparsable one is left out of
every mean; a tie counts half. Where a match must be decided (a tournament's knockout), a
match without a parsed outcome, or exactly tied, is decided by a seeded coin.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Generator, Sequence

from pipeline.schema import content_id

SCHEMES = ("all_pairs", "pivot", "tournament", "sparse_bt", "adaptive")

Comparison = tuple[int, int]  # (candidate shown first, candidate shown second)
Outcome = float | None  # P(the first shown is better); None: unparsable
SchemeRun = Generator[list[Comparison], list[Outcome], list[float | None]]


@dataclass(frozen=True)
class Draws:
    """A pair's seeded draws: the shown order of a comparison, permutations, coins."""

    seed: int
    pair_id: str
    texts: tuple[str, ...]

    def flip(self, i: int, j: int) -> bool:
        """True: show ``j`` first. The hash all-pairs used in one-order mode, kept so its
        judgments stay the same."""
        return int(content_id("order", self.seed, self.pair_id, self.texts[i], self.texts[j])[:8], 16) % 2 == 1

    def rng(self, purpose: str) -> random.Random:
        return random.Random(int(content_id("scheme", purpose, self.seed, self.pair_id, *self.texts)[:16], 16))


def shown(i: int, j: int, draws: Draws, both: bool) -> list[Comparison]:
    """The comparisons that judge candidates i and j: both orders, or one seeded order."""
    if both:
        return [(i, j), (j, i)]
    return [(j, i) if draws.flip(i, j) else (i, j)]


def win_probability(i: int, comparisons: Sequence[Comparison], outcomes: Sequence[Outcome]) -> dict[int, list[float]]:
    """Opponent -> i's parsed outcomes against it (each the probability that i is better)."""
    out: dict[int, list[float]] = {}
    for (a, b), p in zip(comparisons, outcomes):
        if p is None or i not in (a, b):
            continue
        out.setdefault(b if a == i else a, []).append(p if a == i else 1.0 - p)
    return out


def mean_win_rates(n: int, comparisons: Sequence[Comparison], outcomes: Sequence[Outcome]) -> list[float | None]:
    """Each candidate's mean over its opponents of its mean outcome against each (the opponents
    with a parsed comparison only; None when it has none)."""
    scores: list[float | None] = []
    for i in range(n):
        rates = [sum(v) / len(v) for v in win_probability(i, comparisons, outcomes).values()]
        scores.append(sum(rates) / len(rates) if rates else None)
    return scores


# ---------------------------------------------------------------------------------- schemes
def all_pairs(n: int, draws: Draws, both: bool) -> SchemeRun:
    comparisons = [c for i, j in combinations(range(n), 2) for c in shown(i, j, draws, both)]
    outcomes = yield comparisons
    return mean_win_rates(n, comparisons, outcomes)


def pivot(n: int, draws: Draws, both: bool) -> SchemeRun:
    """Every other candidate against candidate 0 (the original suffix)."""
    comparisons = [c for i in range(1, n) for c in shown(0, i, draws, both)]
    outcomes = yield comparisons
    scores: list[float | None] = [None]
    for i in range(1, n):
        against = win_probability(i, comparisons, outcomes).get(0)
        scores.append(sum(against) / len(against) if against else None)
    if any(s is not None for s in scores):
        scores[0] = 0.5  # the pivot ties itself
    return scores


def tournament(n: int, draws: Draws, both: bool) -> SchemeRun:
    """Max-min tournament: the best and the worst together in about 3K/2 matches."""
    coins = draws.rng("coins")
    played: list[Comparison] = []
    results: list[Outcome] = []

    def play(matches: list[tuple[int, int]]):
        """Yields the matches' comparisons; returns (winner, loser) per match."""
        comparisons = [c for a, b in matches for c in shown(a, b, draws, both)]
        if not comparisons:
            return []
        outcomes = yield comparisons
        played.extend(comparisons)
        results.extend(outcomes)
        decided, at = [], 0
        for a, b in matches:
            k = len(shown(a, b, draws, both))
            mine = [p if first == a else 1.0 - p
                    for (first, _), p in zip(comparisons[at:at + k], outcomes[at:at + k]) if p is not None]
            at += k
            p = sum(mine) / len(mine) if mine else 0.5
            a_wins = p > 0.5 or (p == 0.5 and coins.random() < 0.5)
            decided.append((a, b) if a_wins else (b, a))
        return decided

    def pairs_of(players: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
        return [(players[k], players[k + 1]) for k in range(0, len(players) - 1, 2)], players[len(players) - len(players) % 2:]

    order = list(range(n))
    draws.rng("seating").shuffle(order)
    first_round, bye = pairs_of(order)
    decided = yield from play(first_round)
    winners = [w for w, _ in decided] + bye  # an odd one out plays in both brackets
    losers = [lo for _, lo in decided] + bye
    while len(winners) > 1 or len(losers) > 1:
        upper, upper_bye = pairs_of(winners)
        lower, lower_bye = pairs_of(losers)
        decided = yield from play(upper + lower)
        winners = [w for w, _ in decided[:len(upper)]] + upper_bye
        losers = [lo for _, lo in decided[len(upper):]] + lower_bye

    scores = mean_win_rates(n, played, results)
    best, worst = winners[0], losers[0]
    if best == worst:
        # A judge with a cycle (a > b > c > a) can make the odd one out win the upper bracket
        # and lose the lower one: the worst is then the lowest-scored of the others.
        worst = min((i for i in range(n) if i != best), key=lambda i: (scores[i] is None, scores[i] or 0.0, i))
    out: list[float | None] = []
    for i, s in enumerate(scores):
        # Between the best and the worst, whatever their own mean (so the pick is the tournament's).
        out.append(None if s is None else 1.0 if i == best else 0.0 if i == worst else min(max(s, 0.01), 0.99))
    return out


def sparse_graph(n: int, degree: int, draws: Draws) -> list[tuple[int, int]]:
    """min(ceil(n d / 2), n(n-1)/2) distinct pairs: a seeded cycle (connected), then random
    matchings, then (rarely needed) the remaining pairs in seeded order."""
    every = list(combinations(range(n), 2))
    target = min(math.ceil(n * degree / 2), len(every))
    if target == len(every):
        return every
    rng = draws.rng("graph")
    order = list(range(n))
    rng.shuffle(order)
    edges: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()

    def add(a: int, b: int) -> None:
        edge = (min(a, b), max(a, b))
        if a != b and edge not in seen and len(edges) < target:
            seen.add(edge)
            edges.append(edge)

    for k in range(n):
        add(order[k], order[(k + 1) % n])
    for _ in range(4 * degree):
        if len(edges) >= target:
            break
        rng.shuffle(order)
        for k in range(0, n - 1, 2):
            add(order[k], order[k + 1])
    rest = [e for e in every if e not in seen]
    rng.shuffle(rest)
    for a, b in rest:
        add(a, b)
    return edges


def bradley_terry(n: int, comparisons: Sequence[Comparison], outcomes: Sequence[Outcome],
                  prior: float = 1e-6) -> list[float | None]:
    """Each candidate's mean win probability against all others under Bradley-Terry strengths
    fitted to soft outcomes (a win of p for the first shown, 1 - p for the second).

    The fit maximises the soft outcomes' log-likelihood plus a Gaussian prior on the log
    strengths (``prior``: its precision; it keeps a candidate that won every comparison finite
    and pins the scale) by Newton's method: exact when the outcomes are a Bradley-Terry model's
    own probabilities (Bradley and Terry, 1952; soft outcomes as in Hunter, 2004). None for a
    candidate without a parsed comparison.
    """
    import numpy as np

    rows = [(a, b, p) for (a, b), p in zip(comparisons, outcomes) if p is not None]
    seen = {i for a, b, _ in rows for i in (a, b)}
    theta = np.zeros(n)
    for _ in range(100):
        gradient, hessian = -prior * theta, -prior * np.eye(n)
        for a, b, p in rows:
            q = 1.0 / (1.0 + math.exp(theta[b] - theta[a]))  # P(a better) under the model
            gradient[a] += p - q
            gradient[b] -= p - q
            w = q * (1.0 - q)
            hessian[a, a] -= w
            hessian[b, b] -= w
            hessian[a, b] += w
            hessian[b, a] += w
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return [None if i not in seen else
            sum(1.0 / (1.0 + math.exp(theta[j] - theta[i])) for j in range(n) if j != i) / (n - 1)
            for i in range(n)]


def sparse_bt(n: int, draws: Draws, both: bool, degree: int) -> SchemeRun:
    comparisons = [c for i, j in sparse_graph(n, degree, draws) for c in shown(i, j, draws, both)]
    outcomes = yield comparisons
    return bradley_terry(n, comparisons, outcomes)


def adaptive(n: int, draws: Draws, both: bool, degree: int, finalists: int = 3) -> SchemeRun:
    """sparse_bt, then the comparisons that decide the pick: every pair among the ``finalists``
    best and among the ``finalists`` worst by the first fit that the graph did not hold, then
    one fit over all."""
    comparisons = [c for i, j in sparse_graph(n, degree, draws) for c in shown(i, j, draws, both)]
    outcomes = list((yield comparisons))
    scores = bradley_terry(n, comparisons, outcomes)
    ranked = sorted(range(n), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))
    done = {(min(a, b), max(a, b)) for a, b in comparisons}
    extra = [c for group in (ranked[:finalists], ranked[-finalists:])
             for i, j in combinations(sorted(group), 2) if (i, j) not in done
             for c in shown(i, j, draws, both)]
    extra = list(dict.fromkeys(extra))  # the two groups overlap when n < 2 * finalists
    if extra:
        outcomes += (yield extra)
        comparisons += extra
    return bradley_terry(n, comparisons, outcomes)


def run_scheme(name: str, n: int, draws: Draws, both: bool, degree: int) -> SchemeRun:
    """The generator of scheme ``name`` for ``n`` >= 2 candidates (see the module docstring).

    Raises:
        ValueError: an unknown scheme.
    """
    if name == "all_pairs":
        return all_pairs(n, draws, both)
    if name == "pivot":
        return pivot(n, draws, both)
    if name == "tournament":
        return tournament(n, draws, both)
    if name == "sparse_bt":
        return sparse_bt(n, draws, both, degree)
    if name == "adaptive":
        return adaptive(n, draws, both, degree)
    raise ValueError(f"unknown comparison scheme {name!r}; one of {', '.join(SCHEMES)}")


def scheme_calls(name: str, n: int, both: bool, degree: int) -> int:
    """Judge calls of scheme ``name`` for ``n`` candidates (the module docstring's formulas;
    ``adaptive``: at most this many, its second round depends on the first)."""
    if n < 2:
        return 0
    sparse = min(math.ceil(n * degree / 2), n * (n - 1) // 2)
    pairs = {"all_pairs": n * (n - 1) // 2, "pivot": n - 1,
             "tournament": 3 * n // 2 - 2 if n % 2 == 0 else 3 * (n - 1) // 2, "sparse_bt": sparse,
             "adaptive": min(sparse + 2 * 3, n * (n - 1) // 2)}[name]
    return pairs * (2 if both else 1)


def drive(run: SchemeRun, judge: Callable[[list[Comparison]], list[Outcome]]) -> tuple[list[float | None], list[Comparison]]:
    """Runs one scheme to the end with ``judge`` answering each round; returns its scores and
    every comparison it made, in order (for tools and tests; the judge drives many at once)."""
    made: list[Comparison] = []
    comparisons = next(run)
    while True:
        made += comparisons
        try:
            comparisons = run.send(judge(comparisons))
        except StopIteration as stop:
            return stop.value, made
