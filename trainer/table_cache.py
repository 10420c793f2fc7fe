"""Training tables as cached Arrow files: random rows without the table in memory.

A phase reads its rows in a seeded random order (trainer/source.py), so a row may come from
anywhere in the table at any step. Parquet cannot serve that cheaply (a row costs its whole
compressed row group), and reading the table into memory costs its size: a 100M-row
preferences table is hundreds of GB. So a table is converted once, streamed row group by row
group, into an uncompressed Arrow IPC file of small record batches (:data:`BATCH_ROWS` rows
each, the last one excepted), and a row is read by reading its batch (``pread``): the
process holds a micro-batch's batches while it reads them, nothing more.

The file is read, not memory-mapped (as Hugging Face ``datasets`` maps its cache files): the
pages of a mapped file that a random order touches stay in the process's resident set (as
page cache), so its RSS grows towards the file's size, and schedulers that enforce memory by
RSS (Slurm's accounting can) would kill a rank that holds little of its own. Measured on
this machine, random rows of a 1M-row preferences file (Python dicts out): mapped, 56 us a
row and RSS +520 MB after 3,200 rows; read with 256-row batches, 143 us a row and RSS flat.

Whatever needs the whole table is computed during the conversion, in one pass, and kept in a
JSON file beside the Arrow file (:class:`TableStats`): the row count, the largest token id,
the token totals, the pairs' 64-bit hashes (a ``.npy`` file, 8 bytes a row: what keys the
reference log-probs and checks that no pair repeats) and the content digest of a
preferences table. Nothing afterwards scans the table.

Cache layout (``<run.output_dir>/_cache/tables/``, :func:`cache_dir`; shared by every arm
and phase of the run)::

    <source>-<identity>.arrow       the rows (record batches of BATCH_ROWS rows, the last one excepted)
    <source>-<identity>.pairs.npy   xxh3-64 of each row's pair_id (tables with pair ids)
    <source>-<identity>.json        TableStats; written last: an entry without it is incomplete

``source`` hashes the table's directory and kind, ``identity`` its files' names, sizes,
modification and change times and inodes, and :data:`FORMAT`: a table rewritten in place (``sip prefs --force``) is
another identity, converted again, and the entry it replaces is removed. Disk cost: about 4
bytes per token id plus the text columns (the ``prefixes`` kind keeps the prefix and suffix
texts).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from pipeline.atomic import OutputNotWritable, atomic_path, refused_write

FORMAT = 4  # bump when the cached files change meaning
BATCH_ROWS = 256  # rows per record batch: what one row read reads
CACHE_DIR = Path("_cache") / "tables"

# Which id columns one epoch's token total counts, per kind (the prefix twice for a
# preference row: it is read once with each side).
TOKEN_COLUMNS = {"pairs": ["prefix_ids", "suffix_ids"], "sft": ["prefix_ids", "target_ids"],
                 "prefixes": ["prefix_ids", "suffix_ids"],
                 "preferences": ["prefix_ids", "prefix_ids", "chosen_ids", "rejected_ids"]}
CONTENT_COLUMNS = ("prefix_ids", "chosen_ids", "rejected_ids")  # the preferences content digest's
# What is trained on (or continued, for an online phase's prefixes), per kind: never empty. The
# stages never write an empty one (the shard's suffix is N tokens; an empty candidate is left out).
TARGET_COLUMNS = {"pairs": ["suffix_ids"], "prefixes": ["suffix_ids"], "sft": ["target_ids"],
                  "preferences": ["chosen_ids", "rejected_ids"]}


def cache_dir(manifest) -> Path:
    """``<run.output_dir>/_cache/tables``: where a run's training tables are converted."""
    return manifest.output_root / CACHE_DIR


@dataclass
class TableStats:
    """What is known of a whole table, computed while converting it.

    ``rows``; ``max_token_id`` and ``min_token_id`` over every ``*_ids`` column (-1 and 0
    when all are empty), and where each first occurs (``max_token_at``, ``min_token_at``:
    ``"<file>: row group <g>"``; empty when none);
    ``tokens``: one epoch's token total (:data:`TOKEN_COLUMNS`); ``content_digest``: for a
    preferences table, :func:`content_term` summed over its rows modulo 2**128 (32 hex; the
    same for any row or file order); ``source_files``: the Parquet files converted.
    """

    rows: int
    max_token_id: int
    min_token_id: int
    tokens: int
    content_digest: str | None = None
    max_token_at: str = ""
    min_token_at: str = ""
    source_files: list[str] = field(default_factory=list)


