"""Several processes (DDP on two CPU processes, gloo): the world_size > 1 paths of the trainer."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import load_manifest
from tests.conftest import REPO, SIP, write_manifest
from tests.test_train_data import train_manifest


@pytest.mark.slow
def test_two_processes_train_save_gather_and_score_like_one(tmp_path):
    from trainer.ref_logps import run_ref_logps, stored_sets

    data = train_manifest(tmp_path, [
        {"name": "ntp", "objective": "ntp", "steps": 3, "batch_size": 4, "lr": 3e-3},
        {"name": "dpo", "objective": "dpo", "steps": 3, "batch_size": 4, "lr": 1e-3, "beta": 0.5},
    ], checkpoint={"every": 3, "keep_last": 5}, devices=2, strategy="ddp")
    path = write_manifest(tmp_path / "m.yaml", data)
    prefs_file = tmp_path / "out" / "prefs" / "00000.parquet"
    prefs_bytes = prefs_file.read_bytes()
    proc = subprocess.run([*SIP, "train", "-m", str(path)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "devices 2 x nodes 1, strategy ddp" in proc.stdout and "train: done" in proc.stdout
    manifest = load_manifest(path)
    train_dir = manifest.stage_dir("train")
    assert sorted(p.name for p in (train_dir / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]

    # The reference log-probs the two ranks computed and gathered are, pair for pair, those one
    # process computes from the checkpoint the DPO phase started from (same fingerprint: the
    # device count is not one of its keys).
    [gathered] = stored_sets(train_dir / "ref_logps")
    gathered.path.rename(tmp_path / "gathered")
    single = load_manifest(path, ["train.devices=1", "train.strategy=auto"])
    out = run_ref_logps(single, phase="dpo", checkpoint=train_dir / "checkpoints" / "step-00000003",
                        log=lambda _m: None)
    assert out["fingerprint"] == gathered.path.name and out["ref_model_sha"] == gathered.keys["reference.model_sha"]
    two, one = (pq.read_table(d / "00000.parquet").sort_by("pair_id") for d in (tmp_path / "gathered", gathered.path))
    assert two["pair_id"].to_pylist() == one["pair_id"].to_pylist() and two.num_rows == 48
    for column in ("ref_chosen_logp", "ref_rejected_logp"):
        np.testing.assert_allclose(two[column].to_numpy(), one[column].to_numpy(), rtol=0, atol=1e-5)
    assert prefs_file.read_bytes() == prefs_bytes  # the preferences were only read
