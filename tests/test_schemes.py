"""Comparison schemes (stages/schemes.py) on hand-written judges with a known order: call
counts against their formulas, the true best and worst found, ties and unparsable answers."""

import math
import random

import pytest

from stages.schemes import SCHEMES, Draws, drive, run_scheme, scheme_calls


def draws(n: int, seed: int = 0) -> Draws:
    return Draws(seed, f"pair-{n}", tuple(f"candidate {i}" for i in range(n)))


def soft_judge(strength):
    """Noiseless Bradley-Terry judge: P(first better) = sigmoid(strength difference)."""
    return lambda comparisons: [1 / (1 + math.exp(strength[b] - strength[a])) for a, b in comparisons]


def hard_judge(strength):
    """Noiseless verdicts: 1 when the first shown is better, else 0."""
    return lambda comparisons: [1.0 if strength[a] > strength[b] else 0.0 for a, b in comparisons]


def noisy_judge(seed):
    rng = random.Random(seed)
    return lambda comparisons: [rng.choice([0.0, 0.3, 0.5, 0.9, 1.0, None]) for _ in comparisons]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("both", [True, False])
def test_comparison_counts_match_the_formula_for_k_2_to_18(scheme, both):
    for n in range(2, 19):
        for judge in (soft_judge(list(range(n))), noisy_judge(n)):
            _, made = drive(run_scheme(scheme, n, draws(n), both, degree=4), judge)
            if scheme == "adaptive":  # its second round depends on the first: the formula bounds it
                assert scheme_calls("sparse_bt", n, both, 4) <= len(made) <= scheme_calls(scheme, n, both, 4), n
            else:
                assert len(made) == scheme_calls(scheme, n, both, degree=4), (scheme, n)
            pairs = {(min(a, b), max(a, b)) for a, b in made}
            assert len(pairs) == len(made) // (2 if both else 1)  # no pair judged twice in one order
            if both:
                assert all((b, a) in made for a, b in made)
    # The budget at K = 17: all-pairs in both orders is 272 calls.
    assert scheme_calls("all_pairs", 17, True, 4) == 272
    assert scheme_calls("tournament", 17, True, 4) == 48 and scheme_calls("sparse_bt", 17, True, 4) == 68
    assert scheme_calls("adaptive", 17, True, 3) == 64


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("both", [True, False])
def test_a_noiseless_judge_makes_every_scheme_pick_the_true_best_and_worst(scheme, both):
    for n in range(2, 19):
        for trial in range(5):
            strength = list(range(n))
            random.Random(trial * 100 + n).shuffle(strength)
            scores, _ = drive(run_scheme(scheme, n, draws(n, trial), both, degree=4), soft_judge(strength))
            assert scores.index(max(scores)) == strength.index(n - 1), (scheme, n, trial)
            assert scores.index(min(scores)) == strength.index(0), (scheme, n, trial)
            if scheme in ("all_pairs", "tournament"):  # exact with hard verdicts too
                scores, _ = drive(run_scheme(scheme, n, draws(n, trial), both, degree=4), hard_judge(strength))
                assert scores.index(max(scores)) == strength.index(n - 1) and scores.index(min(scores)) == strength.index(0)


def test_schemes_repeat_exactly_from_the_seed_and_differ_across_seeds():
    judge = soft_judge([3, 1, 4, 1.5, 5, 9, 2, 6])
    for scheme in SCHEMES:
        first = drive(run_scheme(scheme, 8, draws(8, seed=1), False, 4), judge)
        assert drive(run_scheme(scheme, 8, draws(8, seed=1), False, 4), judge) == first
    made = {drive(run_scheme("tournament", 8, draws(8, seed=s), False, 4), judge)[1].__repr__() for s in range(6)}
    assert len(made) > 1  # the seating is drawn from the seed


def test_unparsable_comparisons_are_left_out_and_a_candidate_without_any_has_no_score():
    for scheme in SCHEMES:
        scores, made = drive(run_scheme(scheme, 5, draws(5), True, 4), lambda comparisons: [None] * len(comparisons))
        assert scores == [None] * 5
        assert len(made) == scheme_calls(scheme, 5, True, 4)
    # all-pairs: one unparsable order of a pair leaves the other order's outcome.
    answers = {(0, 1): 1.0, (1, 0): None, (0, 2): 0.5, (2, 0): 0.5, (1, 2): 0.0, (2, 1): 1.0}
    scores, _ = drive(run_scheme("all_pairs", 3, draws(3), True, 4), lambda cs: [answers[c] for c in cs])
    assert scores == [pytest.approx((1.0 + 0.5) / 2), pytest.approx((0.0 + 0.0) / 2), pytest.approx((0.5 + 1.0) / 2)]


def test_ties_count_half_and_a_tied_match_is_decided_by_a_seeded_coin():
    scores, made = drive(run_scheme("all_pairs", 4, draws(4), False, 4), lambda cs: [0.5] * len(cs))
    assert scores == [0.5] * 4
    for seed in range(4):  # every match tied: the coin decides, and best and worst still differ
        scores, made = drive(run_scheme("tournament", 6, draws(6, seed), True, 4), lambda cs: [0.5] * len(cs))
        assert sorted(scores)[0] == 0.0 and sorted(scores)[-1] == 1.0 and scores.count(1.0) == scores.count(0.0) == 1
    # sparse_bt: equal outcomes, equal scores.
    scores, _ = drive(run_scheme("sparse_bt", 9, draws(9), False, 4), lambda cs: [0.5] * len(cs))
    assert max(scores) - min(scores) < 1e-9


def test_pivot_compares_every_candidate_with_the_original_only():
    scores, made = drive(run_scheme("pivot", 5, draws(5), True, 4), soft_judge([0, 1, -1, 2, 0.5]))
    assert {min(a, b) for a, b in made} == {0} and scores[0] == 0.5
    assert scores[3] > scores[1] > scores[4] > scores[0] > scores[2]


def test_a_judge_with_a_cycle_never_makes_one_candidate_both_best_and_worst():
    # a > b, b > c, c > a: whoever sits out round one may win the upper bracket and lose the lower.
    beats = {(0, 1), (1, 2), (2, 0)}
    for seed in range(12):
        scores, _ = drive(run_scheme("tournament", 3, draws(3, seed), False, 4),
                          lambda cs: [1.0 if (a, b) in beats else 0.0 for a, b in cs])
        assert scores.count(1.0) == 1 and scores.count(0.0) == 1
