"""The card jobs' row checks, a unit at a time (pipeline.stage.require_unit_keys): every pair's
keys once, and a missing, repeated or stray row named with its unit."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import UNIT_LAYOUT
from pipeline.manifest import parse_manifest
from pipeline.stage import SETTINGS_FILE, StageDir, StageFailed, older_file_layout, require_unit_keys
from tests.conftest import base_manifest


def _layout(tmp_path, rollouts: dict[str, list[tuple[str, int]]]):
    """A pairs table of two files (row groups of 3 pairs) and a rollout table of the given
    files (``{file name: [(pair_id, sample)]}``)."""
    pairs, out = tmp_path / "shard", tmp_path / "rollout"
    pairs.mkdir()
    out.mkdir()
    for f, ids in enumerate((["a", "b", "c", "d"], ["e", "f"])):
        pq.write_table(pa.table({"pair_id": ids}), pairs / f"{f:05d}.parquet", row_group_size=3)
    for name, keys in rollouts.items():
        pq.write_table(pa.table({"pair_id": [k[0] for k in keys], "sample": [k[1] for k in keys]}), out / name)
    return pairs, out


def _two_samples(pairs):
    return {(p, s) for p in pairs for s in range(2)}


COMPLETE = {"00000_00000_00000.parquet": [("a", 0), ("a", 1), ("b", 0), ("b", 1)],
            "00000_00000_00001.parquet": [("c", 0), ("c", 1)],
            "00000_00001_00000.parquet": [("d", 0), ("d", 1)],
            "00001_00000_00000.parquet": [("e", 0), ("e", 1), ("f", 0), ("f", 1)]}


def test_a_complete_table_passes(tmp_path):
    pairs, out = _layout(tmp_path, COMPLETE)
    require_unit_keys(out, pairs, ["pair_id", "sample"], _two_samples, "2 samples per pair")


@pytest.mark.parametrize("change, message", [
    ({"00000_00001_00000.parquet": [("d", 0)]}, r"11 rows \(0 repeated \(pair_id, sample\), 1 missing, 0 unexpected\) "
                                                r"for 2 samples per pair; first in unit 00000_00001"),
    ({"00000_00000_00001.parquet": [("c", 0), ("c", 1), ("a", 1)]}, r"13 rows \(1 repeated .*first in unit 00000_00000"),
    ({"00001_00000_00000.parquet": [("e", 0), ("e", 1), ("f", 0), ("f", 1), ("z", 0)]},
     r"1 unexpected.*first in unit 00001_00000"),
    ({"00002_00000_00000.parquet": [("a", 0)]}, r"1 file\(s\) of no unit of .*shard \(e\.g\. 00002_00000_00000"),
])
def test_a_missing_repeated_or_stray_row_is_named_with_its_unit(tmp_path, change, message):
    pairs, out = _layout(tmp_path, {**COMPLETE, **change})
    with pytest.raises(StageFailed, match=message):
        require_unit_keys(out, pairs, ["pair_id", "sample"], _two_samples, "2 samples per pair")


def test_a_unit_without_any_file_counts_all_its_keys_missing(tmp_path):
    pairs, out = _layout(tmp_path, {k: v for k, v in COMPLETE.items() if not k.startswith("00001")})
    with pytest.raises(StageFailed, match=r"8 rows \(0 repeated .*, 4 missing, 0 unexpected\).*first in unit 00001_00000"):
        require_unit_keys(out, pairs, ["pair_id", "sample"], _two_samples, "2 samples per pair")
    # Keys wanted at least once: a repeat is not a fault, a missing pair is.
    require_unit_keys(tmp_path / "rollout", pairs, ["pair_id"], lambda ids: {(p,) for p in ids if p < "e"},
                      "every pair", once=False)


def test_a_stage_refuses_an_upstream_written_with_the_older_file_layout(tmp_path):
    """Files named per task and chunk (before units) cannot be looked up by unit: the stage
    that reads them says so before starting its engine, and names the fix."""
    m = parse_manifest(base_manifest(tmp_path / "out", [str(tmp_path / "unused.jsonl")]))
    stage = StageDir(m, "rewrite", "rewrites", {"k": 1}, {"executor.tasks": 1, **UNIT_LAYOUT})
    stage.prepare()
    (stage.path / "card.json").write_text("{}")
    (stage.logs / "completions").mkdir(parents=True)
    (stage.logs / "completions" / "00000").write_text("")
    stage.check_upstream_of("judge")  # the same layout: accepted
    assert not older_file_layout(stage.path)
    state = json.loads((stage.path / SETTINGS_FILE).read_text())
    del state["layout"]["files"]  # as an older sip wrote it
    (stage.path / SETTINGS_FILE).write_text(json.dumps(state))
    assert older_file_layout(stage.path)
    with pytest.raises(StageFailed, match="older file layout.*sip rewrite --force"):
        stage.check_upstream_of("judge")
