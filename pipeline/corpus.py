"""Reading corpora: JSONL (optionally gzip- or zstd-compressed), Parquet and plain text files.

Bad input never crashes a task and never costs a good row: a malformed line, a missing or
non-string text, non-UTF-8 bytes or an empty document is skipped, counted in the task's
stats under ``skipped_<reason>`` and logged with its file and line. Problems that concern a
whole corpus (a glob that matches nothing, a Parquet file without the text column) are
found before any task starts, by :func:`resolve_corpus`.

Files as other tools write them are read as they are meant: the format comes from the
extension in any case (``PART.JSONL.GZ``), compression from the file's first bytes (a gzip
file named ``.jsonl`` is still decompressed), and a UTF-8 byte order mark is not part of
the first record.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import io
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import orjson
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from loguru import logger

from pipeline.doc_ids import doc_id_file
from pipeline.errors import SipError
from pipeline.progress import Progress

# Not a bare .json (as often one JSON document as JSON lines); .json.gz/.json.zst is how
# large JSON-lines corpora ship (C4, Dolma). Matched in any case.
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".json.gz", ".jsonl.zst", ".ndjson.zst", ".json.zst")
TEXT_SUFFIXES = (".txt",)
_GZIP_MAGIC, _ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
# What a truncated or corrupt compressed file raises part-way through (pyarrow's zstd: OSError).
_READ_ERRORS = (EOFError, OSError, zlib.error)
_WARNINGS_PER_FILE = 20  # a corrupt file should not flood the logs; the stats keep the full count


class CorpusError(SipError, ValueError):
    """A corpus that cannot be read at all, with the file or key that is wrong."""


@dataclass(frozen=True)
class CorpusFile:
    path: str  # absolute
    name: str  # relative to the common directory of all corpus files: unique, used in ids and `source`
    format: str  # jsonl | parquet | text
    max_records: int | None = None  # from corpus.limit, applied in file order
    # As planned: a file whose size, modification or change time or inode differs when a task
    # reads it is refused (the change time and inode catch a copy that kept size and mtime, `cp -p`).
    size: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    inode: int | None = None

    def check_unchanged(self) -> None:
        """Raise unless the file is as it was when the corpus was planned.

        Raises:
            CorpusError: naming the file, when it is gone, or its size, modification or change
                time or inode changed: documents of two versions of a corpus must not mix in
                one table.
        """
        if self.size is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise CorpusError(f"{self.path}: the corpus file disappeared after the stage was planned; the task writes "
                              "nothing. Restore it, or re-run with the corpus as it is now (with --force: the other "
                              "tasks' files hold its documents)") from None
        if _file_version(st) != (self.size, self.mtime_ns, self.ctime_ns, self.inode):
            raise CorpusError(f"{self.path}: the corpus file changed after the stage was planned (size {self.size:,} -> "
                              f"{st.st_size:,} bytes, modified or replaced); the task writes nothing, so the table does not "
                              "mix two versions of it. Re-run once the corpus is final (with --force if its size "
                              "changed: the stage's fingerprint covers the file sizes)")


def _format_of(path: str, forced: str) -> str | None:
    if forced != "auto":
        return forced
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _expand(pattern: str) -> list[str]:
    if os.path.isdir(pattern):
        return sorted(p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True) if os.path.isfile(p))
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


def _matches(patterns: list[str], fmt: str) -> tuple[dict[str, str], list[str]]:
    """({absolute path: format} of the corpus files, sorted absolute paths of the files that
    directories among ``patterns`` hold in no format sip reads).

    Raises:
        CorpusError: a pattern matched no file, or a file named by a glob has no known format.
    """
    found: dict[str, str] = {}
    ignored: set[str] = set()
    for pattern in patterns:
        matched = _expand(pattern)
        if not matched:
            raise CorpusError(f"corpus.paths: '{pattern}' matched no files")
        for path in matched:
            kind = _format_of(path, fmt)
            if kind is None:
                if os.path.isdir(pattern):
                    # Directories may hold unrelated files (READMEs, checksums): left out, but
                    # reported by the shard stage, since a data file in an unknown format
                    # (part-0.json, part-0.csv) would be left out too.
                    ignored.add(os.path.abspath(path))
                    continue
                raise CorpusError(
                    f"corpus.paths: cannot tell the format of '{path}' from its extension (expected one of "
                    f"{', '.join(JSONL_SUFFIXES + ('.parquet',) + TEXT_SUFFIXES)}); set corpus.format to jsonl, "
                    "parquet or text"
                )
            found.setdefault(os.path.abspath(path), kind)
    return found, sorted(ignored)


def unrecognised_files(patterns: list[str], fmt: str = "auto") -> list[str]:
    """The files (absolute paths, sorted) that directories in ``patterns`` hold but the corpus
    leaves out because their extension names no format sip reads.

    Raises:
        CorpusError: as :func:`resolve_corpus`, for a pattern that matches nothing.
    """
    return _matches(patterns, fmt)[1]


def resolve_corpus(
    patterns: list[str], *, fmt: str = "auto", text_key: str = "text", limit: int | None = None
) -> list[CorpusFile]:
    """Expand the manifest's corpus paths into a sorted, de-duplicated list of files.

    Files inside a directory whose format is unknown are left out (see :func:`unrecognised_files`).

    Raises:
        CorpusError: a pattern matched no readable file, a file's format is unknown, or a
            Parquet file cannot be read or lacks ``text_key``.
    """
    found, ignored = _matches(patterns, fmt)
    if not found:
        left_out = f"; left out for their extension: {', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}"
        raise CorpusError(f"corpus.paths: {patterns} matched no readable corpus files{left_out if ignored else ''}")
    # Names relative to the common directory are unique (two globs may both match part-0.jsonl
    # in different directories) and do not change when the whole corpus moves.
    root = os.path.commonpath([os.path.dirname(p) for p in found])
    ordered = sorted((CorpusFile(path, os.path.relpath(path, root), kind, None, *_file_version(os.stat(path)))
                      for path, kind in found.items()), key=lambda f: f.name)
    for file in ordered:
        if file.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                names = pq.read_schema(file.path).names
            except pa.ArrowInvalid as exc:
                raise CorpusError(f"{file.path}: not a readable Parquet file ({exc}); fix or remove it, or narrow "
                                  "corpus.paths") from None
            if text_key not in names:
                raise CorpusError(f"{file.path}: no column '{text_key}' (corpus.text_key); columns: {names}")
    if limit is None:
        return ordered
    limited, remaining = [], limit
    for file in ordered:
        if remaining <= 0:
            break
        n = _count_records(file, remaining)
        take = min(n, remaining)
        limited.append(dataclasses.replace(file, max_records=take))
        remaining -= take
    return limited


def _file_version(st: os.stat_result) -> tuple[int, int, int, int]:
    """Size, modification and change times (ns) and inode: what differs when a file is
    rewritten, replaced or copied over."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _compression(raw: BinaryIO) -> str | None:
    """'gzip', 'zstd' or None, from the first bytes of ``raw`` (left at its start).

    The bytes decide, not the name: a name can be wrong (a gzip file saved as ``.jsonl``, or
    an upper-case ``.GZ``), the magic numbers cannot, and neither can start a JSON line.
    """
    head = raw.read(4)
    raw.seek(0)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return None


