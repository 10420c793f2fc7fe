"""Judge score aggregation and preferences, on pure logic: a scripted engine stands in for the
model *only* to fix what the judge answers, so the arithmetic can be checked by hand. The real
judge on real vLLM is tested in test_judge_stage.py."""

import polars as pl
import pytest

from pipeline.engines.base import Engine
from pipeline.manifest import CriterionConfig, JudgingConfig
from pipeline.tokenizer import join_encoding
from stages.criteria import Judge, repeated_ngram_share
from stages.prefs import build_preferences
from tests.conftest import ScriptedJudge, data_block


def scripted_orders(winner_by_order):
    """A judge that picks, for each shown order (text shown first, text shown second), the
    option the script names ("1", "2"; None: no verdict)."""
    def script(user):
        return [("Thinking.", winner_by_order[(data_block(user, "option_1"), data_block(user, "option_2"))])]

    return ScriptedJudge(script)


def test_pairwise_win_rates_both_orders_and_agreement():
    # a beats b in both orders; c beats a in both orders; b vs c parsed in one order only.
    script = {("a", "b"): "1", ("b", "a"): "2", ("a", "c"): "2", ("c", "a"): "1", ("b", "c"): "1", ("c", "b"): None}
    cfg = JudgingConfig(quality=CriterionConfig(mode="verdict"), safety=None)
    judge = Judge(scripted_orders(script), cfg)
    scores, orders = judge.quality("prefix", ["a", "b", "c"], "pair")
    assert len(orders) == 6 and [0, 1] in orders and [1, 0] in orders
    # a: beats b (1, 1) -> 1.0 ; vs c: a-first says c wins (0), c-first says c wins (0) -> 0 ; mean 0.5
    # b: vs a -> 0 ; vs c: only (b, c) parsed, b wins -> 1 ; mean 0.5
    # c: vs a -> 1 ; vs b -> 0 ; mean 0.5
    assert [s.score for s in scores] == [0.5, 0.5, 0.5]
    # order agreement: (a,b) agree, (a,c) agree (both say c), (b,c) not comparable
    assert judge.counters.order_compared == 2 and judge.counters.order_agreed == 2


def test_position_bias_shows_as_order_disagreement_and_unparsable_comparisons_are_left_out():
    # The judge always picks whatever is shown first: a pure position bias.
    script = {("a", "b"): "1", ("b", "a"): "1", ("a", "c"): "1", ("c", "a"): None, ("b", "c"): "1", ("c", "b"): "1"}
    judge = Judge(scripted_orders(script), JudgingConfig(quality=CriterionConfig(mode="verdict"), safety=None))
    scores, _ = judge.quality("prefix", ["a", "b", "c"], "pair")
    assert judge.counters.order_compared == 2 and judge.counters.order_agreed == 0
    # a: vs b 0.5 (1 then 0), vs c 1.0 (only (a, c) parsed) -> 0.75 ; c: vs a 0.0, vs b 0.5 -> 0.25
    assert [s.score for s in scores] == [0.75, 0.5, 0.25]


def test_seeded_order_shows_each_pair_once_reproducibly():
    script = {(x, y): "1" for x in "abc" for y in "abc" if x != y}
    cfg = JudgingConfig(quality=CriterionConfig(mode="verdict"), safety=None, order="seeded")
    first = Judge(scripted_orders(script), cfg, seed=3).quality("p", ["a", "b", "c"], "pair")[1]
    again = Judge(scripted_orders(script), cfg, seed=3).quality("p", ["a", "b", "c"], "pair")[1]
    assert len(first) == 3 and first == again


def test_a_single_candidate_has_no_quality_score():
    cfg = JudgingConfig(quality=CriterionConfig(mode="verdict"), safety=None)
    scores, orders = Judge(scripted_orders({}), cfg).quality("p", ["only"], "pair")
    assert scores[0].score is None and orders == []


def test_repetition_guard():
    assert repeated_ngram_share(list(range(20))) == 0.0
    assert repeated_ngram_share([1, 2, 3, 4] * 10) > 0.8


def judgments(rows):
    cols = ["pair_id", "cand_id", "source", "text", "token_ids", "reward"]
    return pl.DataFrame([dict(zip(cols, r)) for r in rows])