def pair_hash(pair_id: str) -> int:
    """xxh3-64 of a pair id (UTF-8): how the cache keys rows by pair."""
    return xxhash.xxh3_64_intdigest(pair_id.encode("utf-8"))


def content_term(pair_id: str, id_lists: list[np.ndarray]) -> int:
    """One preference row's term of the content digest: xxh3-128 of its pair id and token ids
    (each list as little-endian int64 after its length), as an integer."""
    h = xxhash.xxh3_128()
    h.update(pair_id.encode("utf-8"))
    for ids in id_lists:
        h.update(b"\x1f" + len(ids).to_bytes(8, "little"))
        h.update(ids.astype("<i8", copy=False).tobytes())
    return h.intdigest()


class CachedTable:
    """A training table converted by :func:`open_cached`, read a record batch at a time.

    ``num_rows``, ``column_names``, ``stats`` (:class:`TableStats`), ``pair_hashes``: (rows,)
    uint64 (memory-mapped: read whole once, when a phase starts), or None for a table
    without ``pair_id``.

    Raises (at construction):
        OSError, pyarrow.ArrowInvalid: the Arrow file is missing or not whole.
    """

    def __init__(self, arrow_file: Path, stats: TableStats):
        self.path, self.stats = Path(arrow_file), stats
        self._reader = pa.ipc.open_file(pa.OSFile(str(self.path)))
        self.schema = self._reader.schema
        self.column_names = self.schema.names
        self.num_rows = stats.rows
        if self._reader.num_record_batches != -(-stats.rows // BATCH_ROWS):
            raise ValueError(f"{self.path} holds {self._reader.num_record_batches} record batches; "
                             f"{stats.rows} rows make {-(-stats.rows // BATCH_ROWS)}")
        hashes = self.path.with_suffix(".pairs.npy")
        self.pair_hashes = np.load(hashes, mmap_mode="r") if hashes.is_file() else None

    def batches(self, columns: list[str] | None = None):
        """The record batches in table order (each read when reached)."""
        for i in range(self._reader.num_record_batches):
            batch = self._reader.get_batch(i)
            yield batch.select(columns) if columns else batch

    def take(self, rows: list[int] | np.ndarray, columns: list[str] | None = None) -> list[dict]:
        """Rows ``rows`` (in that order, repeats allowed) as dicts of Python values.

        Only the record batches holding them are read, one ``take`` each: a take over the
        whole (many-chunked) table would first concatenate every chunk into memory.

        Raises:
            IndexError: a row outside ``0 .. num_rows - 1``.
        """
        idx = np.asarray(rows, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"{self.path}: rows {idx.min()}..{idx.max()} outside 0..{self.num_rows - 1}")
        out: list[dict | None] = [None] * len(idx)
        which = idx // BATCH_ROWS
        for b in np.unique(which):
            at = np.flatnonzero(which == b)
            batch = self._reader.get_batch(int(b))
            if columns:
                batch = batch.select(columns)
            for i, row in zip(at, batch.take(pa.array(idx[at] - b * BATCH_ROWS)).to_pylist()):
                out[i] = row
        return out  # type: ignore[return-value]

    def column(self, name: str) -> pa.ChunkedArray:
        """One column, whole, in memory (for the rare joins that need it)."""
        return pa.chunked_array([b.column(name) for b in self.batches([name])], self.schema.field(name).type)


def _entry_names(files: list[Path], kind: str, columns: list[str]) -> tuple[str, str]:
    source = hashlib.sha256(f"{Path(files[0]).resolve().parent}\x1f{kind}".encode()).hexdigest()[:12]
    identity = hashlib.sha256()
    identity.update(f"{FORMAT}\x1f{kind}\x1f{','.join(columns)}".encode())
    for f in files:
        st = os.stat(f)
        # ctime and inode too: a file replaced by a copy that keeps its size and mtime (`cp -p`,
        # rsync -t) is another file, and nobody can set those back.
        identity.update(f"\x1f{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}".encode())
    return source, identity.hexdigest()[:16]


def open_cached(files: list[Path], kind: str, columns: list[str], cache: Path, *, unit_column: bool = False,
                log=None) -> CachedTable:
    """The table of ``files`` (their ``columns``, in order) as a :class:`CachedTable` under
    ``cache``, converted first when no complete entry of these files exists.

    ``unit_column``: add ``unit``, each row's :class:`pipeline.io.Unit` key (its file stem and
    row group: where the rewrite of its pair is found). ``log``: called with a line when a
    conversion starts and ends.

    An entry found damaged (a file of it removed or cut short) is converted again.

    Raises:
        OutputNotWritable: the cache directory cannot be made or written (full disk,
            read-only, a file in its place).
        pyarrow.ArrowInvalid: a file that is not Parquet.
    """
    source, identity = _entry_names(files, kind, columns)
    cache = Path(cache)
    base = cache / f"{source}-{identity}"
    stats_file = base.with_suffix(".json")
    if stats_file.is_file():
        _remove_stale_temporaries(cache, source, base.name)
        try:
            return _open_entry(base, "pair_id" in columns)
        # A file of the entry removed, cut short or rewritten (np.load raises EOFError on an
        # empty file; a JSON of another shape gives TypeError or KeyError).
        except (OSError, EOFError, ValueError, TypeError, KeyError, pa.ArrowException) as exc:
            if log:
                log(f"train: the cached copy {base}.* is damaged ({type(exc).__name__}: {exc}); converting again")
            _remove_entry(cache, base.name)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (refused_write(exc, cache) or OutputNotWritable(
            f"cannot create the table cache {cache}: {exc.strerror or exc} (something that is not a writable "
            "directory is in the way); remove it, or set run.output_dir elsewhere")) from exc
    if log:
        log(f"train: converting the {kind} table ({len(files)} file(s), {files[0].parent}) into {base}.arrow "
            "(once; read from there from then on)")
    stats = _convert(files, kind, columns, base, unit_column)
    with atomic_path(stats_file) as tmp:
        tmp.write_text(json.dumps(asdict(stats), indent=1) + "\n")
    # The entries of this table's earlier contents, and what killed conversions left.
    for old in cache.glob(f"{source}-*"):
        if not old.name.startswith(base.name):
            old.unlink(missing_ok=True)
    _remove_stale_temporaries(cache, source, base.name)
    if log:
        log(f"train: converted {stats.rows} rows ({stats.tokens} tokens)")
    return _open_entry(base, "pair_id" in columns)


# A live conversion keeps writing its temporary: one untouched this long (seconds) belongs to a
# killed process, sooner when its process is gone from this host.
STALE_TEMPORARY_S, DEAD_WRITER_S = 600, 60


def _remove_stale_temporaries(cache: Path, source: str, entry: str) -> None:
    """Remove what killed conversions of this table left: temporaries of its other entries, and
    those of ``entry`` that nobody writes any more (a conversion on another node sharing the
    directory keeps its own fresh)."""
    now = time.time()
    for tmp in cache.glob(f".{source}-*.tmp"):
        try:
            idle = now - tmp.stat().st_mtime
            stale = idle > STALE_TEMPORARY_S or (idle > DEAD_WRITER_S and not _alive(tmp.name.rsplit(".", 2)[-2]))
            if not tmp.name.startswith(f".{entry}.") or stale:
                tmp.unlink(missing_ok=True)
        except FileNotFoundError:  # removed by another rank meanwhile
            pass


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a temporary's writer, :func:`pipeline.atomic.temporary_path`) runs here."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_entry(cache: Path, name: str) -> None:
    for path in cache.glob(f"{name}.*"):
        path.unlink(missing_ok=True)


def _open_entry(base: Path, keyed_by_pair: bool) -> CachedTable:
    """The entry at ``base``, checked whole: its Arrow file, and its pair hashes when the table
    has pair ids, agree with its stats.

    Raises:
        OSError, ValueError, pyarrow.ArrowException: a file missing or damaged.
    """
    stats = TableStats(**json.loads(base.with_suffix(".json").read_text()))
    table = CachedTable(base.with_suffix(".arrow"), stats)
    if table.num_rows != stats.rows:
        raise ValueError(f"{table.path} holds {table.num_rows} rows, its stats say {stats.rows}")
    if keyed_by_pair and (table.pair_hashes is None or table.pair_hashes.shape != (stats.rows,)):
        raise ValueError(f"{base}.pairs.npy is missing or does not hold one hash per row")
    return table


def _convert(files: list[Path], kind: str, columns: list[str], base: Path, unit_column: bool) -> TableStats:
    """Stream ``files`` into ``base``.arrow (and .pairs.npy), computing the stats on the way."""
    schema = pq.read_schema(files[0]).remove_metadata()
    fields = [schema.field(c) for c in columns] + ([pa.field("unit", pa.string())] if unit_column else [])
    out_schema = pa.schema(fields)
    id_columns = [c for c in columns if c.endswith("_ids")]
    rows, top, low, tokens, digest = 0, -1, 0, 0, 0
    top_at = low_at = ""
    hashes: list[np.ndarray] = []
    with atomic_path(base.with_suffix(".arrow")) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
            pa.ipc.new_file(sink, out_schema) as writer:

        def write(batch: pa.RecordBatch) -> None:
            nonlocal rows, tokens, digest
            writer.write_batch(batch)
            rows += batch.num_rows
            tokens += sum(int(pc.sum(pc.list_value_length(batch.column(c))).as_py() or 0) for c in TOKEN_COLUMNS[kind])
            if "pair_id" in columns:
                ids = batch.column("pair_id").to_pylist()
                hashes.append(np.fromiter((pair_hash(p) for p in ids), np.uint64, len(ids)))
                if kind == "preferences":
                    digest = (digest + _content_sum(ids, batch)) % (1 << 128)

        # Row groups are cut and joined into batches of exactly BATCH_ROWS rows, so row r is in
        # batch r // BATCH_ROWS and reading needs no index.
        pending: list[pa.Table] = []
        for f in files:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.metadata.num_row_groups):
                try:
                    table = parquet.read_row_group(group, columns=columns)
                except (OSError, pa.ArrowException) as exc:  # damaged pages behind a readable footer
                    raise pa.ArrowInvalid(f"{f}: row group {group}: {exc}") from exc
                _check_id_lists(table, id_columns, TARGET_COLUMNS[kind], f"{f}: row group {group}")
                for c in id_columns:
                    if len(values := pc.list_flatten(table.column(c))):
                        if (high := int(pc.max(values).as_py())) > top:
                            top, top_at = high, f"{f}: row group {group}"
                        if (least := int(pc.min(values).as_py())) < low:
                            low, low_at = least, f"{f}: row group {group}"
                if unit_column:
                    table = table.append_column("unit", pa.array([f"{Path(f).stem}_{group:05d}"] * table.num_rows,
                                                                 pa.string()))
                pending.append(pa.Table.from_arrays([table.column(c) for c in out_schema.names], schema=out_schema))
                held = pa.concat_tables(pending)
                whole = held.num_rows // BATCH_ROWS * BATCH_ROWS
                for start in range(0, whole, BATCH_ROWS):
                    write(held.slice(start, BATCH_ROWS).combine_chunks().to_batches()[0])
                pending = [held.slice(whole)] if whole < held.num_rows else []
        if pending and (last := pa.concat_tables(pending)).num_rows:
            write(last.combine_chunks().to_batches()[0])
    if hashes:
        with atomic_path(base.with_suffix(".pairs.npy")) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.concatenate(hashes))
    return TableStats(rows=rows, max_token_id=top, min_token_id=low, tokens=tokens,
                      content_digest=f"{digest:032x}" if kind == "preferences" else None,
                      max_token_at=top_at, min_token_at=low_at,
                      source_files=[str(f) for f in files])


