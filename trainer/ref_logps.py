"""Reference log-probs for DPO: a table of their own beside the preferences, keyed by pair_id.

The reference of a DPO phase is the policy at the start of that phase. Its sequence log-probs
of every chosen and rejected suffix are computed once (by ``sip ref-logps``, or when the phase
starts), so no reference model sits in memory while training. They are stored as a table of
their own (``pipeline.schema.REF_LOGPS``: ``pair_id``, ``ref_chosen_logp``,
``ref_rejected_logp``) and joined to the preference rows by ``pair_id``, never by row order.
The preferences table is never written: a stage's table is written by its stage alone.

Layout, under the train output (``<run.output_dir>/train/``)::

    ref_logps/<fingerprint>/00000.parquet    one set per reference fingerprint

They live with the train output, not beside the prefs stage's table, because the trainer makes
and owns them: a phase's table may belong to another run (``train.phases[].table``), which this
run must not write into, and the prefs stage's directory keeps holding only what that stage
wrote. ``sip train --force`` keeps ``ref_logps/`` (a set can never be stale, see below);
``sip ref-logps --clear`` removes a phase's sets.

The fingerprint is a hash of everything that changes the values (:func:`reference_keys`):

- ``reference.model_sha``: content hash of the reference weights (:func:`trainer.model.state_sha`);
- ``reference.model_config``: hash of the ``litgpt.Config`` the weights run in (heads, rope,
  norm, ...), ``block_size`` left out (it only sizes caches; truncation is the next key);
- ``train.max_seq_len``: where a prefix loses its left tokens;
- ``train.truncation``: how a pair's prefix is trimmed (``trainer.data.TRUNCATION``: once per pair,
  both sides on the same prefix tokens, :func:`trainer.steps.pair_prefix`);
- ``train.precision``: the Fabric precision the forward passes run in;
- ``logp``: what one value is (:data:`LOGP`);
- ``preferences.stage_fingerprint``: the prefs stage fingerprint, from the table's provenance;
- ``preferences.content``: a digest of the rows covered (``pair_id``, ``prefix_ids``,
  ``chosen_ids``, ``rejected_ids``; the same in any row order, :func:`trainer.table_cache.content_term`):
  a table rebuilt under the same settings with other picks (a judge on a GPU is not bitwise
  deterministic) is another table.

Left out, because they move a value by float rounding at most: batch size, devices, strategy,
the padding id (padding sits after every real token).

A set made under other settings is never used: another fingerprint is another directory, so
the phase computes its own and logs which keys differ from the sets it found. A phase resumed
mid-way cannot recompute (its starting weights are gone): when its set is missing, or the keys
it started with no longer hold, it refuses, naming the keys.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.io import part_file, part_name, read_table, table_files, table_provenance
from pipeline.manifest import diff_views, hash_view
from pipeline.schema import REF_LOGPS, provenance, with_provenance
from pipeline.errors import SipError
from trainer.data import TRUNCATION
from trainer.table_cache import CachedTable, pair_hash
from trainer.steps import pair_logps

REF_DIR = "ref_logps"
LOGP = "sum of the target tokens' log-probs given the prefix (nats)"


class ReferenceMismatch(SipError, ValueError):
    """Stored reference log-probs that cannot serve a phase: incomplete, or made under other settings."""


def reference_root(train_dir: Path) -> Path:
    """Where the sets live: ``<train output>/ref_logps``."""
    return Path(train_dir) / REF_DIR


def check_unique_pairs(table: CachedTable, path: Path) -> None:
    """Reference log-probs are keyed by ``pair_id``: a table that repeats one cannot be keyed.

    Checked on the cached 64-bit pair hashes (8 bytes a row); rows whose hashes repeat are
    then compared by their ids, so a hash collision is not taken for a repeat.

    Raises:
        ReferenceMismatch: naming the table and a repeated id.
    """
    repeated = _repeated_ids(table)
    if repeated:
        raise ReferenceMismatch(f"{path}: {len(repeated)} pair_id(s) occur more than once (e.g. {repeated[0]}), so "
                                "reference log-probs cannot be keyed by pair_id; the corpus holds a document id "
                                "twice: make the ids unique and rebuild from `sip shard --force` (which names them)")


def _repeated_hashes(hashes: np.ndarray) -> np.ndarray:
    ordered = np.sort(hashes)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def _repeated_ids(table: CachedTable) -> list[str]:
    """The pair ids that occur more than once (sorted)."""
    suspects = _repeated_hashes(table.pair_hashes)
    if not suspects.size:
        return []
    rows = np.flatnonzero(np.isin(table.pair_hashes, suspects))
    ids = [r["pair_id"] for r in table.take(rows, ["pair_id"])]
    return sorted({i for i in ids if ids.count(i) > 1})


def config_hash(model_config) -> str:
    """Hash of a ``litgpt.Config`` without ``block_size`` (which only sizes the rope and mask caches)."""
    fields = {k: v for k, v in dataclasses.asdict(model_config).items() if k != "block_size"}
    return hash_view(fields)


def reference_keys(model_sha: str, model_config, max_seq_len: int, precision: str, table: CachedTable,
                   table_path: Path) -> dict:
    """Everything that changes a set's values (the module docstring says why each is there).

    Args:
        model_sha: :func:`trainer.model.state_sha` of the reference weights.
        model_config: the ``litgpt.Config`` they run in.
        max_seq_len: ``train.max_seq_len`` (tokens).
        precision: ``train.precision``.
        table: the preferences rows (its content digest, :class:`trainer.table_cache.TableStats`).
        table_path: where the table was read (its provenance gives the stage fingerprint).
    """
    prov = table_provenance(table_path) or {}
    return {
        "reference.model_sha": model_sha,
        "reference.model_config": config_hash(model_config),
        "train.max_seq_len": max_seq_len,
        "train.truncation": TRUNCATION,
        "train.precision": precision,
        "logp": LOGP,
        "preferences.stage_fingerprint": prov.get("stage_fingerprint"),
        "preferences.content": table.stats.content_digest,
    }


def fingerprint_of(keys: dict) -> str:
    return hash_view(keys)


@dataclass
class StoredSet:
    path: Path  # the set's directory, named by its fingerprint
    keys: dict
    phase: str | None  # the phase it was made for (what ``--clear`` goes by)


def stored_sets(root: Path) -> list[StoredSet]:
    """The complete sets under ``root`` (a directory without a renamed file holds none)."""
    found = []
    for directory in sorted(p for p in Path(root).glob("*") if p.is_dir() and not p.name.startswith(".")):
        if table_files(directory):
            prov = table_provenance(directory) or {}
            found.append(StoredSet(directory, prov.get("settings", {}), prov.get("phase")))
    return found


def differences(keys: dict, sets: list[StoredSet], limit: int = 3) -> str:
    """How ``keys`` differ from each stored set, fewest differences first (for the log)."""
    diffs = sorted(((len(d), s.path.name, d) for s in sets if (d := diff_views(s.keys, keys))), key=lambda x: x[:2])
    if not diffs:
        return "no stored set found"
    lines = [f"{name} differs in {'; '.join(d)}" for _n, name, d in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f"and {len(diffs) - limit} more set(s)")
    return "stored set(s): " + " | ".join(lines)


@torch.no_grad()
def compute_reference(fabric, model, source, batch_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence log-probs (nats) of every row's chosen and rejected suffix, in table order: two (rows,) arrays.

    Rows are dealt out to ranks (rank r takes rows r, r+W, ...) and gathered back.
    """
    was_training = model.training
    model.eval()
    rows = source.rows
    per_rank = -(-rows // fabric.world_size)
    mine = [i for i in range(fabric.global_rank, per_rank * fabric.world_size, fabric.world_size)]
    chosen = torch.zeros(per_rank, dtype=torch.float64, device=fabric.device)
    rejected = torch.zeros_like(chosen)
    for start in range(0, per_rank, batch_size):
        idx = mine[start:start + batch_size]
        real = [i % rows for i in idx]  # the padding slots of the last rank recompute row 0..: dropped below
        c, r = pair_logps(model, source.examples(real), pad_id, source.max_len, fabric.device)
        chosen[start:start + len(idx)], rejected[start:start + len(idx)] = c.double(), r.double()
    if fabric.world_size > 1:
        chosen, rejected = fabric.all_gather(chosen), fabric.all_gather(rejected)  # (W, per_rank)
        chosen, rejected = chosen.T.reshape(-1), rejected.T.reshape(-1)  # back to row order
    model.train(was_training)
    return chosen[:rows].cpu().numpy(), rejected[:rows].cpu().numpy()


def write_set(root: Path, keys: dict, table: CachedTable, chosen: np.ndarray, rejected: np.ndarray, *,
              checkpoint: str, phase: str, table_path: Path, manifest_fingerprint: str) -> Path:
    """Store one set under ``root/<fingerprint>/`` (temporary file, then rename); returns its directory.

    ``chosen``, ``rejected``: (rows,) log-probs in ``table``'s row order. Provenance:
    ``models.reference`` = checkpoint and model_sha, ``settings`` = ``keys``, the phase and the
    preferences table it covers.
    """
    fingerprint = fingerprint_of(keys)
    directory = Path(root) / fingerprint
    directory.mkdir(parents=True, exist_ok=True)
    prov = provenance(stage="train", table="ref_logps", manifest_fingerprint=manifest_fingerprint,
                      stage_fingerprint=fingerprint,
                      models={"reference": {"checkpoint": checkpoint, "model_sha": keys["reference.model_sha"]}},
                      settings=keys)
    prov.update(phase=phase, preferences=str(table_path))
    with part_file(directory / part_name(0), with_provenance(REF_LOGPS, prov)) as add:
        row = 0
        for batch in table.batches(["pair_id"]):
            for pair_id in batch.column(0).to_pylist():
                add({"pair_id": pair_id, "ref_chosen_logp": float(chosen[row]),
                     "ref_rejected_logp": float(rejected[row])})
                row += 1
    return directory


def join_reference(table: CachedTable, table_path: Path, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """The stored set at ``directory`` as two (rows,) float64 arrays aligned to ``table``'s rows, by ``pair_id``.

    Joined on 64-bit pair hashes (the set read a row group at a time: 24 bytes a pair held);
    when hashes repeat on either side (a repeated id, or a collision) it is joined on the ids
    themselves, which holds them all in memory.

    Raises:
        ReferenceMismatch: the set repeats a pair_id, or lacks (or holds null for) pairs of
            the table; the message names both tables, the count and an example.
    """
    fix = (f"remove the set with `sip ref-logps -m MANIFEST --clear` (or delete {directory}); the phase then "
           "computes the log-probs when it starts")
    hashes, chosen, rejected = [], [], []
    for file in table_files(directory):
        parquet = pq.ParquetFile(file)
        for group in range(parquet.metadata.num_row_groups):
            part = parquet.read_row_group(group, columns=["pair_id", "ref_chosen_logp", "ref_rejected_logp"])
            part = part.filter(pc.and_(pc.is_valid(part["ref_chosen_logp"]), pc.is_valid(part["ref_rejected_logp"])))
            hashes.append(np.fromiter((pair_hash(p) for p in part["pair_id"].to_pylist()), np.uint64, part.num_rows))
            chosen.append(part["ref_chosen_logp"].to_numpy().astype(np.float64))
            rejected.append(part["ref_rejected_logp"].to_numpy().astype(np.float64))
    ref_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    if _repeated_hashes(ref_hashes).size or _repeated_hashes(table.pair_hashes).size:
        return _join_by_ids(table, table_path, directory, fix)
    order = np.argsort(ref_hashes)
    ordered = ref_hashes[order]
    pos = np.minimum(np.searchsorted(ordered, table.pair_hashes), max(len(ordered) - 1, 0))
    found = ordered[pos] == table.pair_hashes if len(ordered) else np.zeros(table.num_rows, bool)
    if not found.all():
        lacking = int((~found).sum())
        example = table.take([int(np.flatnonzero(~found)[0])], ["pair_id"])[0]["pair_id"]
        raise ReferenceMismatch(
            f"the reference log-probs at {directory} lack {lacking} of the {table.num_rows} pairs of the "
            f"preferences table {table_path} (e.g. pair_id {example}); {fix}")
    rows = order[pos]
    return np.concatenate(chosen)[rows], np.concatenate(rejected)[rows]


def _join_by_ids(table: CachedTable, table_path: Path, directory: Path, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`join_reference` on the ids themselves (when 64-bit hashes repeat)."""
    ref = read_table(directory)
    if pc.count_distinct(ref["pair_id"]).as_py() != ref.num_rows:
        raise ReferenceMismatch(f"{directory}: the reference log-probs repeat a pair_id; {fix}")
    ref = ref.filter(pc.and_(pc.is_valid(ref["ref_chosen_logp"]), pc.is_valid(ref["ref_rejected_logp"])))
    pair_ids = table.column("pair_id")
    index = pc.index_in(pair_ids, value_set=ref["pair_id"].combine_chunks())
    if index.null_count:
        lacking = pair_ids.filter(pc.is_null(index))
        raise ReferenceMismatch(
            f"the reference log-probs at {directory} lack {index.null_count} of the {table.num_rows} pairs of the "
            f"preferences table {table_path} (e.g. pair_id {lacking[0].as_py()}); {fix}")
    rows = index.to_numpy(zero_copy_only=False)
    return (ref["ref_chosen_logp"].to_numpy()[rows].astype(np.float64),
            ref["ref_rejected_logp"].to_numpy()[rows].astype(np.float64))


def clear_sets(root: Path, phase: str) -> list[Path]:
    """Remove the sets made for ``phase`` (their provenance says which); returns their directories."""
    removed = [s.path for s in stored_sets(root) if s.phase == phase]
    for directory in removed:
        shutil.rmtree(directory)
    return removed


def run_ref_logps(manifest, *, phase: str | None = None, checkpoint: Path | None = None, clear: bool = False,
                  log=print) -> dict:
    """``sip ref-logps``: store (or clear) a DPO phase's reference log-probs under ``<train>/ref_logps/``.

    Arguments:
        manifest: the run; its first DPO phase unless ``phase`` names another.
        phase: a DPO phase name.
        checkpoint: a train checkpoint directory to score with. The reference is the policy at
            the start of the phase: the init model when the phase is the first one, else the
            checkpoint the earlier phases ended with (required then).
        clear: remove the phase's stored sets instead.
        log: where progress lines go.

    Returns:
        ``table`` (the preferences table), ``ref_model_sha``, and ``ref_logps`` (the set's
        directory), ``fingerprint``, ``rows``; with ``clear``, ``removed`` (directories).

    Raises:
        ManifestError: no such DPO phase, or a later phase without ``checkpoint``.
        ReferenceMismatch: the table repeats a pair_id.
    """
    from pipeline.manifest import ManifestError, fingerprint
    from trainer.checkpoint import load_model_state
    from trainer.model import WEIGHTS_FILE, state_sha
    from trainer.plan import require_train, table_path
    from trainer.runtime import PAD_ID, full_model_state, make_fabric, setup_policy
    from trainer.table_cache import cache_dir
    from trainer.source import TableSource, load_table

    require_train(manifest)
    phases = [(i, p) for i, p in enumerate(manifest.train.phases) if p.objective == "dpo"]
    chosen_phases = [(i, p) for i, p in phases if phase in (None, p.name)]
    if not chosen_phases:
        names = ", ".join(p.name for _, p in phases) or "none"
        raise ManifestError(f"--phase {phase!r}: no such DPO phase in train.phases (DPO phases: {names})")
    index, config = chosen_phases[0]
    path = table_path(manifest, config)
    root = reference_root(manifest.stage_dir("train"))
    if clear:
        removed = clear_sets(root, config.name)
        log(f"ref-logps: removed {len(removed)} stored set(s) of phase '{config.name}' from {root}")
        return {"table": str(path), "ref_model_sha": None, "removed": [str(p) for p in removed]}
    if index > 0 and checkpoint is None:
        raise ManifestError(f"phase '{config.name}' is phase {index + 1}: its reference is the policy after the "
                            "earlier phases; pass --checkpoint DIR (a train checkpoint), or let the trainer compute "
                            "the log-probs when the phase starts")
    table = load_table(path, "preferences", f"train.phases[{index}].table", cache_dir(manifest), log)
    check_unique_pairs(table, path)
    fabric = make_fabric(manifest)
    fabric.launch()
    policy = setup_policy(fabric, manifest, load_init=checkpoint is None)
    if checkpoint is not None:
        weights = torch.load(Path(checkpoint) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        load_model_state(fabric, policy.model, weights)
    sha = fabric.broadcast(state_sha(full_model_state(fabric, policy.model)) if fabric.global_rank == 0 else None)
    t = manifest.train
    keys = reference_keys(sha, policy.config, t.max_seq_len, t.precision, table, path)
    source = TableSource(table, "preferences", 0, t.max_seq_len)
    chosen, rejected = compute_reference(fabric, policy.model, source, config.batch_size, PAD_ID)
    directory = root / fingerprint_of(keys)
    if fabric.global_rank == 0:
        write_set(root, keys, table, chosen, rejected,
                  checkpoint=str(checkpoint) if checkpoint else f"train.model.init: {t.model.init}",
                  phase=config.name, table_path=path, manifest_fingerprint=fingerprint(manifest))
        log(f"ref-logps: {source.rows} pairs of {path} scored by model {sha}; stored in {directory}")
    return {"table": str(path), "ref_model_sha": sha, "ref_logps": str(directory), "fingerprint": directory.name,
            "rows": source.rows}

