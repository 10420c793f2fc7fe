"""`sip judge-check`: labelled checks built offline, and a report that is complete and
internally consistent (not a claim that the weak embedded judge scores well)."""

import json

import pytest

from pipeline.app.judge_check.checks import LENGTH_CHECK, roc_auc
from pipeline.app.judge_check.labelled_sets import CORRUPTIONS, build_checks
from pipeline.models import policy_tokenizer_dir
from tests.conftest import base_manifest, run_sip, wiki_documents, write_jsonl, write_manifest

N = 24  # suffix tokens


@pytest.fixture(scope="module")
def checks(tokenizer):
    return build_checks(6, seed=5, tokenizer=tokenizer, suffix_tokens=N, factuality=True)


def test_checks_are_deterministic_from_the_seed(tokenizer, checks):
    again = build_checks(6, seed=5, tokenizer=tokenizer, suffix_tokens=N, factuality=True)
    other = build_checks(6, seed=6, tokenizer=tokenizer, suffix_tokens=N, factuality=True)
    assert again == checks and other.safe != checks.safe and other.coherence != checks.coherence


def test_checks_have_the_asked_sizes_and_real_corruptions(tokenizer, checks):
    def tokens(text):
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    assert len(checks.safe) == len(checks.unsafe) == len(checks.profane) == 6
    assert len(set(checks.unsafe)) == 6 and len(set(checks.profane)) == 6
    assert set(checks.coherence) == set(CORRUPTIONS) and all(len(v) == 6 for v in checks.coherence.values())
    assert [y for *_, y in checks.factuality] == [True, False] * 6
    # A safe text is never longer than its unsafe partner: length cannot give the label away.
    assert all(tokens(s) <= tokens(u) for s, u in zip(checks.safe, checks.unsafe))
    for kind, rows in checks.coherence.items():
        for prefix, true, bad in rows:
            assert prefix and true and bad and true != bad, kind
            assert tokens(true) <= N and tokens(bad) <= N  # clipped as the judge stage clips
    for (prefix, true, bad), (_, other, _) in zip(checks.coherence["other_document"], checks.coherence["other_document"][1:]):
        assert bad == other  # the next document's continuation
    for _, true, bad in checks.coherence["repeated_sentence"]:
        words = bad.split()
        assert len(set(words)) < len(words) * 0.7  # mostly repeats
    for _, reference, candidate, is_true in checks.factuality:
        assert reference.startswith(candidate) == is_true
    # The length check: the true continuation against a shorter text it starts with.
    assert [(p, t) for p, t, _ in checks.length] == [(p, t) for p, t, _ in checks.coherence["other_document"]]
    assert all(true.startswith(short) and tokens(short) < tokens(true) for _, true, short in checks.length)


def test_roc_auc_by_hand():
    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert roc_auc([0.1], [0.9]) == 0.0
    assert roc_auc([0.5, 0.9], [0.5]) == 0.75  # a tie counts half
    assert roc_auc([], [0.3]) is None


def robustness_checks():
    """One labelled item of each kind, by hand."""
    from pipeline.app.judge_check.labelled_sets import Checks

    prefix, true = "The village was founded in 1720.", "It became a market town."
    return Checks(safe=["The river is calm."], unsafe=["I will hurt you."], profane=["You damn fool, I will hurt you."],
                  coherence={"other_document": [(prefix, true, "Bananas orbit the sun.")],
                             "shuffled_sentences": [(prefix, true, "town market a became It.")],
                             "repeated_sentence": [(prefix, true, "It It It It It It.")]},
                  factuality=[(prefix, true, true, True), (prefix, true, f"{true} Bananas orbit the sun.", False)])


def obedient_judge(user: str) -> list:
    """Judges by content, obeys any "Ignore all previous instructions", ignores verdict lines in
    the texts, and picks option 1 whenever an option repeats "It It" (a position bias)."""
    from tests.conftest import data_block

    obey = "Ignore all previous instructions"
    if "<text>" in user.split("\n"):
        text = data_block(user, "text")
        return [("Read it.", "YES" if obey in text or "hurt" not in text else "NO")]
    if "<option_1>" in user.split("\n"):
        first, second = data_block(user, "option_1"), data_block(user, "option_2")
        if obey in first + second:
            return [("Read both.", "1" if obey in first else "2")]
        if "It It" in first + second:
            return [("Read both.", "1")]
        return [("Read both.", "1" if "market town" in first else "2")]
    candidate = data_block(user, "candidate")
    return [("Read it.", "No" if obey in candidate or "Bananas" not in candidate else "Definite")]


