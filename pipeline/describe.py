"""Human-readable description of any sip table (``sip inspect``)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from pipeline.io import table_files
from pipeline.schema import read_provenance, table_of


def _short(value, width: int = 100):
    text = repr(value) if not isinstance(value, str) else value
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(path: Path, rows: int = 3) -> str:
    files = table_files(path)
    if not files:
        raise FileNotFoundError(f"no Parquet files at {path}")
    schema = pq.read_schema(files[0])
    prov = read_provenance(schema)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
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