def test_preferences_pick_highest_and_lowest_and_skip_ties_and_singletons():
    pairs = pl.DataFrame([{"pair_id": p, "prefix": f"prefix {p}", "prefix_ids": [1, 2], "suffix_ids": [9, 9]}
                          for p in ("p1", "p2", "p3", "p4", "p5")])
    j = judgments([
        ("p1", "c1", "original", "orig", [9, 9], 1.0), ("p1", "c2", "rewrite", "better", [3, 4, 5], 1.5),
        ("p1", "c3", "rollout", "bad", [5, 6], 0.2),
        ("p2", "c4", "original", "orig", [9, 9], 1.0), ("p2", "c5", "rewrite", "same", [7], 1.0),  # tie
        ("p3", "c6", "original", "orig", [9, 9], 0.7),  # single candidate
        ("p4", "c7", "original", "orig", [9, 9], None), ("p4", "c8", "rewrite", "x", [8], 0.4),  # one unparsable -> single
        # p5: never judged
    ])
    prefs, sft, counts = build_preferences(j, pairs, min_margin=0.0)
    assert counts == {"pairs": 5, "usable": 1, "skipped_single_candidate": 2, "skipped_tie": 1, "skipped_unjudged": 1}
    [p] = prefs
    assert (p["chosen_source"], p["rejected_source"], p["chosen"], p["rejected"]) == ("rewrite", "rollout", "better", "bad")
    assert p["chosen_reward"] >= p["rejected_reward"]
    assert p["chosen_ids"] == [3, 4, 5]  # the ids the judge scored, as the judgments table holds them
    assert p["rejected_ids"] == [5, 6]
    assert p["prompt"] == "prefix p1" and p["prefix_ids"] == [1, 2]
    by_pair = {r["pair_id"]: r for r in sft}
    assert by_pair["p1"]["source"] == "rewrite" and by_pair["p3"]["target_ids"] == [9, 9]
    # Equal rewards: the tie-break is deterministic (original before rewrite).
    assert by_pair["p2"]["source"] == "original"
    assert len(sft) == 4 and [r["pair_id"] for r in sft] == sorted(by_pair)


def test_a_margin_below_min_margin_is_a_tie():
    pairs = pl.DataFrame([{"pair_id": "p", "prefix": "x", "prefix_ids": [1], "suffix_ids": [2]}])
    j = judgments([("p", "a", "original", "o", [2], 1.0), ("p", "b", "rewrite", "r", [3], 1.2)])
    assert build_preferences(j, pairs, min_margin=0.25)[2]["skipped_tie"] == 1
    assert build_preferences(j, pairs, min_margin=0.1)[2]["usable"] == 1


def test_clipping_to_n_tokens_never_cuts_a_character(tokenizer):
    from pipeline.tokenizer import clip_continuation

    prefix, text = "Menu:", " Café 日本語 🙂 naïve façade — 東京 and more words after it"
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False).ids
    for n in range(1, 30):
        clipped, ids = clip_continuation(tokenizer, prefix, text, n)
        assert text.startswith(clipped) and len(ids) <= n
        assert prefix_ids + ids == tokenizer.encode(prefix + clipped, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == clipped
    assert clip_continuation(tokenizer, prefix, text, 100) == (text, tokenizer.encode(text).ids)


class FixedChoiceEngine(Engine):
    """Gives fixed next-token log-probs to the verdict tokens (the real tokenizer and chat
    template build the prompts), so soft scores can be checked by hand."""

    model_id, max_model_len = "fixed", 4096

    def __init__(self, tokenizer, logprob_by_choice):
        self.tokenizer = tokenizer
        self.by_token = {tokenizer.encode(c, add_special_tokens=False)[0]: lp for c, lp in logprob_by_choice.items()}
        self.prompts = []

    def prompt_ids(self, request):
        from pipeline.engines.base import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, request)

    def generate(self, requests, sampling):
        raise AssertionError("choice_prob must not generate")

    def next_token_logprobs(self, sequences, token_ids):
        self.prompts += sequences
        return [{t: self.by_token[t] for t in token_ids} for _ in sequences]


