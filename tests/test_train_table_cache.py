"""Training tables cached (trainer/table_cache.py): the same rows as the Parquet table, its
whole-table facts computed once, the cache reused until the table changes, and the reference
log-probs joined by pair hash."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.io import read_table, table_units
from pipeline.schema import PAIRS, PREFERENCES, REF_LOGPS, provenance, with_provenance
from tests.test_train_data import write_tables


def _split(directory, schema, rows, sizes, row_group):
    """Rewrite ``rows`` as files of ``sizes`` rows with row groups of ``row_group`` rows."""
    for f in directory.glob("*.parquet"):
        f.unlink()
    start = 0
    for i, size in enumerate(sizes):
        table = pa.Table.from_pylist(rows[start:start + size], schema=schema)
        pq.write_table(table, directory / f"{i:05d}.parquet", row_group_size=row_group)
        start += size


def _prov_schema(schema, stage, table):
    return with_provenance(schema, provenance(stage=stage, table=table, manifest_fingerprint="t", stage_fingerprint="t"))


def test_rows_facts_and_units_are_the_parquet_tables(tmp_path):
    from trainer.table_cache import BATCH_ROWS
    from trainer.source import load_table

    write_tables(tmp_path, rows=9 * BATCH_ROWS + 37, prefix_len=5, suffix_len=3)
    shard = tmp_path / "shard"
    rows = read_table(shard).to_pylist()
    # Three files, row groups of other sizes than the cached file's record batches.
    assert len(rows) > 2200
    _split(shard, _prov_schema(PAIRS, "shard", "pairs"), rows, [700, 1500, len(rows) - 2200], 600)
    whole = read_table(shard)

    table = load_table(shard, "prefixes", "train.phases[0].table", tmp_path / "cache")
    assert table.num_rows == whole.num_rows
    picks = np.random.default_rng(0).integers(0, whole.num_rows, 300).tolist() + [0, whole.num_rows - 1, 5, 5]
    got = table.take(picks)
    units = [u.key for u in table_units(shard) for _ in range(u.read(["pair_id"]).num_rows)]
    for i, row in zip(picks, got):
        expected = whole.slice(i, 1).to_pylist()[0]
        assert {k: row[k] for k in ("pair_id", "prefix", "prefix_ids", "suffix_ids")} == \
            {k: expected[k] for k in ("pair_id", "prefix", "prefix_ids", "suffix_ids")}
        assert row["unit"] == units[i]  # where the pair's rewrite is found
    ids = [pc.list_flatten(whole[c]) for c in ("prefix_ids", "suffix_ids")]
    assert table.stats.max_token_id == max(pc.max(a).as_py() for a in ids)
    assert table.stats.tokens == sum(len(a) for a in ids)
    with pytest.raises(IndexError, match="outside 0"):
        table.take([whole.num_rows])


def test_the_cache_is_reused_until_the_table_changes(tmp_path):
    from trainer.source import load_table

    write_tables(tmp_path, rows=20)
    prefs, cache = tmp_path / "prefs", tmp_path / "cache"
    lines = []
    first = load_table(prefs, "preferences", "t", cache, lines.append)
    assert len(lines) == 2 and "converting the preferences table" in lines[0]
    again = load_table(prefs, "preferences", "t", cache, lines.append)
    assert len(lines) == 2 and again.path == first.path  # no second conversion
    # The table rewritten in place (prefs --force): converted again, the old entry removed, with
    # what a conversion killed mid-way left of it.
    (cache / f".{first.path.name}.12345.tmp").write_bytes(b"partial")
    rows = read_table(prefs).to_pylist()[:7]
    pq.write_table(pa.Table.from_pylist(rows, schema=_prov_schema(PREFERENCES, "prefs", "preferences")),
                   prefs / "00000.parquet")
    changed = load_table(prefs, "preferences", "t", cache, lines.append)
    assert len(lines) == 4 and changed.num_rows == 7 and changed.path != first.path
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        changed.path.with_suffix(s).name for s in (".arrow", ".json", ".pairs.npy"))
    assert changed.stats.content_digest != first.stats.content_digest
    # Replaced by a file of the same size and modification time (`cp -p` of an edited copy):
    # still another table.
    import os
    import shutil

    target = prefs / "00000.parquet"
    plain = {"compression": "none", "use_dictionary": False, "write_statistics": False}  # size set by the shape
    rows = read_table(prefs).to_pylist()
    schema = _prov_schema(PREFERENCES, "prefs", "preferences")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), target, **plain)
    before = load_table(prefs, "preferences", "t", cache)
    rows[0]["chosen_ids"] = [i + 1 for i in rows[0]["chosen_ids"]]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "edited.parquet", **plain)
    stat = target.stat()
    assert (tmp_path / "edited.parquet").stat().st_size == stat.st_size
    os.utime(tmp_path / "edited.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.copy2(tmp_path / "edited.parquet", target)
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    copied = load_table(prefs, "preferences", "t", cache)
    assert copied.path != before.path and copied.stats.content_digest != before.stats.content_digest
    # Another kind of the same files is another entry, kept beside it.
    load_table(prefs / "sft", "sft", "t", cache)
    assert len(list(cache.glob("*.arrow"))) == 2


def test_reference_log_probs_join_by_pair_in_any_order(tmp_path):
    from trainer.ref_logps import ReferenceMismatch, join_reference
    from trainer.source import load_table

    write_tables(tmp_path, rows=30)
    prefs = tmp_path / "prefs"
    table = load_table(prefs, "preferences", "t", tmp_path / "cache")
    pair_ids = [r["pair_id"] for r in table.take(range(30), ["pair_id"])]
    order = np.random.default_rng(1).permutation(30)
    ref_rows = [{"pair_id": pair_ids[i], "ref_chosen_logp": -float(i), "ref_rejected_logp": -100.0 - i} for i in order]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(ref_rows[:12], schema=REF_LOGPS), ref_dir / "00000.parquet", row_group_size=5)
    pq.write_table(pa.Table.from_pylist(ref_rows[12:], schema=REF_LOGPS), ref_dir / "00001.parquet", row_group_size=5)
    chosen, rejected = join_reference(table, prefs, ref_dir)
    assert chosen.tolist() == [-float(i) for i in range(30)]
    assert rejected.tolist() == [-100.0 - i for i in range(30)]

    # A pair lacking: refused, naming it.
    pq.write_table(pa.Table.from_pylist(ref_rows[1:12], schema=REF_LOGPS), ref_dir / "00000.parquet")
    with pytest.raises(ReferenceMismatch, match=rf"lack 1 of the 30 pairs .* \(e\.g\. pair_id {pair_ids[order[0]]}\)"):
        join_reference(table, prefs, ref_dir)
    # A set that repeats a pair: refused.
    pq.write_table(pa.Table.from_pylist(ref_rows[:12] + ref_rows[3:4], schema=REF_LOGPS), ref_dir / "00000.parquet")
    with pytest.raises(ReferenceMismatch, match="repeat a pair_id"):
        join_reference(table, prefs, ref_dir)


def test_a_damaged_entry_is_converted_again_and_a_killed_conversion_leaves_nothing(tmp_path):
    import os
    import time

    from trainer.source import load_table

    write_tables(tmp_path, rows=20)
    prefs, cache = tmp_path / "prefs", tmp_path / "cache"
    first = load_table(prefs, "preferences", "t", cache)
    expected = first.take(range(20))
    damages = {"arrow removed": lambda p: p.unlink(),
               "arrow cut short": lambda p: os.truncate(p, 100),
               "pair hashes removed": lambda p: p.with_suffix(".pairs.npy").unlink()}
    for what, damage in damages.items():
        damage(first.path)
        lines = []
        again = load_table(prefs, "preferences", "t", cache, lines.append)
        assert "is damaged" in lines[0] and "converting the preferences table" in lines[1], what
        assert again.take(range(20)) == expected and again.pair_hashes.shape == (20,), what
    # A conversion killed mid-way (its writer gone, its file idle): removed by the next read.
    left = cache / f".{first.path.name}.999999999.tmp"
    left.write_bytes(b"partial")
    os.utime(left, (time.time() - 120, time.time() - 120))
    busy = cache / f".{first.path.name}.{os.getpid()}.tmp"  # a live writer's: kept
    busy.write_bytes(b"writing")
    load_table(prefs, "preferences", "t", cache)
    assert not left.exists() and busy.exists()


def test_a_cache_that_cannot_be_made_and_a_column_of_the_wrong_type_are_refused_by_name(tmp_path):
    from pipeline.atomic import OutputNotWritable
    from trainer.source import TableError, load_table

    write_tables(tmp_path, rows=4)
    (tmp_path / "blocked").write_text("a file where the cache directory goes")
    with pytest.raises(OutputNotWritable, match=r"cannot create the table cache .*blocked/tables: .*remove it"):
        load_table(tmp_path / "prefs", "preferences", "t", tmp_path / "blocked" / "tables")

    rows = read_table(tmp_path / "prefs").to_pylist()
    for row in rows:
        row["chosen_ids"] = " ".join(map(str, row["chosen_ids"]))  # ids written as text
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad" / "00000.parquet")
    with pytest.raises(TableError, match=r"t: .*bad is not a preferences table: in 00000\.parquet, chosen_ids is "
                                         r"string \(token id columns must be lists of integers"):
        load_table(tmp_path / "bad", "preferences", "t", tmp_path / "cache")
    with pytest.raises(TableError, match=r"is not an sft table"):
        load_table(tmp_path / "shard", "sft", "t", tmp_path / "cache")


def test_an_empty_or_reshaped_entry_file_is_damage_and_a_negative_id_is_counted(tmp_path):
    import json

    from trainer.source import load_table

    write_tables(tmp_path, rows=6)
    prefs, cache = tmp_path / "prefs", tmp_path / "cache"
    first = load_table(prefs, "preferences", "t", cache)
    assert first.stats.min_token_id >= 0
    for damage in (lambda: first.path.with_suffix(".pairs.npy").write_bytes(b""),  # np.load: EOFError
                   lambda: first.path.with_suffix(".json").write_text(json.dumps({}))):  # TableStats: TypeError
        damage()
        lines = []
        again = load_table(prefs, "preferences", "t", cache, lines.append)
        assert "is damaged" in lines[0] and again.pair_hashes.shape == (6,)
    rows = read_table(prefs).to_pylist()
    rows[2]["chosen_ids"] = [3, -5, 4]
    (tmp_path / "neg").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=_prov_schema(PREFERENCES, "prefs", "preferences")),
                   tmp_path / "neg" / "00000.parquet")
    assert load_table(tmp_path / "neg", "preferences", "t", cache).stats.min_token_id == -5
