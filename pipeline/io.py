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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Unit:
    """One row group of a pairs table: the unit of work of every pair-keyed stage.

    Rewrite, rollout, judge and prefs tasks are dealt units, not files, and name their output
    files by the unit (``<unit key>_<chunk>.parquet``). So whatever the task counts, a later
    stage finds a unit's upstream rows by name and reads only those: a task's memory is one
    unit's rows, not the table's.
    """

    file: Path
    group: int

    @property
    def key(self) -> str:
        """``<file stem>_<row group>``, e.g. ``00003_00001`` (sorts in table order)."""
        return f"{self.file.stem}_{self.group:05d}"

    def read(self, columns: list[str] | None = None) -> pa.Table:
        return pq.ParquetFile(self.file).read_row_group(self.group, columns=columns)


def table_units(path: str | Path) -> list[Unit]:
    """Every row group of the table at ``path``, in table order."""
    return [Unit(f, g) for f in table_files(path) for g in range(pq.ParquetFile(f).metadata.num_row_groups)]


@dataclass
class WorkUnit:
    """The input of a :class:`pipeline.chunks.ChunkedStep`: rows and the key its output files are
    named by (a :class:`Unit`'s key, or a task's rank for stages not keyed by pair)."""

    key: str
    rows: list[dict]


class UnitReader(PipelineStep):
    """First step of a pair-keyed stage: the units of a pairs table dealt to tasks
    (``units[rank::world_size]``), each as one :class:`WorkUnit`.

    Row groups, not whole files, are dealt out, so a stage can use more tasks (GPUs) than its
    upstream had files.
    """

    name = "table"
    type = "📖 - READER"

    def __init__(self, path: str, columns: list[str] | None = None):
        super().__init__()
        self.path = path
        self.columns = columns

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[WorkUnit]:
        for unit in table_units(self.path)[rank::world_size]:
            rows = unit.read(self.columns).to_pylist()
            self.stat_update("rows_read", value=len(rows))
            yield WorkUnit(unit.key, rows)


# In the layout of every pair-keyed stage (its _stage.json): a directory made before files were
# named by unit conflicts instead of being resumed into duplicates.
UNIT_LAYOUT = {"files": "one per pairs-table row group and chunk: <unit>_<chunk>.parquet"}


def unit_files(path: str | Path, key: str) -> list[Path]:
    """The files of a pair-keyed stage's table at ``path`` that hold unit ``key``'s rows."""
    return sorted(Path(path).glob(f"{key}_*.parquet"))


def read_unit(path: str | Path, key: str, columns: list[str] | None = None) -> pa.Table:
    """Unit ``key``'s rows of the pair-keyed table at ``path`` (its chunk files, in order).

    Raises:
        FileNotFoundError: the table has no file of that unit (the stage that makes it did
            not finish, or was made from another pairs table).
    """
    files = unit_files(path, key)
    if not files:
        raise FileNotFoundError(f"{path}: no files of unit {key} ({key}_*.parquet); the stage that writes it did not "
                                "finish, or read another pairs table")
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def unit_tables(pairs_dir: str | Path, path: str | Path, columns: list[str],
                pair_columns: list[str] | None = None) -> Iterator[tuple[pa.Table, pa.Table]]:
    """For each unit of the pairs table at ``pairs_dir``, in table order: its pairs
    (``pair_columns``, default ``pair_id``) and its rows of the pair-keyed table at ``path``
    (``columns``; empty when the unit has no file). What a card job summarizes a unit at a
    time, so it holds one unit's rows, not the table's."""
    empty = None
    for unit in table_units(pairs_dir):
        pairs = unit.read(pair_columns or ["pair_id"])
        files = unit_files(path, unit.key)
        if files:
            rows = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
        else:
            if empty is None:
                written = table_files(path)
                empty = pq.read_schema(written[0]).empty_table().select(columns) if written else pa.table(
                    {c: pa.array([], pa.null()) for c in columns})
            rows = empty
        yield pairs, rows


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
