"""The evaluation statistics against hand computations: win rates from both shown orders, and
percentile bootstrap intervals recomputed here with an explicit loop over the same draws."""

import math

import numpy as np
import pytest

from pipeline.errors import SipError
from stages.eval_stats import (
    Estimate, NoPrompts, paired_bootstrap, perplexity, perplexity_ratio, prompt_win_scores, rate, rate_difference, win_rate,
)

SEED, B = 11, 400


def percentile_by_hand(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (Hyndman & Fan definition 7)."""
    v = sorted(values)
    h = (len(v) - 1) * q
    lo = math.floor(h)
    return v[lo] + (h - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])


def bootstrap_by_hand(statistic, *columns: list[float]) -> tuple[float, float]:
    """Resample b draws n prompt indices from one generator, in order; every column takes them."""
    rng, n = np.random.default_rng(SEED), len(columns[0])
    values = []
    for _ in range(B):
        idx = [int(i) for i in rng.integers(0, n, size=n)]
        values.append(statistic(*([col[i] for i in idx] for col in columns)))
    return percentile_by_hand(values, 0.025), percentile_by_hand(values, 0.975)


def assert_estimate(est: Estimate, value: float, interval: tuple[float, float], n: int) -> None:
    assert est.value == pytest.approx(value, abs=1e-12) and est.n == n
    assert (est.low, est.high) == pytest.approx(interval, abs=1e-12)
    assert est.level == 0.95 and est.resamples == B


FIRST = ["win", "win", "tie", "loss", "tie", "loss", "win"]
SECOND = ["win", "loss", "win", "loss", "tie", "tie", "tie"]


def test_win_rate_counts_ties_half_and_each_order_half():
    # Per prompt: (first + second) / 2 with win 1, tie 1/2, loss 0; an order-inconsistent
    # prompt (win shown first, loss shown second) scores 1/2, as a tie does.
    hand = [(1 + 1) / 2, (1 + 0) / 2, (0.5 + 1) / 2, (0 + 0) / 2, (0.5 + 0.5) / 2, (0 + 0.5) / 2, (1 + 0.5) / 2]
    assert prompt_win_scores(FIRST, SECOND).tolist() == hand == [1, 0.5, 0.75, 0, 0.5, 0.25, 0.75]
    est = win_rate(FIRST, SECOND, seed=SEED, resamples=B)
    assert_estimate(est, 3.75 / 7, bootstrap_by_hand(lambda s: sum(s) / len(s), hand), 7)
    assert est.low < est.value < est.high


def test_rate_difference_resamples_prompts_in_pairs():
    checkpoint = [1, 1, 0, 1, 0.5, 1, 1, 0]
    baseline = [0, 1, 0, 0, 0.5, 1, 0, 0]
    est = rate_difference(checkpoint, baseline, seed=SEED, resamples=B)
    interval = bootstrap_by_hand(lambda c, b: sum(c) / len(c) - sum(b) / len(b), checkpoint, baseline)
    assert_estimate(est, 5.5 / 8 - 2.5 / 8, interval, 8)
    # Paired: the same prompts are drawn for both, so a model against itself differs by exactly 0.
    same = rate_difference(checkpoint, checkpoint, seed=SEED, resamples=B)
    assert (same.value, same.low, same.high) == (0, 0, 0)


def test_perplexity_ratio_is_token_weighted_and_resamples_token_counts_with_prompts():
    checkpoint, baseline, tokens = [1.0, 2.0, 3.0, 0.5, 4.0], [2.0, 2.0, 4.0, 1.5, 3.0], [2, 1, 3, 1, 4]

    def ratio(c, b, t):
        return math.exp(sum(c) / sum(t) - sum(b) / sum(t))

    est = perplexity_ratio(checkpoint, baseline, tokens, seed=SEED, resamples=B)
    assert_estimate(est, math.exp(10.5 / 11 - 12.5 / 11), bootstrap_by_hand(ratio, checkpoint, baseline, tokens), 5)
    # The percentile interval follows the monotone exp: it is exp of the loss difference's interval
    # (up to the linear interpolation between neighbouring resampled values).
    diff = paired_bootstrap(lambda c, b, t: c.sum() / t.sum() - b.sum() / t.sum(),
                            *map(np.asarray, (checkpoint, baseline, tokens)), seed=SEED, resamples=B)
    assert (est.low, est.high) == pytest.approx((math.exp(diff.low), math.exp(diff.high)), rel=1e-4)


def test_a_rate_of_two_prompts_matches_the_exact_bootstrap_distribution():
    # Resampled means of [0, 1] are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are 0 and 1 (with 2000 resamples, far more than 2.5% fall on each end).
    est = rate([0, 1], seed=SEED)
    assert (est.value, est.low, est.high, est.n, est.resamples) == (0.5, 0.0, 1.0, 2, 2000)
    assert str(est) == "0.500 [0.000, 1.000] (n=2)"
    assert est.as_dict() == {"value": 0.5, "low": 0.0, "high": 1.0, "n": 2, "level": 0.95, "resamples": 2000}


def test_a_checkpoint_against_itself_has_a_win_rate_interval_containing_one_half():
    rng = np.random.default_rng(5)
    # Identical continuations and a deterministic judge: whatever position it prefers on a prompt,
    # it prefers it in both orders, so the candidate wins one order and loses the other (or ties).
    answer = rng.choice(["first", "second", "tie"], size=200)
    first = np.where(answer == "tie", "tie", np.where(answer == "first", "win", "loss"))
    second = np.where(answer == "tie", "tie", np.where(answer == "first", "loss", "win"))
    est = win_rate(first, second, seed=SEED)
    assert (est.value, est.low, est.high) == (0.5, 0.5, 0.5) and est.contains(0.5)
    # A judge sampling at temperature: each order's verdict drawn independently, symmetrically.
    noisy = [rng.choice(["win", "loss", "tie"], size=200) for _ in range(2)]
    est = win_rate(*noisy, seed=SEED)
    assert est.contains(0.5) and est.high - est.low < 0.2
    # Swapping the roles mirrors the estimate: W(a, b) = 1 - W(b, a), interval included.
    flip = {"win": "loss", "loss": "win", "tie": "tie"}
    swapped = win_rate([flip[v] for v in FIRST], [flip[v] for v in SECOND], seed=SEED)
    original = win_rate(FIRST, SECOND, seed=SEED)
    assert (swapped.value, swapped.low, swapped.high) == pytest.approx(
        (1 - original.value, 1 - original.high, 1 - original.low), abs=1e-12)


def test_all_ties_and_a_single_prompt():
    est = win_rate(["tie"] * 9, ["tie"] * 9, seed=SEED)
    assert (est.value, est.low, est.high, est.n) == (0.5, 0.5, 0.5, 9)
    # One prompt: every resample is that prompt, the interval is the point.
    for est, value in ((win_rate(["win"], ["tie"], seed=SEED), 0.75),
                       (rate_difference([1.0], [0.0], seed=SEED), 1.0),
                       (perplexity_ratio([2.0], [4.0], [2], seed=SEED), math.exp(-1.0))):
        assert (est.value, est.low, est.high, est.n) == pytest.approx((value, value, value, 1))


@pytest.mark.parametrize("call", [
    lambda: win_rate([], [], seed=0),
    lambda: rate([], seed=0),
    lambda: rate_difference([], [], seed=0),
    lambda: perplexity_ratio([], [], [], seed=0),
])
def test_no_prompts_is_a_clear_error(call):
    with pytest.raises(NoPrompts, match="no prompts to evaluate") as err:
        call()
    assert isinstance(err.value, ValueError) and isinstance(err.value, SipError)


@pytest.mark.parametrize("call, message", [
    (lambda: win_rate(["win"], ["win", "tie"], seed=0), r"both orders .* 1 shown first, 2 shown second"),
    (lambda: win_rate(["won"], ["win"], seed=0), r"unknown verdict\(s\) \['won'\]"),
    (lambda: rate_difference([1, 0], [1], seed=0), r"differ in length \[1, 2\]"),
    (lambda: rate([0.5, float("nan")], seed=0), r"rate: per-prompt scores must lie in \[0, 1\]"),
    (lambda: rate_difference([1.5], [1], seed=0), r"checkpoint: per-prompt scores must lie in \[0, 1\]"),
    (lambda: perplexity_ratio([1.0], [-1.0], [3], seed=0), r"baseline_nll must be summed losses >= 0"),
    (lambda: perplexity_ratio([1.0], [1.0], [0], seed=0), r"at least one scored token"),
    (lambda: rate([[0.5]], seed=0), r"one-dimensional"),
    (lambda: rate([0.5], seed=0, level=95), r"level in \(0, 1\)"),
    (lambda: win_rate([1.2], [0.5], seed=0), r"numeric verdict must lie in \[0, 1\]"),
    (lambda: win_rate([float("nan")], [0.5], seed=0), r"numeric verdict must lie in \[0, 1\]"),
    (lambda: perplexity([1.0], [0], seed=0), r"at least one scored token"),
])
def test_malformed_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_soft_verdicts_count_as_their_probability_beside_hard_ones():
    # A choice_prob judge's probability that the candidate is better, in each order; a hard verdict beside it.
    assert prompt_win_scores([0.8, 1.0, 0.0], [0.6, "tie", 0.5]).tolist() == [0.7, 0.75, 0.25]
    est = win_rate([0.8, 1.0, 0.0], [0.6, "tie", 0.5], seed=SEED, resamples=B)
    assert est.value == pytest.approx((0.7 + 0.75 + 0.25) / 3)


def test_perplexity_is_token_weighted_and_its_interval_that_of_the_resampled_prompts():
    nll, tokens = [2.0, 9.0, 4.0], [2, 3, 4]
    est = perplexity(nll, tokens, seed=SEED, resamples=B)
    assert est.value == pytest.approx(math.exp(15.0 / 9))  # not the mean of per-prompt perplexities
    rng, values = np.random.default_rng(SEED), []
    for _ in range(B):
        idx = rng.integers(0, 3, size=3)
        values.append(math.exp(sum(nll[i] for i in idx) / sum(tokens[i] for i in idx)))
    assert (est.low, est.high) == pytest.approx((percentile_by_hand(values, 0.025), percentile_by_hand(values, 0.975)))
