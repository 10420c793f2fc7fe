"""`sip shard` as a real Slurm array job on the one-node cluster (scripts/slurm.sh)."""

import json
import subprocess

import polars as pl
import pytest

from tests.conftest import base_manifest, run_sip, wiki_documents, write_jsonl, write_manifest


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