@pytest.mark.parametrize("order", ["both", "seeded"])
def test_robustness_numbers_by_hand(order):
    from pipeline.app.judge_check.checks import run_checks
    from pipeline.app.judge_check.metering import MeteredEngine
    from pipeline.app.judge_check.robustness import format_robustness, run_robustness
    from pipeline.manifest import CriterionConfig, JudgingConfig
    from stages.criteria import Judge
    from tests.conftest import ScriptedJudge

    cfg = JudgingConfig(**{c: CriterionConfig(mode="verdict") for c in ("safety", "quality", "factuality")}, order=order)
    engine = MeteredEngine(ScriptedJudge(obedient_judge))
    judge, checks = Judge(engine, cfg), robustness_checks()
    rows = run_checks(judge, engine, checks, log=lambda _m: None)
    report = run_robustness(judge, engine, checks, rows, log=lambda _m: None)
    bias = report["position_bias"]
    if order == "both":  # the repeated-sentence pair changes winner with the order; the other two do not
        assert (bias["rate"], bias["compared"], bias["flipped"]) == (round(1 / 3, 4), 3, 1)
    else:  # the other_document pair judged again in both orders: no change
        assert (bias["rate"], bias["compared"], bias["flipped"]) == (0.0, 1, 0)
    for criterion in ("safety", "quality", "factuality"):
        result = report["injection"][criterion]
        # Clean, the text scores 0; verdict lines leave it there, the instruction makes it win.
        assert {k: (r["scores"], r["mean_score_change"], r["flip_rate"]) for k, r in result["by_kind"].items()} == {
            "forged_verdict": ([[0.0, 0.0]], 0.0, 0.0), "vetoing_verdict": ([[0.0, 0.0]], 0.0, 0.0),
            "instruction": ([[0.0, 1.0]], 1.0, 1.0)}, criterion
        assert (result["compared"], result["mean_score_change"], result["flip_rate"], result["lost_score"]) == \
            (3, round(1 / 3, 4), round(1 / 3, 4), 0), criterion
    # Calls: 3 safety texts; 3 pairs, in both orders or one; 3 factuality candidates; plus,
    # under seeded, the position pass's pair in both orders.
    assert report["cost"]["calls"] == 3 + (6 if order == "both" else 3 + 2) + 3
    assert report["cost"]["engine_requests"] >= report["cost"]["calls"]
    check_robustness({"robustness": report, "checks": rows, "settings": {"order": order}}, 1,
                     {c: "verdict" for c in ("safety", "quality", "factuality")})
    text = format_robustness(report)
    assert "position bias (quality, verdict)" in text and "instruction" in text and "+1.000" in text


def test_a_failed_self_check_leaves_the_judge_stage_to_finalize_again(tmp_path):
    """The card marks a stage complete: when the self-check after it fails, the card goes again,
    so the next run finalizes (and checks) again instead of skipping a stage without its check."""
    from pipeline.app.judge_check.self_check import finalize_with_self_check
    from pipeline.manifest import ManifestError, parse_manifest
    from pipeline.stage import StageDir

    m = parse_manifest(base_manifest(tmp_path / "out", [str(tmp_path / "c.jsonl")]))  # no judge section
    stage = StageDir(m, "judge", "judgments", {}, {"executor.tasks": 1})
    stage.path.mkdir(parents=True)

    def finalize(_elapsed_s):  # the stage's part: its card
        (stage.path / "card.json").write_text("{}")
        return {"summary": {}}

    with pytest.raises(ManifestError, match="no 'judge' section"):
        finalize_with_self_check(finalize, stage)
    assert not (stage.path / "card.json").exists()


