"""`sip shard` as a real Slurm array job on the one-node cluster (scripts/slurm.sh)."""

import json
import subprocess

import polars as pl
import pytest

from tests.conftest import base_manifest, run_sip, slurm_job_times, wiki_documents, write_jsonl, write_manifest


@pytest.mark.slurm
@pytest.mark.slow
def test_shard_runs_as_a_slurm_array_job(tmp_path, slurm_cluster):
    docs = wiki_documents(40, words=40)
    for i in range(3):
        write_jsonl(tmp_path / f"c{i}.jsonl", docs[i::3])
    executor = {"type": "slurm", "tasks": 3, "workers": 2,
                "slurm": {"time": "00:10:00", "cpus_per_task": 1, "mem_per_cpu_gb": 1}}
    path = write_manifest(tmp_path / "m.yaml", base_manifest(tmp_path / "out", [str(tmp_path / "c*.jsonl")], executor=executor))
    proc = run_sip("shard", "-m", str(path), timeout=600)
    assert "submitted Slurm jobs" in proc.stdout and "pairs from 40 documents" in proc.stdout

    stage = tmp_path / "out" / "shard"
    assert sorted(p.name for p in (stage / "_logs" / "completions").iterdir()) == ["00000", "00001", "00002"]
    assert "#SBATCH --array=0-2%2" in (stage / "_logs" / "launch_script.slurm").read_text()
    assert list((stage / "_logs" / "slurm_logs").glob("*.out"))
    frame = pl.read_parquet(str(stage / "*.parquet"))
    assert len(frame) == 80 and frame["pair_id"].n_unique() == 80  # 2 pairs per document
    assert (stage / "card.json").is_file()

    # Submitting again finds every task complete and launches nothing.
    again = run_sip("shard", "-m", str(path))
    assert "already complete" in again.stdout


@pytest.mark.slurm
def test_resubmitting_while_earlier_jobs_are_queued_is_refused(tmp_path, slurm_cluster):
    docs = wiki_documents(6, words=40)
    write_jsonl(tmp_path / "c.jsonl", docs)
    executor = {"type": "slurm", "tasks": 1, "slurm": {"time": "00:05:00", "mem_per_cpu_gb": 1}}
    path = write_manifest(tmp_path / "m.yaml", base_manifest(tmp_path / "out", [str(tmp_path / "c.jsonl")], executor=executor))
    # A job that is certainly still queued or running stands in for an earlier submission.
    held = subprocess.run(["sbatch", "--parsable", "--hold", "--wrap", "sleep 60", "-o", "/dev/null"],
                          capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        logs = tmp_path / "out" / "shard" / "_logs"
        logs.mkdir(parents=True)
        (logs / "slurm_jobs.json").write_text(json.dumps({"tasks": held, "card": held}))
        proc = run_sip("shard", "-m", str(path), check=False)
        assert proc.returncode == 2 and f"Slurm jobs {held}" in proc.stderr and "still queued or running" in proc.stderr
    finally:
        subprocess.run(["scancel", held], check=False)


@pytest.mark.slurm
@pytest.mark.slow
def test_shard_then_rewrite_as_one_afterok_chain(tmp_path, slurm_cluster):
    # Six shard tasks on a cluster whose MaxArraySize is 4 (scripts/slurm.sh): two arrays, which
    # the card job, the wait and the rewrite array must all wait for.
    docs = wiki_documents(6, words=60)
    for i in range(6):
        write_jsonl(tmp_path / f"c{i}.jsonl", docs[i:i + 1])
    executor = {"type": "slurm", "tasks": 1, "slurm": {"time": "00:20:00", "mem_per_cpu_gb": 2},
                "stages": {"shard": {"tasks": 6}, "rewrite": {"cpus_per_task": 2}}}
    data = base_manifest(tmp_path / "out", [str(tmp_path / "c*.jsonl")], executor=executor,
                         shard={"suffix_tokens": 16, "min_prefix_tokens": 8, "max_prefix_tokens": 48})
    data["rewriter"] = {"model": "embedded", "max_model_len": 512}
    data["rewrite"] = {"chunk_size": 4}
    path = write_manifest(tmp_path / "m.yaml", data)

    dry = run_sip("run", "--stages", "shard,rewrite", "-m", str(path), "--dry-run",
                  "--set", "executor.stages.rewrite.gpus_per_task=1").stdout
    assert dry.count("#!/bin/bash") == 2 and "#SBATCH --gpus-per-task=1" in dry and "#SBATCH --cpus-per-task=2" in dry

    proc = run_sip("run", "--stages", "shard,rewrite", "-m", str(path), timeout=900)
    assert "shard: submitted" in proc.stdout and "(tasks, 2 arrays)" in proc.stdout and "rewrite: submitted" in proc.stdout
    out = tmp_path / "out"
    pairs = pl.read_parquet(str(out / "shard" / "*.parquet"))
    rewrites = pl.read_parquet(str(out / "rewrite" / "*.parquet"))
    assert len(pairs) == 12 and set(rewrites["pair_id"]) == set(pairs["pair_id"]) and len(rewrites) == 12
    assert sorted(p.name for p in (out / "shard" / "_logs" / "completions").iterdir()) == [f"{r:05d}" for r in range(6)]
    shard_jobs = json.loads((out / "shard" / "_logs" / "slurm_jobs.json").read_text())
    rewrite_jobs = json.loads((out / "rewrite" / "_logs" / "slurm_jobs.json").read_text())
    assert len(shard_jobs["tasks"]) == 2 and len(rewrite_jobs["tasks"]) == 1
    # The shard card job started only after every task of both arrays had ended, and the
    # rewrite array only after the card job (afterok chain).
    shard_tasks_end = max(slurm_job_times(f"{job}_{i}")[1] for job, size in zip(shard_jobs["tasks"], (4, 2))
                          for i in range(size))
    card_start, card_end = slurm_job_times(shard_jobs["card"])
    assert card_start >= shard_tasks_end
    assert slurm_job_times(rewrite_jobs["tasks"][0] + "_0")[0] >= card_end
