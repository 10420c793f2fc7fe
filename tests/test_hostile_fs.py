"""Outputs on a full or read-only filesystem, and a corpus that changes under a planned stage.

The filesystems are real: small tmpfs mounts (root, as on the CI machine).
"""

import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from pipeline.manifest import parse_manifest
from pipeline.stage import StageFailed
from tests.conftest import base_manifest, run_sip, wiki_documents, write_jsonl, write_manifest


@pytest.fixture
def small_fs(tmp_path):
    """A 160 KiB tmpfs at tmp_path/fs; yields a function that remounts it with options."""
    mount = tmp_path / "fs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)

    yield mount, remount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _corpus(tmp_path: Path, docs: int) -> list[str]:
    documents = wiki_documents(docs, words=120)
    for i in range(4):
        write_jsonl(tmp_path / f"c{i}.jsonl", documents[i::4])
    return [str(tmp_path / "c*.jsonl")]


def _no_partial_files(stage: Path) -> None:
    """No temporaries left, every table file whole (a task that finished before the disk
    filled keeps its file), and no card."""
    import pyarrow.parquet as pq

    assert not list(stage.rglob(".*.tmp")) and not (stage / "card.json").exists(), sorted(p.name for p in stage.iterdir())
    for f in stage.glob("*.parquet"):
        pq.read_metadata(f)


def test_a_full_disk_names_the_file_keeps_nothing_half_written_and_resumes_once_freed(tmp_path, small_fs):
    mount, remount = small_fs
    corpus = _corpus(tmp_path, 400)
    path = write_manifest(tmp_path / "m.yaml", base_manifest(mount / "out", corpus))
    full = run_sip("shard", "-m", str(path), check=False)
    assert full.returncode == 2
    error = full.stderr[full.stderr.index("Error:"):]
    assert "no space left on its filesystem" in error and str(mount / "out" / "shard") in error, error
    stage = mount / "out" / "shard"
    _no_partial_files(stage)

    remount("size=16m")  # space freed
    run_sip("shard", "-m", str(path))
    reference = write_manifest(tmp_path / "r.yaml", base_manifest(tmp_path / "ref", corpus))
    run_sip("shard", "-m", str(reference))
    resumed = pl.read_parquet(str(stage / "*.parquet")).sort("pair_id")
    assert resumed.equals(pl.read_parquet(str(tmp_path / "ref" / "shard" / "*.parquet")).sort("pair_id"))
    assert (stage / "card.json").is_file()


def test_a_read_only_output_directory_is_refused_by_name(tmp_path, small_fs):
    mount, remount = small_fs
    path = write_manifest(tmp_path / "m.yaml", base_manifest(mount / "out", _corpus(tmp_path, 8)))
    remount("ro")
    proc = run_sip("shard", "-m", str(path), check=False)
    assert proc.returncode == 2
    assert f"cannot write {mount / 'out'}" in proc.stderr and "read-only" in proc.stderr, proc.stderr
    remount("rw")
    run_sip("shard", "-m", str(path))
    assert (mount / "out" / "shard" / "card.json").is_file()
    remount("ro")
    assert "already complete" in run_sip("shard", "-m", str(path)).stdout  # reading needs no write
    forced = run_sip("shard", "-m", str(path), "--force", check=False)  # deleting it does
    assert forced.returncode == 2 and f"cannot write {mount / 'out' / 'shard'}" in forced.stderr, forced.stderr
    remount("rw")


@pytest.mark.parametrize("change", ["append", "delete", "copied_over"])
def test_a_corpus_file_that_changes_after_planning_is_refused_by_name(tmp_path, change):
    from pipeline.app.registry import JOBS
    from pipeline.runner import run_chain

    corpus = _corpus(tmp_path, 8)
    m = parse_manifest(base_manifest(tmp_path / "out", corpus))
    m._source = tmp_path / "m.yaml"
    job = JOBS["shard"](m, False)  # planned: the corpus files listed with their sizes and times
    changed = tmp_path / "c2.jsonl"
    if change == "append":
        write_jsonl(changed, wiki_documents(12, words=120)[8:])
    elif change == "copied_over":  # edited elsewhere and copied back keeping size and mtime (cp -p)
        stat, text = changed.stat(), changed.read_text()
        edited = tmp_path / "edited.jsonl"
        edited.write_text(text.replace("a", "e", 1))
        os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        shutil.copy2(edited, changed)
        assert (changed.stat().st_size, changed.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    else:
        changed.unlink()
    with pytest.raises(StageFailed, match=f"{changed}: the corpus file (changed|disappeared) after the stage was planned"):
        run_chain(m, [job], log=lambda _line: None)
    assert not list((tmp_path / "out" / "shard").glob("*.parquet")) or \
        "c2.jsonl" not in set(pl.read_parquet(str(tmp_path / "out" / "shard" / "*.parquet"))["source"])
