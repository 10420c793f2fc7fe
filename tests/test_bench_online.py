"""`sip bench online`: an online phase's rollouts and judge calls against bare vLLM doing the
same work (a tiny run: the numbers are not checked, the sameness of the work is)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_sip, wiki_documents, write_manifest
from tests.test_train_online import PHASE, online_manifest


@pytest.mark.slow  # the rewrite stage, a one-step online run and the bare engines, each started once
def test_bench_online_repeats_the_recorded_rollouts_and_judge_calls(tmp_path):
    path = online_manifest(tmp_path, wiki_documents(4, words=60), [{**PHASE, "steps": 1}])
    data = yaml.safe_load(path.read_text())
    write_manifest(path, data)
    proc = run_sip("bench", "online", "-m", str(path), "--steps", "1", "--pairs", "2", timeout=1200)
    report = json.loads(proc.stdout)
    assert report["steps"] == report["micro_batches"] == 1 and report["sampler"] == "vllm"
    # The bare side made exactly the judge calls the online phase made, for the same prefixes.
    assert report["judge"]["bare_calls"] == report["judge"]["sip_calls"] > 0
    assert report["rollouts"]["sip_tokens"] > 0 and report["rollouts"]["bare_tokens"] > 0
    split = report["sip_step_split_s"]
    assert split["push_s"] > 0 and split["sample_s"] > 0 and split["judge_s"] > 0 and split["train_s"] > 0
    assert split["step_s"] >= split["train_s"]
