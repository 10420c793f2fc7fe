"""Human-readable description of any sip table (``sip inspect``)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SipError
from pipeline.io import table_files
from pipeline.schema import read_provenance, table_of


class InspectError(SipError, ValueError):
    """A path that holds no readable Parquet table, naming it and what was expected."""


def _short(value, width: int = 100):
    text = repr(value) if not isinstance(value, str) else value
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(path: Path, rows: int = 3) -> str:
    """Schema, provenance, row count and the first ``rows`` rows of a table file or stage directory.

    Raises:
        InspectError: ``path`` holds no ``*.parquet`` file, or a file is not Parquet.
    """
    files = table_files(path)
    if not files:
        raise InspectError(f"{path}: no Parquet files; give a table file or a stage directory (e.g. "
                           "<run.output_dir>/shard)")
    counts = []
    for f in files:
        try:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
        except pa.ArrowInvalid as exc:
            raise InspectError(f"{f}: not a Parquet file ({exc}); give a table file or a stage directory") from None
    schema = pq.read_schema(files[0])
    prov = read_provenance(schema)
    total = sum(counts)
    out = [
        f"table: {table_of(schema) or 'unknown (not a sip table)'}",
        f"files: {len(files)}  rows: {total}",
        "schema:",
        *(f"  {field.name}: {field.type}{'' if field.nullable else ' (not null)'}" for field in schema.remove_metadata()),
        "provenance:",
        *("  " + line for line in json.dumps(prov, indent=1, sort_keys=True).splitlines()),
    ]
    if rows > 0 and total:
        first = next(f for f in files if pq.ParquetFile(f).metadata.num_rows)
        head = pl.read_parquet(first, n_rows=rows)
        out.append(f"first {len(head)} rows:")
        for i, row in enumerate(head.iter_rows(named=True)):
            out.append(f"  [{i}]")
            out.extend(f"    {k}: {_short(v)}" for k, v in row.items())
    return "\n".join(out)