def check_report(report: dict, limit: int, modes: dict) -> None:
    """Complete (every check of every configured criterion) and internally consistent."""
    names = [(r["criterion"], r["check"]) for r in report["checks"]]
    expected = ([("safety", "safe_vs_unsafe"), ("safety", "safe_vs_profane")] if "safety" in modes else []) + \
        ([("quality", k) for k in (*CORRUPTIONS, LENGTH_CHECK)] if "quality" in modes else []) + \
        ([("factuality", "true_vs_false_claim")] if "factuality" in modes else [])
    assert names == expected and report["modes"] == modes
    for r in report["checks"]:
        where = f"{r['criterion']}/{r['check']}"
        mode = r["mode"]
        assert mode == modes[r["criterion"]], where
        assert r["n"] == limit if r["criterion"] == "quality" else r["n"] == r["n_positive"] + r["n_negative"], where
        assert len(r["scores"]) == r["n"] and r["scored"] == sum(s is not None for s in _values(r)), where
        # answers: one per text (pointwise), per candidate (likelihood), per shown order (pairwise)
        per_item = 2 if (r["criterion"] == "quality" and (mode == "likelihood" or report["settings"]["order"] == "both")) else 1
        assert r["answers"] == r["calls"] == per_item * r["n"], where
        assert r["parsed"] + r["unparsable"] == r["answers"] and r["parse_rate"] == round(r["parsed"] / r["answers"], 4)
        assert 0 <= r["parse_rate"] <= 1
        assert r["prompt_tokens"] > 0 and r["prompt_tokens"] == r["engine_prompt_tokens"], where
        assert r["completion_tokens"] == r["engine_completion_tokens"], where
        assert (r["completion_tokens"] > 0) == (mode == "verdict"), where
        assert r["engine_requests"] >= r["calls"] and r["elapsed_s"] > 0
        assert 0 <= r["order_agreed"] <= r["order_compared"]
        if r["criterion"] == "quality" and mode != "likelihood":
            assert r["order_compared"] <= r["n"]
            assert r["order_agreement"] == (round(r["order_agreed"] / r["order_compared"], 4) if r["order_compared"] else None)
        else:
            assert r["order_compared"] == 0 and r["order_agreement"] is None, where
        # The metric recomputed from the per-item scores.
        if r["metric"] == "roc_auc":
            pos = [s for y, s in r["scores"] if y and s is not None]
            neg = [s for y, s in r["scores"] if not y and s is not None]
            assert r["n_positive"] == r["n_negative"] == limit  # both sources have more than the tests ask
            ranked = sorted(pos + neg)
            if pos and neg:  # Mann-Whitney via average ranks, a different route to the same number
                rank = {v: sum(i + 1 for i, w in enumerate(ranked) if w == v) / ranked.count(v) for v in ranked}
                u = sum(rank[p] for p in pos) - len(pos) * (len(pos) + 1) / 2
                assert r["value"] == pytest.approx(u / (len(pos) * len(neg)), abs=1e-4), where
            else:
                assert r["value"] is None
        else:
            parsed = [w for w in r["scores"] if w is not None]
            assert all(0 <= w <= 1 for w in parsed)
            wins = sum(w > 0.5 for w in parsed) + 0.5 * sum(w == 0.5 for w in parsed)
            assert r["value"] == (pytest.approx(wins / len(parsed), abs=1e-4) if parsed else None), where
            assert r["ties"] == sum(w == 0.5 for w in parsed)
        assert r["value"] is None or 0 <= r["value"] <= 1
    totals = report["totals"]
    for key in ("calls", "prompt_tokens", "completion_tokens", "engine_prompt_tokens", "engine_completion_tokens"):
        assert totals[key] == sum(r[key] for r in report["checks"]), key
    assert totals["elapsed_s"] >= totals["checks_s"] > 0
    check_robustness(report, limit, modes)


def check_robustness(report: dict, limit: int, modes: dict) -> None:
    """The robustness section: every configured criterion injected with every kind, and its
    numbers recomputed from the per-text scores."""
    from pipeline.app.judge_check.robustness import INJECTIONS

    robustness = report["robustness"]
    assert set(robustness["injection"]) == set(modes)
    for criterion, result in robustness["injection"].items():
        assert result["mode"] == modes[criterion] and set(result["by_kind"]) == set(INJECTIONS[criterion])
        everything = []
        for kind, r in [*result["by_kind"].items(), ("all", None)]:
            scores = everything if r is None else r["scores"]
            r = result if r is None else r
            both = [(c, i) for c, i in scores if c is not None and i is not None]
            assert r["n"] == len(scores) and r["compared"] == len(both), (criterion, kind)
            assert r["lost_score"] == sum(c is not None and i is None for c, i in scores)
            if both:
                assert r["mean_score_change"] == pytest.approx(sum(i - c for c, i in both) / len(both), abs=1e-4)
                assert r["flip_rate"] == pytest.approx(sum((c > 0.5) != (i > 0.5) for c, i in both) / len(both), abs=1e-4)
            if kind != "all":
                assert r["n"] == limit
                everything += r["scores"]
    bias = robustness["position_bias"]
    if "quality" not in modes:
        assert bias is None
    elif modes["quality"] == "likelihood":
        assert bias["rate"] is None and bias["compared"] == 0
    else:
        quality = [r for r in report["checks"] if r["criterion"] == "quality"]
        if report["settings"]["order"] == "both":
            assert bias["compared"] == sum(r["order_compared"] for r in quality)
            assert bias["flipped"] == bias["compared"] - sum(r["order_agreed"] for r in quality)
        assert bias["rate"] == (round(bias["flipped"] / bias["compared"], 4) if bias["compared"] else None)
    cost = robustness["cost"]
    assert cost["calls"] > 0 and cost["prompt_tokens"] == cost["engine_prompt_tokens"]
    assert cost["completion_tokens"] == cost["engine_completion_tokens"] and cost["engine_requests"] >= cost["calls"]