@contextmanager
def open_corpus_file(path: str) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """Open a corpus file for reading: ``(raw, stream)``, the file on disk (its ``tell()`` is
    how far the reading got) and its decompressed bytes (``raw`` itself when not compressed).

    Reading ``stream`` of a truncated or corrupt file raises one of ``EOFError``, ``OSError``
    or ``zlib.error`` part-way through.
    """
    with open(path, "rb") as raw:
        kind = _compression(raw)
        if kind == "gzip":
            with gzip.GzipFile(fileobj=raw) as stream:
                yield raw, stream
        elif kind == "zstd":
            import pyarrow as pa  # zstd through pyarrow: no extra dependency

            # pyarrow's stream has no readline; the buffer gives it one (and line iteration).
            with io.BufferedReader(pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")) as stream:
                yield raw, stream
        else:
            yield raw, raw


def _without_bom(line: bytes) -> bytes:
    """A line without a leading UTF-8 byte order mark: editors on Windows put one before the
    first line, and files joined with ``cat`` keep one before each part's first line."""
    return line[len(codecs.BOM_UTF8):] if line.startswith(codecs.BOM_UTF8) else line


def _count_records(file: CorpusFile, stop_at: int) -> int:
    if file.format == "text":
        return 1
    if file.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file.path).metadata.num_rows
    count = 0
    try:
        with open_corpus_file(file.path) as (_, stream):
            for line in stream:
                if _without_bom(line).strip():  # what the reader counts as a record
                    count += 1
                    if count >= stop_at:
                        break
    except _READ_ERRORS:
        pass  # a truncated file has as many records as could be read; the reader counts the rest
    return count


