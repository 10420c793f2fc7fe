"""`sip bench train`: the trainer and the bare LitGPT loop on the same model and batches."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_sip, write_manifest
from tests.test_train_data import train_manifest

PHASES = [{"name": "ntp", "objective": "ntp", "steps": 1, "batch_size": 3, "lr": 1e-3},
          {"name": "dpo", "objective": "dpo", "steps": 1, "batch_size": 2, "beta": 0.2}]


@pytest.mark.slow  # four fresh processes (each side of each objective)
def test_bench_train_times_both_sides_on_the_same_batches(tmp_path):
    path = write_manifest(tmp_path / "m.yaml", train_manifest(tmp_path, PHASES))
    proc = run_sip("bench", "train", "-m", str(path), "--seq-len", "32", "--warmup", "1", "--steps", "2")
    report = json.loads(proc.stdout)
    assert report["timed_steps"] == 2 and report["seq_len"] == 32
    for objective, batch, rows_per_example in (("ntp", 3, 1), ("dpo", 2, 2)):  # dpo: chosen + rejected rows
        result = report[objective]
        assert result["batch_size"] == batch  # the manifest phase's
        sip, bare = result["sip"], result["bare"]
        # Same work on both sides: the trainer's own token count equals the bare loop's.
        assert sip["tokens"] == bare["tokens"] == 2 * batch * rows_per_example * 32
        assert sip["timed_steps"] == bare["timed_steps"] == 2
        assert sip["tokens_per_s"] > 0 and bare["tokens_per_s"] > 0 and sip["peak_mem_gb"] > 0.1
        assert result["ratio_sip_over_bare"] == round(sip["tokens_per_s"] / bare["tokens_per_s"], 3)


def test_bench_train_refuses_unknown_objectives(tmp_path):
    path = write_manifest(tmp_path / "m.yaml", train_manifest(tmp_path, PHASES))
    proc = run_sip("bench", "train", "-m", str(path), "--objectives", "ntp,ppo", check=False)
    assert proc.returncode != 0 and "unknown --objectives ['ppo']" in proc.stderr