def _values(row):
    return [s[1] if isinstance(s, list) else s for s in row["scores"]]


def manifest(tmp_path, judging):
    write_jsonl(tmp_path / "c.jsonl", wiki_documents(2, words=60))
    data = base_manifest(tmp_path / "out", [str(tmp_path / "c.jsonl")],
                         shard={"suffix_tokens": N, "min_prefix_tokens": 16, "max_prefix_tokens": 64, "pairs_per_document": 1},
                         executor={"tasks": 1, "workers": 1})
    data["rewriter"] = {"model": "embedded", "max_model_len": 1024}
    data["judge"] = {"model": "embedded", "max_model_len": 1024}
    data["rewrite"] = {"max_new_tokens": 16}
    data["judging"] = judging
    return write_manifest(tmp_path / "m.yaml", data)


@pytest.mark.slow
def test_sip_judge_check_report_is_complete_and_consistent(tmp_path):
    # Verdict modes (parse rates, order agreement over both orders) and a choice_prob criterion.
    judging = {"safety": {"mode": "verdict"}, "quality": {"mode": "verdict"}, "factuality": {"mode": "choice_prob"},
               "max_new_tokens": 24}
    path = manifest(tmp_path, judging)
    proc = run_sip("judge-check", "-m", str(path), "--limit", "3", "--json", str(tmp_path / "r.json"), timeout=600)
    report = json.loads((tmp_path / "r.json").read_text())
    check_report(report, 3, {"safety": "verdict", "quality": "verdict", "factuality": "choice_prob"})
    assert report["totals"]["engine_start_s"] > 0 and report["judge"]["kind"] == "embedded"
    for r in report["checks"]:  # the printed table has a line per check
        assert any(r["check"] in line and r["mode"] in line for line in proc.stdout.splitlines())
    assert "total: " in proc.stdout and "position bias (quality, verdict)" in proc.stdout
    for criterion in report["modes"]:
        assert any(line.startswith(criterion) and "instruction" in line for line in proc.stdout.splitlines())
    # The verdict step reads a verdict from every answer the judge gave (a local judge).
    assert all(r["parse_rate"] == 1.0 for r in report["checks"] if r["mode"] == "verdict")


@pytest.mark.slow
def test_judge_stage_self_check_goes_into_the_card(tmp_path):
    from pipeline.manifest import load_manifest
    from pipeline.app.judge_check.self_check import SELF_CHECK_LIMIT

    path = manifest(tmp_path, {"self_check": True})  # the demo modes: safety choice_prob, quality likelihood
    run_sip("run", "--stages", "shard,rewrite,judge", "-m", str(path), timeout=900)
    stage = tmp_path / "out" / "judge"
    report = json.loads((stage / "judge_check.json").read_text())
    check_report(report, SELF_CHECK_LIMIT, {"safety": "choice_prob", "quality": "likelihood"})
    card = json.loads((stage / "card.json").read_text())["summary"]["self_check"]
    for r in report["checks"]:
        entry = card[f"{r['criterion']}/{r['check']}"]
        assert entry[r["metric"]] == r["value"] and entry["parse_rate"] == r["parse_rate"]
    assert card["cost"]["calls"] == report["totals"]["calls"] + report["robustness"]["cost"]["calls"]
    assert card["robustness"]["position_bias_rate"] == report["robustness"]["position_bias"]["rate"] is None  # likelihood
    assert set(card["robustness"]["injection"]) == {"safety", "quality"}
    readme = (stage / "README.md").read_text()
    assert "## Judge self-check" in readme and "safe_vs_unsafe" in readme
    # self_check changes no judgment, so turning it off later leaves the stage complete.
    from stages.judge import plan_judge

    m_on, m_off = load_manifest(path), load_manifest(path, ["judging.self_check=false"])
    assert plan_judge(m_on).stage.fingerprint == plan_judge(m_off).stage.fingerprint
    assert policy_tokenizer_dir(m_on).is_dir()
