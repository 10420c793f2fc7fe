"""The statistics of an evaluation: win rates from pairwise verdicts, rates and their differences,
the perplexity ratio, each with a paired bootstrap interval over prompts. Pure numpy, no IO.

Every function returns an :class:`Estimate`: the point estimate on all prompts, its percentile
bootstrap interval and the number of prompts. None returns a bare number, so no difference
between a checkpoint and the baseline is ever shown without its interval.

**The bootstrap.** The prompts are the sampling unit. A checkpoint and the baseline are scored
on the same prompts, so their scores are pairs, and a resample draws whole prompts: the same
indices select the checkpoint's and the baseline's values (a paired bootstrap). This keeps the
correlation between the two (a prompt hard for one model is often hard for the other), so a
difference gets a narrower interval than resampling each side alone would give.
Resample ``b`` (``b = 0 .. resamples-1``) is the index vector
``numpy.random.default_rng(seed).integers(0, n, size=n)``, drawn in order from one generator;
the statistic is recomputed on it, and the interval is the percentile interval of those
``resamples`` values: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles, computed with
``numpy.percentile``'s default linear interpolation (Hyndman & Fan 1996, definition 7).
Source: Efron & Tibshirani, *An Introduction to the Bootstrap* (1993), ch. 13, "Confidence
intervals based on bootstrap percentiles". The percentile interval respects monotone
transformations (the interval of ``exp(d)`` is ``exp`` of the interval of ``d``, up to the
interpolation between neighbouring resampled values), so the perplexity ratio's interval is
that of the mean loss difference, exponentiated. With one prompt every resample is that
prompt, and the interval is the point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import SipError

# Bootstrap resamples. With 2000, a 95% bound moves by about 0.1 standard error from one seed to
# another (measured on 200 binary scores), small next to the interval's width of ~4 standard errors.
RESAMPLES = 2000
LEVEL = 0.95
# A verdict of the candidate in one shown order, and what it scores (ties count half: the paper's rule).
VERDICT_SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}


class NoPrompts(SipError, ValueError):
    """An evaluation statistic was asked for with no prompts to compute it on."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile bootstrap interval over ``n`` prompts.

    Attributes:
        value: the statistic on all ``n`` prompts.
        low, high: the interval's bounds (``level`` coverage, percentile bootstrap).
        n: prompts the statistic is computed on (the resampling unit).
        level: the interval's nominal coverage (0.95).
        resamples: bootstrap resamples the interval is drawn from.
    """

    value: float
    low: float
    high: float
    n: int
    level: float
    resamples: int

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies in the interval (e.g. 0.5 for a win rate: no detectable difference)."""
        return self.low <= x <= self.high

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def paired_bootstrap(statistic: Callable[..., float], *columns: np.ndarray, seed: int,
                     resamples: int = RESAMPLES, level: float = LEVEL) -> Estimate:
    """A statistic of per-prompt columns with its percentile bootstrap interval over prompts.

    Args:
        statistic: maps the columns (each ``(n,)``, in the order given) to a float.
        columns: per-prompt values, each ``(n,)``, row ``i`` of every column about prompt ``i``;
            each resample applies the same prompt indices to every column (see the module).
        seed: seeds the resampling (``numpy.random.default_rng(seed)``), so the interval is
            reproducible.
        resamples: number of bootstrap resamples.
        level: coverage of the interval, in (0, 1).

    Raises:
        NoPrompts: the columns are empty.
        ValueError: columns of different lengths, or not one-dimensional; ``resamples`` below 1
            or ``level`` outside (0, 1).
    """
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: resamples must be >= 1 and level in (0, 1), got {resamples}, {level}")
    n = _prompt_count(columns)
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for b in range(resamples):
        idx = rng.integers(0, n, size=n)
        values[b] = statistic(*(c[idx] for c in columns))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail], method="linear")
    return Estimate(float(statistic(*columns)), float(low), float(high), n, level, resamples)


def _prompt_count(columns: Sequence[np.ndarray]) -> int:
    if not columns:
        raise ValueError("paired_bootstrap: give at least one per-prompt column")
    if any(c.ndim != 1 for c in columns):
        raise ValueError(f"per-prompt columns must be one-dimensional, got shapes {[c.shape for c in columns]}")
    lengths = {len(c) for c in columns}
    if len(lengths) > 1:
        raise ValueError(f"per-prompt columns differ in length {sorted(lengths)}: each row must be one prompt, "
                         "scored for every model")
    n = lengths.pop()
    if n == 0:
        raise NoPrompts("no prompts to evaluate: an evaluation statistic needs at least one prompt")
    return n


