"""An experiment's statistics: each arm's metrics over its seeds and the prompts, with intervals,
and each arm's difference from the baseline arm. Pure numpy, no IO.

An arm trained with S seeds has, for a metric, one value per (seed, prompt): an ``(S, n)``
matrix over the same ``n`` prompts as every other arm. Its estimate is the mean over seeds of
the per-seed statistic (a mean over prompts, or a perplexity). The interval is a two-level
percentile bootstrap (Davison & Hinkley, *Bootstrap Methods and their Application*, 1997,
section 3.8, "Hierarchical data"): each resample draws ``n`` prompts with replacement, the same
indices for every arm (the prompts are shared, so differences between arms are paired, as in
:mod:`stages.eval_stats`), and for each arm its seeds with replacement. Both sources of
variation, which prompts were asked and which seeds trained, widen the interval. With one seed
the seed draw is that seed, and the interval is the prompts' alone. Resample ``b`` draws its
prompt indices, then each arm's seed indices in the order given, from one
``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from stages.eval_stats import LEVEL, RESAMPLES, Estimate, NoPrompts

Statistic = Callable[..., float]  # (S, n) matrices -> the arm's value


def mean_over_seeds(x: np.ndarray) -> float:
    """The mean over seeds of each seed's mean over prompts (``x``: ``(S, n)``)."""
    return float(x.mean(axis=1).mean())


def perplexity_over_seeds(nll: np.ndarray, tokens: np.ndarray) -> float:
    """The mean over seeds of each seed's perplexity, ``exp(sum nll / sum tokens)`` over prompts
    (``nll`` in nats, ``tokens`` counts; both ``(S, n)``)."""
    return float(np.exp(nll.sum(axis=1) / tokens.sum(axis=1)).mean())


def difference(arm: float, baseline: float) -> float:
    return arm - baseline


def ratio(arm: float, baseline: float) -> float:
    return arm / baseline


def arm_estimates(arms: dict[str, tuple[np.ndarray, ...]], statistic: Statistic, baseline: str | None, *,
                  compare: Callable[[float, float], float] = difference, seed: int, resamples: int = RESAMPLES,
                  level: float = LEVEL) -> tuple[dict[str, Estimate], dict[str, Estimate]]:
    """Each arm's statistic and its comparison with the baseline arm, with bootstrap intervals.

    Args:
        arms: arm -> its columns, each ``(S_arm, n)`` (seeds x prompts; ``n`` the same for every
            arm and column, prompt ``i`` the same prompt everywhere).
        statistic: the columns of one arm -> its value (:func:`mean_over_seeds`,
            :func:`perplexity_over_seeds`).
        baseline: the arm the others are compared with, or None (no comparisons).
        compare: (arm value, baseline value) -> the comparison (:func:`difference`, :func:`ratio`).
        seed, resamples, level: as in :func:`stages.eval_stats.paired_bootstrap`.

    Returns:
        (arm -> its estimate, arm -> its comparison with the baseline; the baseline has none).
        ``Estimate.n`` is the number of prompts.

    Raises:
        NoPrompts: no prompts. ValueError: columns of different prompt counts, or not ``(S, n)``.
    """
    shapes = {c.shape[1] if c.ndim == 2 else -1 for cols in arms.values() for c in cols}
    if -1 in shapes or len(shapes) != 1:
        raise ValueError(f"every arm's columns must be (seeds, prompts) matrices over the same prompts; got "
                         f"{ {a: [c.shape for c in cols] for a, cols in arms.items()} }")
    n = shapes.pop()
    if n == 0:
        raise NoPrompts("no prompts shared by every arm: an experiment statistic needs at least one")
    rng = np.random.default_rng(seed)
    draws = {a: np.empty(resamples) for a in arms}
    compared = {a: np.empty(resamples) for a in arms if baseline is not None and a != baseline}
    for b in range(resamples):
        prompts = rng.integers(0, n, size=n)
        for a, cols in arms.items():
            seeds = rng.integers(0, cols[0].shape[0], size=cols[0].shape[0])
            draws[a][b] = statistic(*(c[seeds][:, prompts] for c in cols))
        for a in compared:
            compared[a][b] = compare(draws[a][b], draws[baseline][b])
    values = {a: statistic(*cols) for a, cols in arms.items()}
    tail = 100 * (1 - level) / 2

    def estimate(point: float, samples: np.ndarray) -> Estimate:
        low, high = np.percentile(samples, [tail, 100 - tail], method="linear")
        return Estimate(float(point), float(low), float(high), n, level, resamples)

    return ({a: estimate(values[a], draws[a]) for a in arms},
            {a: estimate(compare(values[a], values[baseline]), compared[a]) for a in compared})
