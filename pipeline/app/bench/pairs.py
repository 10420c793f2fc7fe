"""The input of the LLM stage benchmarks: a run directory whose shard table holds exactly N pairs."""

from __future__ import annotations

from pathlib import Path

from pipeline.app.registry import run_stages
from pipeline.io import read_table, write_table_atomic
from pipeline.manifest import Manifest, parse_manifest


def bench_pairs(manifest: Manifest, directory: Path, pairs: int) -> Manifest:
    """``manifest`` redirected to ``directory``, one local task per stage, with a shard table
    of exactly ``pairs`` pairs (later stages read whatever the shard table holds)."""
    data = manifest.absolute_data()
    data["run"]["output_dir"] = str(directory / "out")
    data["executor"] = {"type": "local", "tasks": 1, "workers": 1}
    m = parse_manifest(data)
    run_stages(m, ["shard"], log=lambda _m: None)["shard"]
    shard_dir = m.stage_dir("shard")
    table = read_table(shard_dir).slice(0, pairs)
    for f in shard_dir.glob("*.parquet"):
        f.unlink()
    write_table_atomic(str(shard_dir / "00000.parquet"), table.to_pylist(), table.schema)
    return m
