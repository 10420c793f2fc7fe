"""Dataset cards: ``card.json`` (machine-readable) and ``README.md`` next to a stage's table."""

from __future__ import annotations

import json
from typing import Any

from pipeline.io import row_count, table_files, table_provenance
from pipeline.atomic import write_text_atomic
from pipeline.stage import StageDir


def write_card(stage: StageDir, summary: dict[str, Any], notes: str = "") -> dict[str, Any]:
    card = {
        "stage": stage.stage,
        "table": stage.table,
        "rows": row_count(stage.path),
        "files": [p.name for p in table_files(stage.path)],
        "fingerprint": stage.fingerprint,
        "summary": summary,
        "stats": stage.merged_stats(),
        "provenance": table_provenance(stage.path),
    }
    write_text_atomic(stage.path / "card.json", json.dumps(card, indent=1, sort_keys=True, default=str))
    lines = [
        f"# {stage.manifest.run.name}: {stage.stage} ({stage.table} table)",
        "",
        f"{card['rows']} rows in {len(card['files'])} Parquet files. Open with "
        f"`polars.read_parquet('{stage.path}/*.parquet')` or `sip inspect {stage.path}`.",
        "",
        "## Summary",
        "",
        *(f"- {k}: {v}" for k, v in summary.items()),
        "",
        "## Counters (all tasks)",
        "",
        *(f"- {k}: {v:g}" for k, v in sorted(card["stats"].items())),
        "",
        "## Provenance",
        "",
        "```json",
        json.dumps(card["provenance"], indent=1, sort_keys=True),
        "```",
    ]
    if notes:
        lines += ["", notes.strip()]
    write_text_atomic(stage.path / "README.md", "\n".join(lines) + "\n")
    return card
