"""The held-out split of the shard stage: documents kept for evaluation, never for training.

With ``shard.eval_fraction`` > 0 the shard stage sends the pairs of a share of the documents,
chosen by a hash of (seed, document id), to the held-out table instead of the pairs table.
They are cut exactly as the other documents are (prefix, true suffix of N tokens, ids), so an
evaluation can continue their prefixes and score the true suffixes. Layout::

    <output_dir>/shard/heldout/00000.parquet ...   one file per task, the pairs schema,
                                                   provenance table ``heldout``

The pairs table, which every later stage and the trainer read, never holds a held-out
document; the trainer refuses a phase whose table is this one (``trainer/source.py``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow as pa
from datatrove.pipeline.base import PipelineStep

from pipeline.io import part_file, part_name

HELDOUT_DIR = "heldout"  # in the shard stage's directory


def heldout_document(doc_id: str, *, seed: int, fraction: float) -> bool:
    """Whether a document is held out for evaluation (``shard.eval_fraction``).

    With ``h`` the first 8 bytes of ``sha256("heldout" US seed US doc_id)`` (UTF-8, US = the
    unit separator ``\x1f``) read as a big-endian integer, the document is held out when
    ``h < fraction * 2**64``: each document independently with probability ``fraction``. The
    answer depends on nothing but (seed, doc id), so it is the same in any task, run or machine
    (sha256, unlike Python's ``hash``, is not salted per process), another seed draws another
    split, and a larger fraction holds out a superset of the documents.
    """
    digest = hashlib.sha256(f"heldout\x1f{seed}\x1f{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


class HeldOutSplit(PipelineStep):
    """Diverts the pairs of held-out documents (:func:`heldout_document`) to the held-out table
    and passes every other pair on to the pairs table's writer.

    Each task writes ``<heldout_dir>/<rank>.parquet`` (empty when it holds no document out),
    atomically like the pairs table, so a killed task leaves neither file half-written and a
    re-run writes both again.
    """

    name = "held out"
    type = "🔒 - HELD-OUT"

    def __init__(self, heldout_dir: str, schema: pa.Schema, *, fraction: float, seed: int):
        super().__init__()
        self.heldout_dir = heldout_dir
        self.schema = schema
        self.fraction = fraction
        self.seed = seed

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        os.makedirs(self.heldout_dir, exist_ok=True)
        with part_file(os.path.join(self.heldout_dir, part_name(rank)), self.schema) as add:
            for row in data or ():
                if heldout_document(row["doc_id"], seed=self.seed, fraction=self.fraction):
                    add(row)
                    self.stat_update("heldout_pairs")
                else:
                    yield row


def heldout_summary(heldout_dir: Path, fraction: float) -> dict:
    """The held-out table's pairs and documents (the documents held out that were long enough)."""
    counts = (pl.scan_parquet(str(heldout_dir / "*.parquet"))
              .select(pl.len().alias("pairs"), pl.col("doc_id").n_unique().alias("documents"))
              .collect().row(0, named=True))
    return {"eval_fraction": fraction, "heldout_pairs": counts["pairs"], "heldout_documents": counts["documents"]}
