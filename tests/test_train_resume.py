"""Exact resume: SIGKILL `sip train` at a random step, resume, and the losses match an uninterrupted run."""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess

import pytest

from tests.conftest import REPO, SIP, write_manifest
from tests.test_train_data import train_manifest

PHASES = [
    {"name": "ntp", "objective": "ntp", "steps": 9, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
    {"name": "dpo", "objective": "dpo", "steps": 9, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "beta": 0.5},
]
STEP_LINE = re.compile(r"^train \[(\w+) (\d)/2\] step (\d+)/")


def _command(manifest):
    return [*SIP, "train", "-m", str(manifest)]


def _env():
    # One thread: the tiny model is fastest so, and the test shares the machine.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _losses(train_dir, version: str) -> dict[int, float]:
    with open(train_dir / "metrics" / version / "metrics.csv", newline="") as fh:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(fh)}


def _manifest(tmp_path, name):
    (tmp_path / name).mkdir()
    data = train_manifest(tmp_path / name, PHASES, checkpoint={"every": 4, "keep_last": 2})
    return write_manifest(tmp_path / name / "m.yaml", data), tmp_path / name / "out" / "train"


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(tmp_path):
    whole_manifest, whole_dir = _manifest(tmp_path, "whole")
    subprocess.run(_command(whole_manifest), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)
    reference = _losses(whole_dir, "version_0")
    assert sorted(reference) == list(range(1, 19))

    kill_at = random.Random().randint(6, 15)  # global step; the first checkpoint is at step 4
    killed_manifest, killed_dir = _manifest(tmp_path, "killed")
    proc = subprocess.Popen(_command(killed_manifest), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = STEP_LINE.match(line)
        if match and (int(match[2]) - 1) * 9 + int(match[3]) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"kill_at={kill_at}:\n{''.join(seen)}"

    resumed = subprocess.run(_command(killed_manifest), cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    start = re.search(r"resumed from .*step-(\d+)", resumed.stdout)
    assert start, resumed.stdout
    after = _losses(killed_dir, "version_1")
    first = int(start[1]) + 1
    assert sorted(after) == list(range(first, 19)), f"kill_at={kill_at}"
    for step, loss in after.items():
        assert abs(loss - reference[step]) <= 1e-6, f"kill_at={kill_at} step {step}: {loss} vs {reference[step]}"
    assert not list((killed_dir / "checkpoints").glob(".*.tmp"))  # a save cut by the kill is cleaned up
    # The run before the kill logged the same losses up to where it was killed.
    before = _losses(killed_dir, "version_0")
    assert all(abs(before[s] - reference[s]) <= 1e-6 for s in before)
