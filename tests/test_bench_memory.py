"""`sip bench memory` on tiny synthetic runs: every side runs the code it measures and handles
the rows it should (the numbers themselves are the benchmark's, not the test's)."""

import pytest

from pipeline.app.bench.memory import TRAIN_BATCH, TRAIN_MICRO_BATCHES, bench_memory, table

pytestmark = pytest.mark.slow


def test_every_side_handles_its_share_of_each_size(tmp_path):
    report = bench_memory(tmp_path, [300, 5000], tasks=2)
    print(table(report))
    for row in report["rows"]:
        pairs = row["pairs"]
        # Rank 0 of 2 takes every other unit (2,048 pairs), the first included.
        assert 0 < row["judge_task"]["pairs"] <= pairs and row["prefs_task"]["preference_rows"] > 0
        assert row["whole_table_read"]["rows"] == pairs * 3  # rewrites + 2 rollouts per pair
        trainer = row["trainer_data"]
        assert trainer["rows"] == 2 * pairs and trainer["rows_read"] == 2 * TRAIN_BATCH * TRAIN_MICRO_BATCHES
        assert 0 < trainer["peak_anon_mb"] <= trainer["peak_rss_mb"]
        assert row["trainer_whole_table"]["rows"] == pairs
    assert set(report["peak_rss_growth_300_to_5000"]) == {"judge_task", "prefs_task", "whole_table_read",
                                                         "trainer_data", "trainer_whole_table"}