def _check_id_lists(table: pa.Table, id_columns: list[str], targets: list[str], where: str) -> None:
    """Every token id list of ``table`` (one row group, at ``where``) present and free of null
    ids, and every ``targets`` list non-empty: what training would otherwise fail on mid-phase.

    Raises:
        pyarrow.ArrowInvalid: naming ``where``, the column, how many rows and the first of them.
    """
    def refuse(column: str, mask: pa.Array, what: str) -> None:
        if count := pc.sum(mask).as_py():
            first = pc.index(mask, True).as_py()
            raise pa.ArrowInvalid(f"{where}: {count} row(s) with {what} {column} (first: row {first} of the group); "
                                  "every token id list must be present, hold integers only, and a target must not "
                                  "be empty")

    for column in id_columns:
        lists = table.column(column).combine_chunks()
        refuse(column, pc.is_null(lists), "a null")
        if (flat := pc.list_flatten(lists)).null_count:  # a null inside a list: find the rows that hold one
            rows = pc.list_parent_indices(lists).filter(pc.is_null(flat))
            refuse(column, pc.is_in(pa.array(range(len(lists))), value_set=rows), "a null token id in")
        if column in targets:
            refuse(column, pc.equal(pc.list_value_length(lists), 0).fill_null(False), "an empty")


def _content_sum(pair_ids: list[str], batch: pa.RecordBatch) -> int:
    """Sum of :func:`content_term` over a batch's rows."""
    lists = []
    for c in CONTENT_COLUMNS:
        col = batch.column(c)
        offsets = col.offsets.to_numpy()
        lists.append((offsets, col.values.to_numpy(zero_copy_only=False)))
    total = 0
    for i, pair_id in enumerate(pair_ids):
        total += content_term(pair_id, [values[offsets[i]:offsets[i + 1]] for offsets, values in lists])
    return total
