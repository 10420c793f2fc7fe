"""Write to a temporary path, then rename: files and directories appear whole or not at all."""

import os

import pytest

from pipeline.atomic import atomic_path, remove_leftovers, temporary_path, write_text_atomic


def test_a_file_is_renamed_into_place_only_when_the_block_succeeds(tmp_path):
    final = tmp_path / "card.json"
    with atomic_path(final) as tmp:
        assert tmp == tmp_path / f".card.json.{os.getpid()}.tmp" and not tmp.exists()
        tmp.write_text("new")
        assert not final.exists()
    assert final.read_text() == "new" and list(tmp_path.iterdir()) == [final]
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert final.read_text() == "new" and list(tmp_path.iterdir()) == [final]
    write_text_atomic(final, "again")
    assert final.read_text() == "again"


def test_a_directory_replaces_an_existing_one_whole(tmp_path):
    final = tmp_path / "hf"
    final.mkdir()
    (final / "stale.txt").write_text("from an earlier export")
    with atomic_path(final, directory=True) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "weights").write_text("w")
    assert sorted(p.name for p in final.iterdir()) == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final, directory=True) as tmp:
            (tmp / "half").write_text("h")
            raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_leftovers_of_killed_attempts_are_removed_for_one_path_or_a_pattern(tmp_path):
    (tmp_path / ".00001.parquet.77.tmp").write_bytes(b"x")
    (tmp_path / ".00002.parquet.78.tmp").write_bytes(b"x")
    (tmp_path / ".step-00000012.79.tmp").mkdir()
    (tmp_path / ".step-00000012.79.tmp" / "weights").write_bytes(b"x")
    (tmp_path / "00001.parquet").write_bytes(b"kept")
    assert [p.name for p in remove_leftovers(tmp_path / "00001.parquet")] == [".00001.parquet.77.tmp"]
    assert [p.name for p in remove_leftovers(tmp_path / "step-*")] == [".step-00000012.79.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".00002.parquet.78.tmp", "00001.parquet"]
    assert remove_leftovers(tmp_path / "missing" / "x") == []
    assert temporary_path(tmp_path / "a").parent == tmp_path
