"""Every document's id and where it was read, and the check that no id is used twice.

Pair ids are hashes of the document id, so two documents with one id give pairs that collide
or cannot be told apart, and the stages after the shard (rewrite, rollout, judge) would pay
for every LLM call before the clash showed. A task sees only its own files, so a repeat
across tasks can only be found once all of them are done: each task writes the ids it read
to ``<directory>/<rank>.parquet`` (atomically, so a re-run task replaces its file), and
:func:`check_unique_doc_ids` reads them all together.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, remove_leftovers
from pipeline.errors import SipError

DOC_IDS = pa.schema([
    ("doc_id", pa.string()),
    ("file", pa.string()),  # absolute path of the corpus file
    ("line", pa.int64()),  # JSONL line or Parquet row (1-based); 0 for a text file (one document)
])
_SHOWN_IDS, _SHOWN_PLACES = 3, 3  # an error names a few repeats, not thousands


class DuplicateDocumentId(SipError, ValueError):
    """Two documents of one corpus share an id (``corpus.id_key``)."""


class DocIds:
    """One task's (doc_id, file, line) rows, written in row groups as they come."""

    def __init__(self, writer: pq.ParquetWriter, flush_rows: int):
        self._writer = writer
        self._flush_rows = flush_rows
        self._rows: dict[str, list] = {name: [] for name in DOC_IDS.names}

    def add(self, doc_id: str, file: str, line: int) -> None:
        self._rows["doc_id"].append(doc_id)
        self._rows["file"].append(file)
        self._rows["line"].append(line)
        if len(self._rows["doc_id"]) >= self._flush_rows:
            self.flush()

    def flush(self) -> None:
        if self._rows["doc_id"]:
            self._writer.write_table(pa.table(self._rows, schema=DOC_IDS))
            self._rows = {name: [] for name in DOC_IDS.names}


@contextmanager
def doc_id_file(directory: str, rank: int, flush_rows: int = 65536) -> Iterator[DocIds]:
    """Collect a task's document ids into ``<directory>/<rank>.parquet``.

    The file appears when the block ends without an error and not at all otherwise, so a task
    that did not finish has no say in the check (its re-run writes the file whole).
    """
    final = os.path.join(directory, f"{rank:05d}.parquet")
    os.makedirs(directory, exist_ok=True)
    with atomic_path(final) as tmp, pq.ParquetWriter(tmp, DOC_IDS, compression="zstd") as writer:
        ids = DocIds(writer, flush_rows)
        yield ids
        ids.flush()
    remove_leftovers(final)  # of killed attempts at this task


def check_unique_doc_ids(directory: str | Path) -> None:
    """Raise if any id occurs twice in the files the tasks wrote to ``directory``.

    Raises:
        DuplicateDocumentId: naming the first few repeated ids (in id order) and, for each,
            the files and lines that hold it.
    """
    files = sorted(Path(directory).glob("*.parquet"))
    if not files:
        return
    ids = pl.scan_parquet([str(f) for f in files])
    repeated = ids.group_by("doc_id").agg(pl.len().alias("n")).filter(pl.col("n") > 1).sort("doc_id").collect()
    if repeated.is_empty():
        return
    shown = repeated.head(_SHOWN_IDS)
    places = ids.join(shown.lazy().select("doc_id"), on="doc_id", how="semi").sort("doc_id", "file", "line").collect()
    parts = []
    for doc_id, n in shown.iter_rows():
        rows = places.filter(pl.col("doc_id") == doc_id).head(_SHOWN_PLACES)
        where = ", ".join(f"{file}:{line}" for file, line in rows.select("file", "line").iter_rows())
        parts.append(f"'{doc_id}' {n} times ({where}{', ...' if n > _SHOWN_PLACES else ''})")
    more = f"; {len(repeated) - len(shown)} more ids repeat" if len(repeated) > len(shown) else ""
    raise DuplicateDocumentId(
        f"corpus.id_key: document ids must be unique across the corpus, but {'; '.join(parts)}{more}. Pairs are "
        "identified by their document's id; make the ids unique, or set corpus.id_key: null to number documents "
        "by file and line, then re-run the shard stage with --force"
    )