def _scores(values: Sequence[float], what: str) -> np.ndarray:
    """Per-prompt scores in [0, 1] as float64, checked."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1 and arr.size and (np.isnan(arr).any() or (arr < 0).any() or (arr > 1).any()):
        raise ValueError(f"{what}: per-prompt scores must lie in [0, 1] (a prompt without a score is left out "
                         "of every model's column, never counted as a number)")
    return arr


def _mean(x: np.ndarray) -> float:
    return float(x.mean())


def _mean_difference(checkpoint: np.ndarray, baseline: np.ndarray) -> float:
    return float(checkpoint.mean() - baseline.mean())


def _perplexity_ratio(checkpoint_nll: np.ndarray, baseline_nll: np.ndarray, tokens: np.ndarray) -> float:
    total = tokens.sum()
    return float(np.exp(checkpoint_nll.sum() / total - baseline_nll.sum() / total))


def prompt_win_scores(shown_first: Sequence[str | float], shown_second: Sequence[str | float]) -> np.ndarray:
    """Each prompt's win score of a candidate against the baseline, from both shown orders.

    Each prompt is judged twice: once with the candidate's continuation shown first, once
    second. Each order's verdict of the candidate scores ``v`` in [0, 1] and counts half::

        s_i = (v(shown_first[i]) + v(shown_second[i])) / 2

    A verdict is ``win``, ``tie`` or ``loss`` (1, 1/2, 0) or a number in [0, 1]: a soft
    verdict's probability that the candidate is better, or a likelihood comparison's 1/0/0.5.
    So ties count half (the paper's rule), and an order-inconsistent prompt (a win in one order,
    a loss in the other: the judge followed the position, not the text) scores 1/2, as a tie
    does: a judge that always picks the first position gives every prompt 1/2.

    Args:
        shown_first: ``(n,)`` verdicts with the candidate shown first.
        shown_second: ``(n,)`` verdicts with the candidate shown second, same prompts in the
            same order. A prompt whose verdict could not be read in an order is left out of
            both (and counted by the caller).

    Returns:
        ``(n,)`` float64 scores.

    Raises:
        NoPrompts: no prompts. ValueError: different lengths, a verdict other than ``win``,
            ``tie``, ``loss``, or a number outside [0, 1].
    """
    first, second = list(shown_first), list(shown_second)
    if len(first) != len(second):
        raise ValueError(f"verdicts in both orders are needed for every prompt: {len(first)} shown first, "
                         f"{len(second)} shown second")
    if not first:
        raise NoPrompts("no prompts to evaluate: a win rate needs at least one judged prompt")
    unknown = sorted({str(v) for v in first + second if isinstance(v, str)} - set(VERDICT_SCORES))
    if unknown:
        raise ValueError(f"unknown verdict(s) {unknown}; a verdict is one of {sorted(VERDICT_SCORES)} or a number in [0, 1]")
    values = [VERDICT_SCORES[v] if isinstance(v, str) else float(v) for v in first + second]
    if any(not 0 <= v <= 1 for v in values):  # also NaN
        raise ValueError("a numeric verdict must lie in [0, 1] (the probability that the candidate is better)")
    scores = np.asarray(values, dtype=np.float64)
    return (scores[: len(first)] + scores[len(first):]) / 2


def win_rate(shown_first: Sequence[str], shown_second: Sequence[str], *, seed: int,
             resamples: int = RESAMPLES, level: float = LEVEL) -> Estimate:
    """The candidate's pairwise win rate against the baseline, ``W = mean_i s_i``, with its interval.

    ``s_i`` is :func:`prompt_win_scores` (both orders, ties half). 0.5 means no difference: a
    win rate differs from 50% when its interval excludes 0.5 (the difference ``W - 0.5`` has
    the same interval, shifted). Arguments and errors as in :func:`prompt_win_scores`;
    ``seed``, ``resamples``, ``level`` as in :func:`paired_bootstrap`.
    """
    return paired_bootstrap(_mean, prompt_win_scores(shown_first, shown_second), seed=seed,
                            resamples=resamples, level=level)


def rate(scores: Sequence[float], *, seed: int, resamples: int = RESAMPLES, level: float = LEVEL) -> Estimate:
    """One model's rate, ``mean_i x_i``, with its interval.

    Args:
        scores: ``(n,)`` per-prompt scores in [0, 1]: safety 1 (safe) / 0, factuality 1 / 0.5 / 0
            (No / Possible / Definite hallucination), or a mean over judge samples.

    Raises:
        NoPrompts: no prompts. ValueError: a score outside [0, 1] or NaN.
    """
    return paired_bootstrap(_mean, _scores(scores, "rate"), seed=seed, resamples=resamples, level=level)


def rate_difference(checkpoint: Sequence[float], baseline: Sequence[float], *, seed: int,
                    resamples: int = RESAMPLES, level: float = LEVEL) -> Estimate:
    """How much a checkpoint's rate exceeds the baseline's on the same prompts, with its interval.

    ``D = mean_i c_i - mean_i b_i`` (in rate units: 0.1 = ten points), resampling prompts with
    both scores of a prompt kept together (a paired bootstrap).

    Args:
        checkpoint, baseline: ``(n,)`` per-prompt scores in [0, 1] (as in :func:`rate`) of the
            same prompts in the same order.

    Raises:
        NoPrompts: no prompts. ValueError: different lengths, a score outside [0, 1] or NaN.
    """
    return paired_bootstrap(_mean_difference, _scores(checkpoint, "checkpoint"), _scores(baseline, "baseline"),
                            seed=seed, resamples=resamples, level=level)


def perplexity_ratio(checkpoint_nll: Sequence[float], baseline_nll: Sequence[float], tokens: Sequence[int], *,
                     seed: int, resamples: int = RESAMPLES, level: float = LEVEL) -> Estimate:
    """The checkpoint's perplexity on the true continuations over the baseline's, with its interval.

    With ``L_i`` a model's summed negative log-likelihood of prompt ``i``'s true continuation
    (nats) and ``T_i`` its token count, a model's mean per-token loss is
    ``l = sum_i L_i / sum_i T_i`` (token-weighted, as perplexity is defined over tokens) and its
    perplexity ``exp(l)``; the ratio is ``exp(l_checkpoint - l_baseline)`` (below 1: the
    checkpoint predicts the held-out text better). A resample draws prompts, each with its own
    token count and both models' losses. Both models score the same token ids (the policy
    tokenizer's), so one ``T_i`` serves both.

    Args:
        checkpoint_nll, baseline_nll: ``(n,)`` summed per-token losses per prompt, nats, >= 0.
        tokens: ``(n,)`` tokens scored per prompt, > 0.

    Raises:
        NoPrompts: no prompts. ValueError: different lengths, a negative or NaN loss, a token
            count below 1.
    """
    c, b = np.asarray(checkpoint_nll, dtype=np.float64), np.asarray(baseline_nll, dtype=np.float64)
    t = np.asarray(tokens, dtype=np.float64)
    for name, arr in (("checkpoint_nll", c), ("baseline_nll", b)):
        if arr.size and (np.isnan(arr).any() or (arr < 0).any()):
            raise ValueError(f"perplexity_ratio: {name} must be summed losses >= 0 (nats), without NaN")
    if t.size and (t < 1).any():
        raise ValueError("perplexity_ratio: every prompt needs at least one scored token")
    return paired_bootstrap(_perplexity_ratio, c, b, t, seed=seed, resamples=resamples, level=level)


def _perplexity(nll: np.ndarray, tokens: np.ndarray) -> float:
    return float(np.exp(nll.sum() / tokens.sum()))


def perplexity(nll: Sequence[float], tokens: Sequence[int], *, seed: int, resamples: int = RESAMPLES,
               level: float = LEVEL) -> Estimate:
    """One model's perplexity on the true continuations, ``exp(sum_i L_i / sum_i T_i)``, with its
    interval (``L_i``, ``T_i`` as in :func:`perplexity_ratio`).

    Raises:
        NoPrompts: no prompts. ValueError: different lengths, a negative or NaN loss, a token
            count below 1.
    """
    losses, t = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    if losses.size and (np.isnan(losses).any() or (losses < 0).any()):
        raise ValueError("perplexity: losses must be summed losses >= 0 (nats), without NaN")
    if t.size and (t < 1).any():
        raise ValueError("perplexity: every prompt needs at least one scored token")
    return paired_bootstrap(_perplexity, losses, t, seed=seed, resamples=resamples, level=level)
