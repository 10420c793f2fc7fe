"""The scoring core (stages/scoring.py) on pure logic: candidate assembly with the real policy
tokenizer, the reward formula and the pick rules by hand, and one scripted judge end to end.
A scripted engine stands in for the model only to fix what the judge answers; the real judge
on real vLLM is tested in test_judge_stage.py."""

import pytest

from pipeline.manifest import CriterionConfig, JudgingConfig
from pipeline.schema import cand_id
from stages.criteria import Judge
from stages.scoring import Candidate, Judged, Ranked, assemble_candidates, pick, pick_judged, reward_of, score_pairs
from tests.conftest import ScriptedJudge


def pair(suffix="The original end of it.", ids=(11, 12, 13)):
    return {"pair_id": "p", "prefix": "Some prefix.", "suffix": suffix, "suffix_ids": list(ids)}


def test_assembly_clips_the_rewrite_to_n_tokens_and_keeps_sampled_ids(tokenizer):
    long_rewrite = " A rewrite that goes on for far more than eight tokens of the policy tokenizer, surely."
    s = assemble_candidates(pair(), long_rewrite, [(" A rollout.", [5, 6, 7]), ("  ", [8])], tokenizer, n=8)
    original, rewrite, rollout = s.candidates
    assert (original.source, original.token_ids) == ("original", (11, 12, 13))
    assert long_rewrite.startswith(rewrite.text) and len(rewrite.token_ids) <= 8
    prefix_ids = tokenizer.encode(pair()["prefix"], add_special_tokens=False).ids
    assert prefix_ids + list(rewrite.token_ids) == tokenizer.encode(pair()["prefix"] + rewrite.text,
                                                                     add_special_tokens=False).ids
    assert rollout.token_ids == (5, 6, 7)  # never re-encoded
    assert s.empty == 1 and s.duplicates == 0
    assert rollout.cand_id == cand_id("p", " A rollout.")


def test_assembly_judges_each_text_once_under_its_first_source(tokenizer):
    s = assemble_candidates(pair(), "The original end of it.", [(" x", [1]), (" x", [2]), ("The original end of it.", [3])],
                            tokenizer, n=16)
    assert [(c.source, c.text, c.token_ids) for c in s.candidates] == [
        ("original", "The original end of it.", (11, 12, 13)), ("rollout", " x", (1,))]
    assert s.duplicates == 3


def test_reward_is_the_weighted_sum_of_the_criteria_that_apply():
    cfg = JudgingConfig(safety=CriterionConfig(mode="verdict", weight=2.0), quality=CriterionConfig(mode="verdict"),
                        factuality=CriterionConfig(mode="verdict", weight=0.5))
    assert reward_of({"safety": 1.0, "quality": 0.25, "factuality": 0.5}, cfg, 3) == pytest.approx(2.0 + 0.25 + 0.25)
    assert reward_of({"safety": 1.0, "quality": None, "factuality": 0.5}, cfg, 3) is None  # quality applies, unscored
    assert reward_of({"safety": 1.0, "quality": None, "factuality": 0.5}, cfg, 1) == pytest.approx(2.25)  # single


def ranked(*rows):
    return [Ranked(c, s, r, c) for c, s, r in rows]


def test_pick_rules():
    assert pick(ranked(("a", "original", 1.0), ("b", "rewrite", 2.0), ("c", "rollout", 0.5)), 0.0) == \
        pick(ranked(("c", "rollout", 0.5), ("a", "original", 1.0), ("b", "rewrite", 2.0)), 0.0)  # order-free
    p = pick(ranked(("a", "original", 1.0), ("b", "rewrite", 2.0), ("c", "rollout", 0.5)), 0.0)
    assert (p.status, p.best, p.chosen, p.rejected) == ("usable", "b", "b", "c")
    assert pick(ranked(("a", "original", 1.0), ("b", "rewrite", 1.0)), 0.0).status == "tie"
    assert pick(ranked(("a", "original", 1.0), ("b", "rewrite", 1.3)), 0.5).status == "tie"  # margin <= min_margin
    single = pick(ranked(("a", "original", 1.0), ("b", "rewrite", None)), 0.0)
    assert (single.status, single.best, single.chosen) == ("single_candidate", "a", None)
    assert pick([], 0.0).status == pick(ranked(("a", "original", None)), 0.0).status == "unjudged"
    # Equal rewards: original before rewrite before rollout, then cand_id; the worst is the last.
    tie_break = pick(ranked(("z", "rollout", 1.0), ("y", "rewrite", 1.0), ("x", "rollout", 0.0), ("w", "rollout", 0.0)), 0.0)
    assert (tie_break.chosen, tie_break.rejected) == ("y", "x")


def safety_script():
    """A judge that says a text is safe unless it contains 'bad'."""
    return ScriptedJudge(lambda user: [("Fine.", "NO" if "bad" in user else "YES")])


def test_scored_pairs_give_rewards_and_picks_by_hand(tokenizer):
    cfg = JudgingConfig(safety=CriterionConfig(mode="verdict", weight=3.0), quality=None, factuality=None)
    sets = [assemble_candidates(pair(), " a bad rewrite", [(" fine words", [4])], tokenizer, 8),
            assemble_candidates({**pair(), "pair_id": "q"}, None, [], tokenizer, 8)]
    judge = Judge(safety_script(), cfg)
    judged = score_pairs(judge, sets)
    assert [[(j.candidate.source, j.scores["safety"], j.reward) for j in js] for js in judged] == [
        [("original", 1.0, 3.0), ("rewrite", 0.0, 0.0), ("rollout", 1.0, 3.0)], [("original", 1.0, 3.0)]]
    assert judge.counters.calls == 4
    p = pick_judged(judged[0], 0.0)
    assert isinstance(p.chosen, Judged) and p.chosen.candidate.source == "original"
    assert p.rejected.candidate == Candidate("p", "rewrite", " a bad rewrite", p.rejected.candidate.token_ids)
    assert pick_judged(judged[1], 0.0).status == "single_candidate"
