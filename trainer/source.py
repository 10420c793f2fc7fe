"""Training rows from a sip table, in a seeded order per epoch, addressed by a resumable position.

The position is the number of samples consumed so far in the phase. Sample ``k`` is row
``permutation(epoch = k // rows)[k % rows]``, each epoch's permutation drawn from
``(seed, epoch)``: the order depends on nothing but the seed, so a resumed run that restores
the position reads exactly the rows an uninterrupted run would have read.

What is trained on, per table:
- ``pairs`` (objective ``ntp``): the whole window, prefix + original suffix, as target
  (plain next-token pretraining; the window keeps its last ``max_len`` tokens);
- ``sft`` (``rf_nll``): ``target_ids`` given ``prefix_ids``;
- ``preferences`` (``dpo``): ``chosen_ids`` and ``rejected_ids`` given ``prefix_ids``; the
  reference log-probs are joined to the rows by ``pair_id`` (trainer/ref_logps.py);
- ``prefixes`` (online phases): the pairs table's rows as they are; the online phase
  (trainer/online.py) samples, judges and picks what is trained on.

Rows are read from a cached copy of the table (trainer/table_cache.py): a phase holds a
micro-batch's rows and its epoch's order, not the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SipError
from pipeline.io import table_files
from trainer.table_cache import CachedTable, open_cached
from pipeline.schema import HELDOUT_TABLE, read_provenance

COLUMNS = {
    "pairs": ["prefix_ids", "suffix_ids"],
    "sft": ["prefix_ids", "target_ids", "source"],
    "preferences": ["pair_id", "prefix_ids", "chosen_ids", "rejected_ids", "chosen_source", "rejected_source"],
    # An online phase's prefixes: the pairs table, with what the candidates of a pair need.
    "prefixes": ["pair_id", "prefix", "suffix", "prefix_ids", "suffix_ids"],
}


class TableError(SipError, ValueError):
    """A training table that is missing, empty or not the kind a phase needs."""


def refuse_heldout(files: list[Path], key: str) -> None:
    """Raise TableError when any of ``files`` belongs to the held-out table (by its provenance,
    which travels with the file wherever it is copied): evaluation documents are never trained on."""
    for file in files:
        if (read_provenance(pq.read_schema(file)) or {}).get("table") == HELDOUT_TABLE:
            raise TableError(f"{key}: {file} belongs to the held-out table (shard.eval_fraction): its documents are "
                             f"kept for evaluation and no training phase may read them; set {key} to a training "
                             "table (by default the objective's: shard/, prefs/sft/ or prefs/)")


def load_table(path: Path, kind: str, key: str, cache: Path, log=None) -> CachedTable:
    """The columns a ``kind`` table must have, from the table cache
    (:func:`trainer.table_cache.open_cached`, converted into ``cache`` the first time), with
    errors naming ``key`` and the file.

    Raises:
        TableError: no Parquet files at ``path``, unreadable or missing columns, no rows,
            files of the held-out table (:func:`refuse_heldout`), or a table of a stage that
            did not finish.
    """
    _check_stage_finished(Path(path), key)
    files = table_files(path)
    if not files:
        hint = {"pairs": "sip shard", "sft": "sip prefs", "preferences": "sip prefs", "prefixes": "sip shard"}[kind]
        raise TableError(f"{key}: no {kind} table at {path} (no .parquet files); run `{hint}` first or set {key}")
    wanted = COLUMNS[kind]
    article = "an" if kind == "sft" else "a"  # the kinds: pairs, sft, preferences, prefixes
    for file in files:
        try:
            schema = pq.read_schema(file)
        # A damaged footer raises ArrowInvalid, OSError (thrift) or UnicodeDecodeError.
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise TableError(f"{key}: {file} could not be read as Parquet: {exc}") from None
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise TableError(f"{key}: {path} is not {article} {kind} table: {file.name} lacks column(s) {missing} "
                             f"(has {schema.names})")
        wrong = [f"{c} is {schema.field(c).type}" for c in wanted if not _expected_type(c, schema.field(c).type)]
        if wrong:
            raise TableError(f"{key}: {path} is not {article} {kind} table: in {file.name}, {'; '.join(wrong)} "
                             "(token id columns must be lists of integers, the others strings)")
    refuse_heldout(files, key)
    try:
        table = open_cached(files, kind, wanted, cache, unit_column=kind == "prefixes", log=log)
    # Unreadable, or files whose column types differ from one another.
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise TableError(f"{key}: {path} could not be read as one {kind} table: {exc}") from None
    if table.num_rows == 0:
        raise TableError(f"{key}: the {kind} table at {path} has no rows")
    return table


def _expected_type(column: str, type_: pa.DataType) -> bool:
    if column.endswith("_ids"):
        return (pa.types.is_list(type_) or pa.types.is_large_list(type_)) and pa.types.is_integer(type_.value_type)
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _check_stage_finished(path: Path, key: str) -> None:
    """Refuse a table inside a sip stage directory whose card is not written: a task is still
    running or failed, or the checks over all tasks' outputs refused them (a repeated document
    id, say). ``prefs/sft`` belongs to the ``prefs`` stage directory above it."""
    import json

    from pipeline.stage import SETTINGS_FILE

    for directory in (path, path.parent):
        settings = directory / SETTINGS_FILE
        if settings.is_file():
            if not (directory / "card.json").is_file():
                stage = json.loads(settings.read_text()).get("stage", "its")
                raise TableError(f"{key}: the {stage} stage at {directory} did not finish (no card.json: a task is "
                                 f"still running or failed, or its checks refused the outputs); run `sip {stage}` "
                                 "(or `sip run`) first")
            return


class SampleOrder:
    """Which table row each sample position reads: per epoch a permutation of ``rows`` drawn
    from ``(seed, epoch)`` (numpy's PCG64; one epoch's held at a time, 8 bytes a row)."""

    def __init__(self, rows: int, seed: int):
        self.rows, self.seed = rows, seed
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.rows)}
        return self._orders[epoch]

    def row_indices(self, start: int, count: int) -> list[int]:
        """Table rows of samples ``start .. start+count-1`` (epochs roll over seamlessly)."""
        return [int(self.order(k // self.rows)[k % self.rows]) for k in range(start, start + count)]


class TableSource(SampleOrder):
    """Batches of one (cached) table for one phase, by sample position."""

    def __init__(self, table: CachedTable, kind: str, seed: int, max_len: int):
        super().__init__(table.num_rows, seed)
        self.table, self.kind, self.max_len = table, kind, max_len

    def examples(self, rows: list[int]) -> list[dict]:
        """Rows as dicts of python lists, with ``prefix`` and ``target`` (or chosen/rejected) set."""
        out = []
        for row in self.table.take(rows):
            if self.kind == "pairs":
                window = row["prefix_ids"] + row["suffix_ids"]
                out.append({"prefix": [], "target": window[-self.max_len:]})
            elif self.kind == "prefixes":
                out.append(row)
            elif self.kind == "sft":
                out.append({"prefix": row["prefix_ids"], "target": row["target_ids"], "source": row["source"]})
            else:
                out.append({"prefix": row["prefix_ids"], "chosen": row["chosen_ids"], "rejected": row["rejected_ids"],
                            "chosen_source": row["chosen_source"], "rejected_source": row["rejected_source"]})
        return out

