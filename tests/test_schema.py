import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import TableWriter, read_table, table_provenance
from pipeline.schema import (
    PAIRS, TABLES, cand_id, content_id, pair_id, provenance, read_provenance, table_of, with_provenance,
)


def test_ids_are_content_addressed():
    assert pair_id("doc", 10, 128, "tok") == pair_id("doc", 10, 128, "tok")
    assert len({pair_id("doc", 10, 128, "tok"), pair_id("doc", 11, 128, "tok"),
                pair_id("doc", 10, 64, "tok"), pair_id("doc", 10, 128, "tok2"), pair_id("doc1", 0, 128, "tok")}) == 5
    # Fields never run together: ("a", "bc") and ("ab", "c") differ.
    assert content_id("k", "a", "bc") != content_id("k", "ab", "c")
    assert cand_id("p", "text") != cand_id("p", "text ")
    assert len(pair_id("d", 0, 1, "t")) == 32


def test_every_table_has_an_explicit_schema_and_provenance_round_trips():
    assert set(TABLES) == {"pairs", "heldout", "rewrites", "rollouts", "judgments", "preferences", "sft", "ref_logps",
                           "online", "eval_generations", "eval_judgments"}
    prov = provenance(stage="shard", table="pairs", manifest_fingerprint="m", stage_fingerprint="s")
    schema = with_provenance(PAIRS, prov)
    assert read_provenance(schema)["stage_fingerprint"] == "s"
    assert table_of(schema) == "pairs"
    assert table_of(TABLES["preferences"]) == "preferences"
    # The held-out table has the pairs' columns; only its provenance tells it apart.
    assert table_of(with_provenance(PAIRS, {**prov, "table": "heldout"})) == "heldout" and table_of(PAIRS) == "pairs"
    assert "prompt" in TABLES["preferences"].names and "chosen" in TABLES["preferences"].names


def _row(i: int) -> dict:
    return {"pair_id": f"p{i}", "doc_id": "d", "source": "s", "prefix": "a", "suffix": "b",
            "prefix_ids": [1, 2], "suffix_ids": [3], "split_offset": 2, "doc_tokens": 3, "meta": "{}"}


def test_writer_is_atomic_and_uses_the_explicit_schema(tmp_path):
    schema = with_provenance(PAIRS, provenance(stage="t", table="pairs", manifest_fingerprint="m", stage_fingerprint="s"))
    writer = TableWriter(str(tmp_path), schema, row_group_rows=3)

    def rows():
        for i in range(5):
            yield _row(i)
            # While rows are being written, only the hidden temporary file exists.
            assert not (tmp_path / "00002.parquet").exists()
            assert (tmp_path / f".00002.parquet.{os.getpid()}.tmp").exists()

    (tmp_path / ".00002.parquet.999999.tmp").write_bytes(b"left by a killed attempt")
    list(writer.run(rows(), rank=2))
    assert not list(tmp_path.glob(".*.tmp"))
    table = read_table(tmp_path)
    assert table.num_rows == 5 and table.schema.remove_metadata().equals(PAIRS)
    assert pq.ParquetFile(tmp_path / "00002.parquet").metadata.num_row_groups == 2
    assert table_provenance(tmp_path)["table"] == "pairs"


def test_writer_rejects_rows_that_break_the_contract(tmp_path):
    import pytest

    writer = TableWriter(str(tmp_path), PAIRS)
    bad = _row(0) | {"prefix_ids": "not a list"}
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        list(writer.run(iter([bad]), rank=0))
    assert not (tmp_path / "00000.parquet").exists()
