"""Parquet I/O for sip tables: atomic per-task writes and readers of a stage's output.

A task writes ``.<rank>.parquet.<pid>.tmp`` and renames it to ``<rank>.parquet`` only when it
has written every row (:mod:`pipeline.atomic`), so a crashed or killed task leaves no partial
table behind and a re-run of that task (datatrove re-runs ranks without a completion marker)
writes it whole again. The pid in the temporary name keeps two attempts at one task from
writing into one file.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.pipeline.base import PipelineStep

from pipeline.atomic import atomic_path, remove_leftovers
from pipeline.schema import read_provenance


def part_name(rank: int) -> str:
    return f"{rank:05d}.parquet"


def table_files(path: str | Path) -> list[Path]:
    """The Parquet files of a table: a single file, or a stage directory's ``*.parquet``."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.parquet") if not p.name.startswith("."))


@contextmanager
def part_file(path: str | Path, schema: pa.Schema, row_group_rows: int = 2048,
              on_rows: Callable[[int], None] | None = None) -> Iterator[Callable[[dict], None]]:
    """One task's Parquet file of a table, written in row groups with an explicit schema.

    Yields ``add(row)``; the file appears (renamed from its temporary) only when the block ends
    without an exception, and the temporaries of killed earlier attempts are then removed.

    Args:
        path: the final file, e.g. ``<stage>/00003.parquet``; its directory must exist.
        schema: the table's schema, provenance included; a row that breaks it raises
            ``pyarrow.ArrowInvalid`` / ``ArrowTypeError`` (and no file appears).
        row_group_rows: rows per row group (the unit later stages deal out to their tasks).
        on_rows: called with the number of rows of each row group written (stats).
    """
    buffer: list[dict] = []
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:

        def flush() -> None:
            if buffer:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                if on_rows is not None:
                    on_rows(len(buffer))
                buffer.clear()

        def add(row: dict) -> None:
            buffer.append(row)
            if len(buffer) >= row_group_rows:
                flush()

        yield add
        flush()
    remove_leftovers(path)


class TableWriter(PipelineStep):
    """Last step of a stage: writes the rows (dicts) it receives with an explicit schema."""

    name = "parquet"
    type = "💽 - WRITER"

    def __init__(self, output_dir: str, schema: pa.Schema, row_group_rows: int = 2048):
        super().__init__()
        self.output_dir = output_dir
        self.schema = schema
        self.row_group_rows = row_group_rows

    def run(self, data: Iterable[dict] | None, rank: int = 0, world_size: int = 1) -> Iterator:
        os.makedirs(self.output_dir, exist_ok=True)
        with part_file(os.path.join(self.output_dir, part_name(rank)), self.schema, self.row_group_rows,
                       on_rows=lambda n: self.stat_update("rows_written", value=n)) as add:
            for row in data or ():
                add(row)
        yield from ()


# Schema-metadata key of a chunk file's own counters (judge calls, tokens, ...): they live with
# the rows they describe, so a card summed over the files is right after any resume.
CHUNK_STATS_KEY = b"sip_chunk_stats"


def write_table_atomic(path: str, rows: list[dict], schema: pa.Schema, stats: dict | None = None) -> None:
    """Write ``rows`` as one Parquet file that appears complete or not at all (with ``stats``
    stored in its metadata, see :func:`chunk_stats`)."""
    if stats:
        schema = schema.with_metadata({**(schema.metadata or {}), CHUNK_STATS_KEY: json.dumps(stats).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, compression="zstd")


class TableReader(PipelineStep):
    """First step of a stage that reads an upstream sip table: files[rank::world_size], as dicts."""

    name = "table"
    type = "📖 - READER"

    def __init__(self, path: str, columns: list[str] | None = None, batch_rows: int = 1024):
        super().__init__()
        self.path = path
        self.columns = columns
        self.batch_rows = batch_rows

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        # Row groups, not whole files, are dealt out to tasks, so a stage can use more tasks
        # (GPUs) than its upstream had files.
        units = [(f, g) for f in table_files(self.path) for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
        for file, group in units[rank::world_size]:
            table = pq.ParquetFile(file).read_row_group(group, columns=self.columns)
            for batch in table.to_batches(max_chunksize=self.batch_rows):
                for row in batch.to_pylist():
                    self.stat_update("rows_read")
                    yield row


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    files = table_files(path)
    if not files:
        raise FileNotFoundError(f"no Parquet files at {path}")
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def table_provenance(path: str | Path) -> dict | None:
    files = table_files(path)
    return read_provenance(pq.read_schema(files[0])) if files else None


def chunk_stats(path: str | Path) -> dict[str, float]:
    """The counters of every chunk file of a table, summed."""
    total: dict[str, float] = {}
    for f in table_files(path):
        raw = (pq.read_schema(f).metadata or {}).get(CHUNK_STATS_KEY)
        for key, value in (json.loads(raw) if raw else {}).items():
            total[key] = total.get(key, 0) + value
    return total


def row_count(path: str | Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in table_files(path))