class CorpusReader(PipelineStep):
    """datatrove reader over a resolved file list; each task reads files[rank::world_size].

    Args:
        files: from :func:`resolve_corpus`.
        text_key: the record field holding the text (``corpus.text_key``).
        id_key: the record field holding the document id (``corpus.id_key``); None, or a record
            without it: ``<file name>:<line>``.
        doc_ids_dir: where each task writes the id, file and line of every document it yields
            (:mod:`pipeline.doc_ids`), for the check that ids are unique across all tasks; None
            to write nothing.
    """

    name = "corpus"
    type = "📖 - READER"

    def __init__(self, files: list[CorpusFile], text_key: str = "text", id_key: str | None = "id",
                 doc_ids_dir: str | None = None):
        super().__init__()
        self.files = files
        self.text_key = text_key
        self.id_key = id_key
        self.doc_ids_dir = doc_ids_dir
        self._warned: dict[str, int] = {}
        self._position = 0  # bytes of the current file consumed (for progress)

    def _skip(self, file: CorpusFile, where: str, reason: str, detail: str) -> None:
        self.stat_update(f"skipped_{reason}")
        seen = self._warned.get(file.path, 0)
        self._warned[file.path] = seen + 1
        if seen < _WARNINGS_PER_FILE:
            logger.warning(f"{file.path}:{where}: skipped ({reason}): {detail}")
        elif seen == _WARNINGS_PER_FILE:
            logger.warning(f"{file.path}: more skipped records; see the skipped_* counts in the stats")

    def _document(self, file: CorpusFile, where: str, record: dict) -> Document | None:
        text = record.get(self.text_key)
        if text is None:
            self._skip(file, where, "missing_text", f"no '{self.text_key}' key (corpus.text_key)")
            return None
        if not isinstance(text, str):
            self._skip(file, where, "bad_text", f"'{self.text_key}' is {type(text).__name__}, expected a string")
            return None
        if not text.strip():
            self._skip(file, where, "empty", "empty text")
            return None
        raw_id = record.get(self.id_key) if self.id_key else None
        doc_id = str(raw_id) if raw_id is not None else f"{file.name}:{where}"
        meta = {k: v for k, v in record.items() if k not in (self.text_key, self.id_key)}
        meta["source"] = file.name
        return Document(text=text, id=doc_id, metadata=meta)

    def _jsonl(self, file: CorpusFile) -> Iterator[tuple[int, Document]]:
        records, lineno = 0, 0
        with open_corpus_file(file.path) as (raw, stream):
            lines = enumerate(stream, start=1)
            while True:
                try:
                    lineno, line = next(lines)
                except StopIteration:
                    return
                except _READ_ERRORS as exc:
                    # Keep every record read so far; the rest of the file is unreadable.
                    self._skip(file, str(lineno + 1), "truncated_file", f"unreadable from here on ({exc})")
                    return
                if lineno % 256 == 0:
                    self._position = raw.tell()
                line = _without_bom(line)
                if not line.strip():
                    continue
                if file.max_records is not None and records >= file.max_records:
                    return
                records += 1
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    self._skip(file, str(lineno), "non_utf8", f"invalid UTF-8 at byte {exc.start}")
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    self._skip(file, str(lineno), "malformed_json", str(exc))
                    continue
                if not isinstance(record, dict):
                    self._skip(file, str(lineno), "malformed_json", f"expected an object, got {type(record).__name__}")
                    continue
                if (doc := self._document(file, str(lineno), record)) is not None:
                    yield lineno, doc

    def _parquet(self, file: CorpusFile) -> Iterator[tuple[int, Document]]:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(file.path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                if file.max_records is not None and row >= file.max_records:
                    return
                row += 1
                if (doc := self._document(file, str(row), record)) is not None:
                    yield row, doc

    def _text(self, file: CorpusFile) -> Iterator[tuple[int, Document]]:
        try:
            with open_corpus_file(file.path) as (_, stream):
                data = _without_bom(stream.read())
        except _READ_ERRORS as exc:
            self._skip(file, "0", "truncated_file", f"unreadable ({exc})")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._skip(file, "0", "non_utf8", f"invalid UTF-8 at byte {exc.start}")
            return
        doc = self._document(file, "0", {self.text_key: text, **({self.id_key: file.name} if self.id_key else {})})
        if doc is not None:
            yield 0, doc

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        if data:
            yield from data
        mine = self.files[rank::world_size]
        if self.doc_ids_dir is None:
            yield from self._read(mine, rank, lambda *_: None)
            return
        with doc_id_file(self.doc_ids_dir, rank) as doc_ids:
            yield from self._read(mine, rank, doc_ids.add)

    def _read(self, files: list[CorpusFile], rank: int, record_id) -> Iterator[Document]:
        """The documents of ``files``; ``record_id(doc_id, path, line)`` is called for each."""
        readers = {"jsonl": self._jsonl, "parquet": self._parquet, "text": self._text}
        for file in files:  # every file of the task as planned, before any is read
            file.check_unchanged()
        total_bytes = sum(os.path.getsize(f.path) for f in files) or 1
        done_bytes = 0
        progress = Progress(f"task {rank}: read", unit="documents")
        for file in files:
            logger.info(f"reading {file.path}")
            file.check_unchanged()
            self._position = 0
            for line, doc in readers[file.format](file):
                record_id(doc.id, file.path, line)
                self.stat_update("documents")
                progress.update(1, (done_bytes + self._position) / total_bytes)
                yield doc
            file.check_unchanged()  # changed while it was read: the task fails, its table is never written
            done_bytes += os.path.getsize(file.path)
