"""Training as a chain member: in-process locally, one sbatch job on the real local Slurm cluster
(srun starts one task per device and Lightning Fabric reads the SLURM_* variables)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import base_manifest, run_sip, slurm_job_times, wiki_documents, write_jsonl, write_manifest
from tests.test_train_data import train_manifest

NTP = [{"name": "ntp", "objective": "ntp", "steps": 2, "batch_size": 2}]
SLURM = {"type": "slurm", "tasks": 1, "slurm": {"time": "00:10:00", "cpus_per_task": 1, "mem_per_cpu_gb": 2}}
# A llama-style model on the embedded tokenizer's vocabulary, small enough to train in seconds on a CPU.
TINY_LLAMA = {"n_layer": 2, "n_head": 4, "n_query_groups": 2, "n_embd": 64, "intermediate_size": 172,
              "vocab_size": 49152, "padded_vocab_size": 49152, "bias": False, "norm_class_name": "RMSNorm",
              "mlp_class_name": "LLaMAMLP", "parallel_residual": False, "rotary_percentage": 1.0}


@pytest.mark.slurm
@pytest.mark.slow
def test_shard_then_train_on_slurm_as_one_afterok_chain_with_a_task_per_device(tmp_path, slurm_cluster):
    write_jsonl(tmp_path / "c.jsonl", wiki_documents(6, words=60))
    data = base_manifest(tmp_path / "out", [str(tmp_path / "c.jsonl")], executor=SLURM,
                         shard={"suffix_tokens": 16, "min_prefix_tokens": 8, "max_prefix_tokens": 48})
    # Two CPU "devices": two srun tasks that only find each other through the SLURM_* variables.
    data["train"] = {"model": {"init": "scratch", "config": TINY_LLAMA}, "max_seq_len": 64, "devices": 2,
                     "strategy": "ddp", "log_every": 1, "phases": NTP}
    path = write_manifest(tmp_path / "m.yaml", data)

    proc = run_sip("run", "--stages", "shard,train", "-m", str(path), timeout=900)
    train_dir = tmp_path / "out" / "train"
    card_job = json.loads((tmp_path / "out" / "shard" / "_logs" / "slurm_jobs.json").read_text())["card"]
    train_job = json.loads((train_dir / "_logs" / "slurm_jobs.json").read_text())["train"]
    assert f"train: submitted Slurm job {train_job} (afterok {card_job})" in proc.stdout
    assert "train: 2 steps" in proc.stdout
    assert slurm_job_times(train_job)[0] >= slurm_job_times(card_job)[1]  # training started after the shard card

    script = (train_dir / "_logs" / "launch_script.slurm").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "--gpus-per-node" not in script
    assert f"#SBATCH --dependency=afterok:{card_job}" in script
    output = (train_dir / "_logs" / f"slurm-{train_job}.out").read_text()
    assert "0: Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in output
    assert "1: Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert (train_dir / "final" / "lit_model.pth").is_file() and (train_dir / "final" / "model_config.yaml").is_file()
    assert json.loads((train_dir / "hf" / "config.json").read_text())["model_type"] == "llama"  # exported at the end

    again = run_sip("train", "-m", str(path))
    assert "train: already complete" in again.stdout and "submitted" not in again.stdout


@pytest.mark.slurm
def test_a_failing_train_job_is_reported_with_the_end_of_its_output(tmp_path, slurm_cluster):
    data = train_manifest(tmp_path, NTP)
    data["executor"] = SLURM
    data["train"]["model"]["config"] = {**data["train"]["model"]["config"], "block_size": 32}  # < max_seq_len 64
    path = write_manifest(tmp_path / "m.yaml", data)
    proc = run_sip("train", "-m", str(path), check=False, timeout=600)
    assert proc.returncode == 2
    assert "ended without finishing" in proc.stderr and "exceeds the model's block_size" in proc.stderr
    assert not (tmp_path / "out" / "train" / "final").exists()


def test_dry_run_prints_the_gpu_job_script_and_leaves_no_trace(tmp_path):
    data = train_manifest(tmp_path, NTP)
    data["executor"] = {**SLURM, "stages": {"train": {"gpus_per_task": 1, "cpus_per_task": 8, "time": "12:00:00"}}}
    data["train"].update(devices=4, num_nodes=2)
    path = write_manifest(tmp_path / "m.yaml", data)

    alone = run_sip("train", "-m", str(path), "--dry-run").stdout
    assert "devices 4 x nodes 2" in alone and "2 steps x 16 rows" in alone  # the plan, for 8 ranks
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=12:00:00",
                 f"srun --kill-on-bad-exit=1 --label sip train -m {tmp_path}/out/train/_logs/manifest.yaml "
                 "--executor local"):
        assert line in alone, line
    assert "--dependency" not in alone

    write_jsonl(tmp_path / "unused.jsonl", wiki_documents(2))  # the corpus the shard stage would read
    chained = run_sip("run", "--stages", "shard,train", "-m", str(path), "--dry-run").stdout
    assert chained.count("#!/bin/bash") == 2 and "#SBATCH --dependency=afterok:<shard card job id>" in chained
    assert not (tmp_path / "out" / "train").exists()


@pytest.mark.parametrize("setting, message", [
    ("train.devices=auto", "train.devices: 'auto' cannot size a Slurm job"),
    ("executor.stages.train.gpus_per_task=2", "runs one process per GPU"),
])
def test_slurm_settings_that_cannot_launch_the_trainer_are_refused(tmp_path, setting, message):
    data = train_manifest(tmp_path, NTP)
    data["executor"] = SLURM
    path = write_manifest(tmp_path / "m.yaml", data)
    proc = run_sip("train", "-m", str(path), "--set", setting, check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_run_with_train_trains_in_process_on_the_local_executor(tmp_path):
    path = write_manifest(tmp_path / "m.yaml", train_manifest(tmp_path, NTP))
    proc = run_sip("run", "--stages", "train", "-m", str(path))
    assert "train: 2 steps, " in proc.stdout and "checkpoint" in proc.stdout
    assert (tmp_path / "out" / "train" / "final" / "lit_model.pth").is_file()
    assert not (tmp_path / "out" / "train" / "_logs").exists()  # nothing of Slurm's
    # A finished member is skipped; one made with other settings is refused before anything runs.
    again = run_sip("run", "--stages", "train", "-m", str(path)).stdout
    assert "train: already complete" in again and "steps, " in again
    proc = run_sip("run", "--stages", "train", "-m", str(path), "--set", "train.seed=4", check=False)
    assert proc.returncode == 2 and "was trained with different settings" in proc.stderr
    assert "train.seed: 3 -> 4" in proc.stderr


@pytest.mark.slurm
def test_resubmitting_while_the_train_job_is_queued_is_refused(tmp_path, slurm_cluster):
    data = train_manifest(tmp_path, NTP)
    data["executor"] = SLURM
    path = write_manifest(tmp_path / "m.yaml", data)
    # A job that is certainly still queued stands in for an earlier submission.
    held = subprocess.run(["sbatch", "--parsable", "--hold", "--wrap", "sleep 60", "-o", "/dev/null"],
                          capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        logs = tmp_path / "out" / "train" / "_logs"
        logs.mkdir(parents=True)
        (logs / "slurm_jobs.json").write_text(json.dumps({"train": held}))
        proc = run_sip("train", "-m", str(path), check=False)
        assert proc.returncode == 2 and f"Slurm job {held} from an earlier submission is still queued" in proc.stderr
        assert not (logs / "launch_script.slurm").exists()  # nothing was submitted
    finally:
        subprocess.run(["scancel", held], check=False)