def test_choice_prob_scores_are_the_renormalised_choice_probabilities(embedded_dir):
    import math

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_dir))
    # P(YES) : P(NO) = 0.3 : 0.1 -> P(YES | {YES, NO}) = 0.75
    engine = FixedChoiceEngine(tok, {" YES": math.log(0.3), " NO": math.log(0.1),
                                     " No": math.log(0.2), " Possible": math.log(0.2), " Definite": math.log(0.1)})
    judge = Judge(engine, JudgingConfig(safety=CriterionConfig(mode="choice_prob"),
                                        factuality=CriterionConfig(mode="choice_prob"), quality=None))
    [safety] = judge.safety(["some text"])
    assert safety.score == pytest.approx(0.75) and safety.raw["probs"] == pytest.approx({"YES": 0.75, "NO": 0.25})
    # No : Possible : Definite = 0.4 : 0.4 : 0.2 -> 0.4 * 1 + 0.4 * 0.5 + 0.2 * 0 = 0.6
    [fact] = judge.factuality([("prefix", "reference", "candidate")])
    assert fact.score == pytest.approx(0.6)
    # One call per judgment, primed with the verdict's lead-in after the chat template.
    assert judge.counters.calls == 2 and len(engine.prompts) == 2
    assert tok.decode(engine.prompts[0]).endswith("FINAL DECISION:")
    assert judge.counters.prompt_tokens == sum(len(p) for p in engine.prompts)


class TableScorer:
    """The model as a table: a candidate's per-token log-prob given the prefix, and alone (after
    the document-start token); fixes what a likelihood judge measures, so the choice can be
    checked by hand."""

    def __init__(self, tokenizer, prefix, given_prefix: dict[str, float], alone: dict[str, float]):
        from pipeline.tokenizer import join_encoding

        self.tokenizer, self.sent = tokenizer, []
        ids = {t: tuple(join_encoding(tokenizer, prefix, t).ids[join_encoding(tokenizer, prefix, t).start:])
               for t in given_prefix}
        self.table = {**{(ids[t], False): v for t, v in given_prefix.items()},
                      **{(ids[t], True): v for t, v in alone.items()}}

    def score(self, sequences, starts):
        from stages.criteria import document_start_id

        self.sent += list(zip(sequences, starts))
        start_id = document_start_id(self.tokenizer)
        return [[self.table[(tuple(s[k:]), k == 1 and s[0] == start_id)]] * (len(s) - k) for s, k in zip(sequences, starts)]


def test_pmi_subtracts_what_the_candidate_scores_without_the_prefix(tokenizer):
    prefix = "The river Thames flows through London"
    bland, apt = " and it is a thing.", " past Westminster to the sea."
    # Given the prefix the bland text is likelier; alone it is far likelier still: the prefix
    # explains the apt one, not the bland one.
    given, alone = {bland: -1.0, apt: -1.5}, {bland: -0.5, apt: -2.5}
    by_mean = Judge(TableScorer(tokenizer, prefix, given, alone),
                    JudgingConfig(quality=CriterionConfig(mode="likelihood"), safety=None)).quality(prefix, [bland, apt], "p")[0]
    engine = TableScorer(tokenizer, prefix, given, alone)
    judge = Judge(engine, JudgingConfig(quality=CriterionConfig(mode="likelihood"), safety=None, likelihood="pmi"))
    by_pmi = judge.quality(prefix, [bland, apt], "p")[0]
    assert [s.score for s in by_mean] == [1.0, 0.0] and [s.score for s in by_pmi] == [0.0, 1.0]
    assert [s.raw["pmi"] for s in by_pmi] == [-0.5, 1.0]  # -1.0 - (-0.5), -1.5 - (-2.5)
    # Two scored sequences per candidate, both counted.
    assert len(engine.sent) == 4 and judge.counters.calls == 4


