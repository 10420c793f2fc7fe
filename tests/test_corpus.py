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


BOM = b"\xef\xbb\xbf"


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    lines = [json.dumps({"id": f"d{i}", "text": f"document {i}"}).encode() + b"\n" for i in range(5)]
    (tmp_path / "bom.jsonl").write_bytes(BOM + b"".join(lines))
    # Two such files joined with `cat`: the second part's mark sits mid-file.
    (tmp_path / "joined.jsonl").write_bytes(BOM + b"".join(lines[:2]) + BOM + b"".join(lines[2:]))
    with gzip.open(tmp_path / "bom.jsonl.gz", "wb") as fh:
        fh.write(BOM + b"".join(lines))
    (tmp_path / "only-a-mark.jsonl").write_bytes(BOM + b"\n" + lines[0])  # a blank first line is no record
    for name in ("bom.jsonl", "joined.jsonl", "bom.jsonl.gz"):
        docs, counts = read_all(resolve_corpus([str(tmp_path / name)]))
        assert [d.id for d in docs] == [f"d{i}" for i in range(5)], name
        assert counts == {"documents": 5}, name
    files = resolve_corpus([str(tmp_path / "only-a-mark.jsonl")], limit=10)
    assert files[0].max_records == 1 and [d.id for d in read_all(files)[0]] == ["d0"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "note.txt").write_bytes(BOM + "Ein Text mit Umlauten: äöü.".encode())
    docs, _ = read_all(resolve_corpus([str(tmp_path / "docs")]))
    assert [d.text for d in docs] == ["Ein Text mit Umlauten: äöü."]


def zstd_bytes(data: bytes) -> bytes:
    buffer = pa.BufferOutputStream()
    with pa.CompressedOutputStream(buffer, "zstd") as out:
        out.write(data)
    return buffer.getvalue().to_pybytes()


def test_compression_is_read_from_the_bytes_whatever_the_name(tmp_path):
    lines = "".join(json.dumps({"id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(5)).encode()
    (tmp_path / "PART.JSONL.GZ").write_bytes(gzip.compress(lines))  # upper-case extension
    (tmp_path / "part.jsonl.zst").write_bytes(zstd_bytes(lines))
    (tmp_path / "Part.Json.Zst").write_bytes(zstd_bytes(lines))
    (tmp_path / "gzip-named-plain.jsonl").write_bytes(gzip.compress(lines))  # compressed, name says not
    (tmp_path / "plain-named-gzip.jsonl.gz").write_bytes(lines)  # the other way round
    (tmp_path / "text.txt").write_bytes(gzip.compress(b"a gzipped text file"))
    for name in ("PART.JSONL.GZ", "part.jsonl.zst", "Part.Json.Zst", "gzip-named-plain.jsonl", "plain-named-gzip.jsonl.gz"):
        files = resolve_corpus([str(tmp_path / name)], limit=100)
        assert files[0].format == "jsonl" and files[0].max_records == 5, name
        docs, counts = read_all(files)
        assert [d.id for d in docs] == [f"d{i}" for i in range(5)] and counts == {"documents": 5}, name
    docs, _ = read_all(resolve_corpus([str(tmp_path / "text.txt")]))
    assert [d.text for d in docs] == ["a gzipped text file"]


def test_a_truncated_zstd_file_keeps_the_rows_before_the_damage(tmp_path):
    blob = zstd_bytes("".join(json.dumps({"id": i, "text": f"doc {i} " * 50}) + "\n" for i in range(2000)).encode())
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(blob[: len(blob) // 2])
    docs, counts = read_all(resolve_corpus([str(path)], limit=5000))
    assert 0 < len(docs) < 2000 and [d.id for d in docs] == [str(i) for i in range(len(docs))]
    assert counts["skipped_truncated_file"] == 1


def test_files_a_directory_holds_in_no_known_format_are_named(tmp_path):
    from pipeline.corpus import unrecognised_files

    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "part-0.jsonl").write_text(json.dumps({"text": "read"}) + "\n")
    (tmp_path / "corpus" / "part-1.json").write_text(json.dumps({"text": "not read"}) + "\n")
    (tmp_path / "corpus" / "sub" / "part-2.csv").write_text("text\nnot read\n")
    assert [f.name for f in resolve_corpus([str(tmp_path / "corpus")])] == ["part-0.jsonl"]
    assert unrecognised_files([str(tmp_path / "corpus")]) == [
        str(tmp_path / "corpus" / "part-1.json"), str(tmp_path / "corpus" / "sub" / "part-2.csv"),
    ]
    assert unrecognised_files([str(tmp_path / "corpus")], fmt="jsonl") == []  # a forced format reads them all
    (tmp_path / "corpus" / "part-0.jsonl").unlink()
    with pytest.raises(CorpusError, match=r"matched no readable corpus files; left out for their extension: .*part-1.json"):
        resolve_corpus([str(tmp_path / "corpus")])


def test_the_same_id_twice_in_one_file_is_refused_naming_both_lines(tmp_path):
    from pipeline.doc_ids import DuplicateDocumentId, check_unique_doc_ids

    path = write_lines(tmp_path / "c.jsonl", [{"id": "a", "text": "one"}, {"id": "b", "text": "two"},
                                               {"id": "a", "text": "three"}])
    index = tmp_path / "ids"
    docs = list(CorpusReader(resolve_corpus([str(path)]), doc_ids_dir=str(index)).run(None, 0, 1))
    assert len(docs) == 3
    with pytest.raises(DuplicateDocumentId, match=rf"'a' 2 times \({path}:1, {path}:3\)"):
        check_unique_doc_ids(index)
    # Without corpus.id_key the ids are file and line: unique.
    list(CorpusReader(resolve_corpus([str(path)]), id_key=None, doc_ids_dir=str(index)).run(None, 0, 1))
    check_unique_doc_ids(index)


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
