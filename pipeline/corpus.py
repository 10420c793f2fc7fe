"""Reading corpora: JSONL (optionally gzipped), Parquet and directories of plain text.

Bad input never crashes a task and never costs a good row: a malformed line, a missing or
non-string text, non-UTF-8 bytes or an empty document is skipped, counted in the task's
stats under ``skipped_<reason>`` and logged with its file and line. Problems that concern a
whole corpus (a glob that matches nothing, a Parquet file without the text column) are
found before any task starts, by :func:`resolve_corpus`.
"""

from __future__ import annotations

import glob
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import orjson
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from loguru import logger

from pipeline.errors import SipError
from pipeline.progress import Progress

TEXT_SUFFIXES = (".txt",)
# What a truncated or corrupt compressed file raises part-way through.
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


def _format_of(path: str, forced: str) -> str | None:
    if forced != "auto":
        return forced
    lower = path.lower()
    if lower.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
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


def _count_records(file: CorpusFile, stop_at: int) -> int:
    if file.format == "text":
        return 1
    if file.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file.path).metadata.num_rows
    count = 0
    try:
        with _open_binary(file.path) as fh:
            for line in fh:
                if line.strip():
                    count += 1
                    if count >= stop_at:
                        break
    except _READ_ERRORS:
        pass  # a truncated file has as many records as could be read; the reader counts the rest
    return count


def resolve_corpus(
    patterns: list[str], *, fmt: str = "auto", text_key: str = "text", limit: int | None = None
) -> list[CorpusFile]:
    """Expand the manifest's corpus paths into a sorted, de-duplicated list of files.

    Raises:
        CorpusError: a pattern matched no readable file, a file's format is unknown, or a
            Parquet file cannot be read or lacks ``text_key``.
    """
    found: dict[str, str] = {}
    for pattern in patterns:
        matched = _expand(pattern)
        if not matched:
            raise CorpusError(f"corpus.paths: '{pattern}' matched no files")
        for path in matched:
            kind = _format_of(path, fmt)
            if kind is None:
                if os.path.isdir(pattern):
                    continue  # directories may hold unrelated files (READMEs, checksums)
                raise CorpusError(
                    f"corpus.paths: cannot tell the format of '{path}'; set corpus.format to jsonl, parquet or text"
                )
            found.setdefault(os.path.abspath(path), kind)
    if not found:
        raise CorpusError(f"corpus.paths: {patterns} matched no readable corpus files")
    # Names relative to the common directory are unique (two globs may both match part-0.jsonl
    # in different directories) and do not change when the whole corpus moves.
    root = os.path.commonpath([os.path.dirname(p) for p in found])
    ordered = sorted(
        (CorpusFile(path, os.path.relpath(path, root), kind) for path, kind in found.items()), key=lambda f: f.name
    )
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
        limited.append(CorpusFile(file.path, file.name, file.format, take))
        remaining -= take
    return limited


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


class CorpusReader(PipelineStep):
    """datatrove reader over a resolved file list; each task reads files[rank::world_size]."""

    name = "corpus"
    type = "📖 - READER"

    def __init__(self, files: list[CorpusFile], text_key: str = "text", id_key: str | None = "id"):
        super().__init__()
        self.files = files
        self.text_key = text_key
        self.id_key = id_key
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

    def _jsonl(self, file: CorpusFile) -> Iterator[Document]:
        records, lineno = 0, 0
        with open(file.path, "rb") as raw, (gzip.GzipFile(fileobj=raw) if file.path.endswith(".gz") else raw) as fh:
            lines = enumerate(fh, start=1)
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
                    yield doc

    def _parquet(self, file: CorpusFile) -> Iterator[Document]:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(file.path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                if file.max_records is not None and row >= file.max_records:
                    return
                row += 1
                if (doc := self._document(file, str(row), record)) is not None:
                    yield doc

    def _text(self, file: CorpusFile) -> Iterator[Document]:
        raw = Path(file.path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._skip(file, "0", "non_utf8", f"invalid UTF-8 at byte {exc.start}")
            return
        doc = self._document(file, "0", {self.text_key: text, **({self.id_key: file.name} if self.id_key else {})})
        if doc is not None:
            yield doc

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        if data:
            yield from data
        readers = {"jsonl": self._jsonl, "parquet": self._parquet, "text": self._text}
        mine = self.files[rank::world_size]
        total_bytes = sum(os.path.getsize(f.path) for f in mine) or 1
        done_bytes = 0
        progress = Progress(f"task {rank}: read", unit="documents")
        for file in mine:
            logger.info(f"reading {file.path}")
            self._position = 0
            for doc in readers[file.format](file):
                self.stat_update("documents")
                progress.update(1, (done_bytes + self._position) / total_bytes)
                yield doc
            done_bytes += os.path.getsize(file.path)

