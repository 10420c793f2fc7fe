"""Bad input: every case is a counted skip or a clear error; no good row is ever lost."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.corpus import CorpusError, CorpusReader, resolve_corpus


def read_all(files, **kw):
    reader = CorpusReader(files, **kw)
    docs = list(reader.run(None, 0, 1))
    counts = {k: v.total for k, v in reader.stats.stats.items()}
    return docs, counts


def test_bad_jsonl_lines_are_counted_skips_and_good_rows_survive(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    good = [{"id": f"g{i}", "text": f"good document {i}", "lang": "en"} for i in range(4)]
    with open(path, "wb") as fh:
        fh.write(json.dumps(good[0]).encode() + b"\n")
        fh.write(b'{"id": "broken", "text": "unterminated\n')  # malformed JSON
        fh.write(json.dumps(good[1]).encode() + b"\n")
        fh.write(b'{"id": "x", "body": "no text key"}\n')
        fh.write(b'{"id": "latin1", "text": "caf\xe9"}\n')  # not UTF-8
        fh.write(b"\n")  # blank lines are not records
        fh.write(b'{"id": "empty", "text": "   "}\n')
        fh.write(b'{"id": "num", "text": 42}\n')
        fh.write(b"[1, 2]\n")
        fh.write(json.dumps(good[2]).encode() + b"\n")
        fh.write(json.dumps(good[3]).encode() + b"\n")
    docs, counts = read_all(resolve_corpus([str(path)]))
    assert [d.id for d in docs] == ["g0", "g1", "g2", "g3"]
    assert docs[0].metadata == {"lang": "en", "source": "bad.jsonl"}
    assert counts == {
        "documents": 4, "skipped_malformed_json": 2, "skipped_missing_text": 1,
        "skipped_non_utf8": 1, "skipped_empty": 1, "skipped_bad_text": 1,
    }


def test_skips_are_logged_with_file_and_line(tmp_path):
    from loguru import logger

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{oops\n')
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        read_all(resolve_corpus([str(path)]))
    finally:
        logger.remove(sink)
    assert any(f"{path}:2: skipped (malformed_json)" in m for m in messages)


def test_formats_gzip_parquet_text_and_fallback_ids(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "from gzip"}) + "\n")
    pq.write_table(pa.table({"text": ["from parquet", None], "n": [1, 2]}), tmp_path / "b.parquet")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "c.txt").write_text("from a text file")
    (tmp_path / "docs" / "README").write_text("not a corpus file")  # ignored inside directories
    files = resolve_corpus([str(tmp_path / "*.jsonl.gz"), str(tmp_path / "b.parquet"), str(tmp_path / "docs")])
    docs, counts = read_all(files)
    assert {d.text: d.id for d in docs} == {
        "from gzip": "a.jsonl.gz:1", "from parquet": "b.parquet:1", "from a text file": "docs/c.txt",
    }
    assert counts["skipped_missing_text"] == 1


def test_a_10mb_single_line_document_is_read(tmp_path):
    path = tmp_path / "big.jsonl"
    text = "word " * (2 * 1024 * 1024)
    path.write_text(json.dumps({"id": "big", "text": text}) + "\n" + json.dumps({"id": "s", "text": "small"}) + "\n")
    docs, _ = read_all(resolve_corpus([str(path)]))
    assert [len(d.text) for d in docs] == [len(text), 5]


def test_corpus_level_errors_are_clear(tmp_path):
    with pytest.raises(CorpusError, match=r"corpus.paths: '.*nothing\*.jsonl' matched no files"):
        resolve_corpus([str(tmp_path / "nothing*.jsonl")])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(CorpusError, match=r"x.parquet: no column 'text' \(corpus.text_key\)"):
        resolve_corpus([str(tmp_path / "x.parquet")])
    (tmp_path / "data.bin").write_bytes(b"\0")
    with pytest.raises(CorpusError, match="set corpus.format"):
        resolve_corpus([str(tmp_path / "data.bin")])
    (tmp_path / "broken.parquet").write_text('{"text": "not parquet"}\n')
    with pytest.raises(CorpusError, match=r"broken.parquet: not a readable Parquet file .*corpus.paths"):
        resolve_corpus([str(tmp_path / "broken.parquet")])


def test_limit_counts_records_in_file_order(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(3)))
    files = resolve_corpus([str(tmp_path / "*.jsonl")], limit=5)
    assert [(f.name, f.max_records) for f in files] == [("a.jsonl", 3), ("b.jsonl", 2)]
    docs, _ = read_all(files)
    assert [d.text for d in docs] == ["a0", "a1", "a2", "b0", "b1"]
    # Tasks split files, not records: two tasks together read exactly the same documents.
    split = [d.text for r in range(2) for d in CorpusReader(files).run(None, r, 2)]
    assert sorted(split) == sorted(d.text for d in docs)


def test_a_truncated_gzip_keeps_the_rows_before_the_damage(tmp_path):
    blob = gzip.compress("".join(json.dumps({"id": i, "text": f"doc {i} " * 50}) + "\n" for i in range(2000)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    files = resolve_corpus([str(path)], limit=5000)  # counting records survives it too
    docs, counts = read_all(files)
    assert 0 < len(docs) < 2000 and [d.id for d in docs] == [str(i) for i in range(len(docs))]
    assert counts["skipped_truncated_file"] == 1


def test_files_with_the_same_name_in_different_directories_get_distinct_ids(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "part-0.jsonl").write_text(json.dumps({"text": f"from {sub}"}) + "\n")
    files = resolve_corpus([str(tmp_path / "a" / "*.jsonl"), str(tmp_path / "b" / "part-0.jsonl")])
    docs, _ = read_all(files, id_key=None)
    assert sorted(d.id for d in docs) == ["a/part-0.jsonl:1", "b/part-0.jsonl:1"]
