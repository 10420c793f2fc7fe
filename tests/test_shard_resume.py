"""SIGKILL in the middle of `sip shard`, then re-run: exactly the rows of an uninterrupted run, in
the pairs table and in the held-out table (a task writes both)."""

import os
import signal
import subprocess
import time

import polars as pl
import pytest

from tests.conftest import REPO, SIP, base_manifest, run_sip, wiki_documents, write_jsonl, write_manifest

TASKS = 16


@pytest.mark.slow
def test_kill_then_resume_gives_the_rows_of_an_uninterrupted_run(tmp_path):
    docs = wiki_documents(200, words=40)
    for part in range(TASKS):
        rows = [{**d, "id": f"{d['id']}#{part}.{k}"} for k, d in enumerate(docs)]
        write_jsonl(tmp_path / f"part-{part:02d}.jsonl", rows)
    corpus = [str(tmp_path / "part-*.jsonl")]
    sections = {"executor": {"tasks": TASKS, "workers": 1}, "shard": {"eval_fraction": 0.1}}
    killed = write_manifest(tmp_path / "killed.yaml", base_manifest(tmp_path / "killed", corpus, **sections))
    clean = write_manifest(tmp_path / "clean.yaml", base_manifest(tmp_path / "clean", corpus, **sections))

    completions = tmp_path / "killed" / "shard" / "_logs" / "completions"
    proc = subprocess.Popen(
        [*SIP, "shard", "-m", str(killed)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if completions.is_dir() and len(os.listdir(completions)) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = sorted(os.listdir(completions))
    assert 2 <= len(done_before) < TASKS
    stage = tmp_path / "killed" / "shard"
    kept = {p.name: p.stat().st_mtime_ns for p in stage.glob("*.parquet") if p.stem.lstrip("0") in
            {d.lstrip("0") for d in done_before}}

    resumed = run_sip("shard", "-m", str(killed))
    run_sip("shard", "-m", str(clean))

    # Finished tasks were not redone; the killed run now has every task.
    assert {p.name: p.stat().st_mtime_ns for p in stage.glob("*.parquet") if p.name in kept} == kept
    assert len(os.listdir(completions)) == TASKS
    assert not list(stage.glob(".*.tmp")) and not list((stage / "heldout").glob(".*.tmp"))
    doc_ids = stage / "_doc_ids"  # every task's ids, once, for the check across tasks
    assert len(list(doc_ids.glob("*.parquet"))) == TASKS and not list(doc_ids.glob(".*.tmp"))
    assert pl.read_parquet(str(doc_ids / "*.parquet"))["doc_id"].n_unique() == TASKS * len(docs)
    a = pl.read_parquet(str(stage / "*.parquet"))
    b = pl.read_parquet(str(tmp_path / "clean" / "shard" / "*.parquet"))
    assert a["pair_id"].n_unique() == len(a), "duplicate pair_ids after resume"
    assert a.sort("pair_id").equals(b.sort("pair_id"))
    held_a = pl.read_parquet(str(stage / "heldout" / "*.parquet"))
    held_b = pl.read_parquet(str(tmp_path / "clean" / "shard" / "heldout" / "*.parquet"))
    assert len(held_a) and held_a.sort("pair_id").equals(held_b.sort("pair_id"))
    assert not set(held_a["doc_id"]) & set(a["doc_id"])
    assert f"from {TASKS * len(docs)} documents" in resumed.stdout