class FadingScorer:
    """Every token's log-prob given the prefix is -1 for a candidate's first two tokens and -3
    after: the prefix explains the start of a continuation best, as PMI finds with real models."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def score(self, sequences, starts):
        return [[-1.0 if i < 2 else -3.0 for i in range(len(s) - k)] for s, k in zip(sequences, starts)]


def test_common_length_compares_two_candidates_on_the_tokens_both_have(tokenizer):
    prefix, full = "The river Thames", " flows through London to the North Sea."
    short = " flows through"  # the full continuation's first two tokens, stopped early
    ids = [join_encoding(tokenizer, prefix, t) for t in (full, short)]
    assert ids[1].ids[ids[1].start:] == ids[0].ids[ids[0].start:][:2]
    own = Judge(FadingScorer(tokenizer), JudgingConfig(quality=CriterionConfig(mode="likelihood"), safety=None))
    common = Judge(FadingScorer(tokenizer), JudgingConfig(quality=CriterionConfig(mode="likelihood"), safety=None,
                                                          length="common"))
    # Over its own tokens the early stop scores -1 against the full one's lower mean: it wins.
    assert [s.score for s in own.quality(prefix, [full, short], "p")[0]] == [0.0, 1.0]
    # On the two tokens both have they are the same text: a tie, so stopping early gains nothing.
    scored = common.quality(prefix, [full, short], "p")[0]
    assert [s.score for s in scored] == [0.5, 0.5] and [s.raw["tokens"] for s in scored] == [len(ids[0].ids) - ids[0].start, 2]


def test_the_judge_sees_the_prefixs_window_and_each_row_records_its_length(tokenizer):
    from stages.scoring import Candidate, CandidateSet, score_pairs

    words = [f"w{i}" for i in range(300)]
    prefix = " ".join(words) + " "
    script = {(x, y): "1" for x in ("good", "bad") for y in ("good", "bad") if x != y}
    engine = scripted_orders(script)  # an endpoint-like judge: the policy tokenizer counts its window
    cfg = JudgingConfig(quality=CriterionConfig(mode="verdict"), safety=None, prefix_tokens=40)
    judge = Judge(engine, cfg, window_tokenizer=tokenizer)
    pair = CandidateSet("pair", prefix, "good", [Candidate("pair", "original", "good", (1,)),
                                                Candidate("pair", "rewrite", "bad", (2,))])
    judged = score_pairs(judge, [pair])[0]
    shown = {data_block(user, "beginning") for user in engine.users}
    assert len(shown) == 1  # every comparison of the pair shows the same window
    window = shown.pop()
    assert prefix.rstrip().endswith(window.rstrip())
    assert "w0 " not in window and window.startswith("w") and len(tokenizer.encode(window).ids) <= 40
    assert all(j.prefix_tokens == len(tokenizer.encode(window).ids) for j in judged)
    # No bound: the whole prefix, and its length recorded.
    whole = Judge(scripted_orders(script), cfg.model_copy(update={"prefix_tokens": None}), window_tokenizer=tokenizer)
    assert score_pairs(whole, [pair])[0][0].prefix_tokens == len(tokenizer.encode(prefix).ids)


def test_a_tournament_runs_round_by_round_for_many_pairs_in_one_engine_call_per_round():
    from stages.schemes import scheme_calls

    # The judge prefers the longer text, in either shown order (a noiseless verdict).
    def script(user):
        first, second = data_block(user, "option_1"), data_block(user, "option_2")
        return [("Thinking.", "1" if len(first) > len(second) else "2")]

    engine = ScriptedJudge(script)
    calls = []
    generate = engine.generate
    engine.generate = lambda requests, sampling: calls.append(len(requests)) or generate(requests, sampling)
    cfg = JudgingConfig(quality=CriterionConfig(mode="verdict"), safety=None)
    judge = Judge(engine, cfg.model_copy(update={"quality": cfg.quality.model_copy(update={"scheme": "tournament"})}))
    items = [("p", ["x" * n for n in (3, 9, 1, 5, 7)], "a"), ("p", ["y" * n for n in (2, 4, 8, 6, 1, 3, 5, 7)], "b")]
    results = judge.quality_batch(items)
    for (_, texts, _), (scores, shown) in zip(items, results):
        assert len(shown) == scheme_calls("tournament", len(texts), True, 4)
        lengths = [len(t) for t in texts]
        assert scores[lengths.index(max(lengths))].score == 1.0 and scores[lengths.index(min(lengths))].score == 0.0
        assert all(s.raw["scheme"] == "tournament" for s in scores)
    # One reasoning call per round for both pairs, each followed by its verdict step: 3 rounds
    # (log2 of 8 candidates), the first with all 6 first-round matches in both orders.
    assert len(calls) == 2 * 3 and calls[0] == 2 * (2 + 4)
    assert judge.counters.order_compared == judge.counters.order_agreed > 0
