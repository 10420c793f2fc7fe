"""Reference log-probs for DPO, stored in the preferences table (no reference model in memory).

The reference of a DPO phase is the policy at the start of that phase. Its sequence
log-probs of every chosen and rejected suffix are computed once (by ``sip ref-logps`` or at
the start of the phase) and written into the table's ``ref_chosen_logp`` /
``ref_rejected_logp`` columns, with ``ref_model_sha`` = the content hash of the reference
weights (:func:`trainer.model.state_sha`). Before training on them the phase checks that hash
against its own starting weights and refuses stored values that belong to another model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.io import table_files
from pipeline.schema import PROVENANCE_KEY, read_provenance
from trainer.steps import pair_logps


class ReferenceMismatch(ValueError):
    """Stored reference log-probs that belong to another model than the phase's reference."""


def stored_reference(table: pa.Table, path: Path) -> str | None:
    """The sha of the reference whose log-probs ``table`` holds; None when it holds none.

    Raises:
        ReferenceMismatch: the table mixes rows with and without log-probs, or several shas.
    """
    shas = set(table["ref_model_sha"].to_pylist())
    if shas == {None}:
        return None
    nulls = table["ref_chosen_logp"].null_count + table["ref_rejected_logp"].null_count
    if len(shas) != 1 or nulls:
        raise ReferenceMismatch(f"{path}: reference log-probs are incomplete or from several models "
                                f"({sorted(map(str, shas))}); run `sip ref-logps --clear` and train again")
    return shas.pop()


def check_reference(table: pa.Table, path: Path, expected_sha: str, phase: str) -> bool:
    """True when ``table`` holds log-probs of ``expected_sha``; False when it holds none.

    Raises:
        ReferenceMismatch: naming both hashes and how to recompute.
    """
    found = stored_reference(table, path)
    if found is None:
        return False
    if found != expected_sha:
        raise ReferenceMismatch(
            f"{path}: ref_model_sha is {found}, but phase '{phase}' starts from model {expected_sha}: the stored "
            "reference log-probs belong to another model. Recompute them with `sip ref-logps -m MANIFEST` "
            "(add --checkpoint DIR for the phase's starting checkpoint), or clear them with "
            "`sip ref-logps -m MANIFEST --clear` so the phase computes them when it starts"
        )
    return True


@torch.no_grad()
def compute_reference(fabric, model, source, batch_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence log-probs of every row's chosen and rejected suffix, in table order.

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


def write_reference(path: Path, chosen: np.ndarray | None, rejected: np.ndarray | None, sha: str | None) -> None:
    """Rewrite every file of the table with the log-probs set (cleared when ``sha`` is None).

    Each file is replaced atomically (temporary file, then rename); the provenance records
    which reference the values came from.
    """
    offset = 0
    for file in table_files(path):
        table = pq.read_table(file)
        n = table.num_rows
        if sha is None:
            columns = {"ref_chosen_logp": pa.nulls(n, pa.float64()), "ref_rejected_logp": pa.nulls(n, pa.float64()),
                       "ref_model_sha": pa.nulls(n, pa.string())}
        else:
            columns = {"ref_chosen_logp": pa.array(chosen[offset:offset + n], pa.float64()),
                       "ref_rejected_logp": pa.array(rejected[offset:offset + n], pa.float64()),
                       "ref_model_sha": pa.array([sha] * n, pa.string())}
        for name, column in columns.items():
            index = table.schema.get_field_index(name)
            table = table.set_column(index, table.schema.field(name), column)
        prov = read_provenance(table.schema) or {}
        prov["reference_logps"] = {"model_sha": sha} if sha else None
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               PROVENANCE_KEY: json.dumps(prov, sort_keys=True).encode()})
        tmp = file.parent / f".{file.name}.{os.getpid()}.tmp"
        try:
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
        offset += n


def run_ref_logps(manifest, *, phase: str | None = None, checkpoint: Path | None = None, clear: bool = False,
                  log=print) -> dict:
    """``sip ref-logps``: store (or clear) a DPO phase's reference log-probs in its preferences table.

    The reference is the policy at the start of the phase: the init model when the phase is the
    first one, else the checkpoint the earlier phases ended with (``checkpoint``, required then).
    """
    from pipeline.manifest import ManifestError
    from trainer.checkpoint import load_model_state
    from trainer.model import WEIGHTS_FILE, state_sha
    from trainer.plan import require_train, table_path
    from trainer.runtime import PAD_ID, full_model_state, make_fabric, setup_policy
    from trainer.source import TableSource, load_table

    require_train(manifest)
    phases = [(i, p) for i, p in enumerate(manifest.train.phases) if p.objective == "dpo"]
    chosen_phases = [(i, p) for i, p in phases if phase in (None, p.name)]
    if not chosen_phases:
        names = ", ".join(p.name for _, p in phases) or "none"
        raise ManifestError(f"--phase {phase!r}: no such DPO phase in train.phases (DPO phases: {names})")
    index, config = chosen_phases[0]
    path = table_path(manifest, config)
    if clear:
        write_reference(path, None, None, None)
        log(f"ref-logps: cleared the reference log-probs of {path}")
        return {"table": str(path), "ref_model_sha": None}
    if index > 0 and checkpoint is None:
        raise ManifestError(f"phase '{config.name}' is phase {index + 1}: its reference is the policy after the "
                            "earlier phases; pass --checkpoint DIR (a train checkpoint), or let the trainer compute "
                            "the log-probs when the phase starts")
    fabric = make_fabric(manifest)
    fabric.launch()
    policy = setup_policy(fabric, manifest, load_init=checkpoint is None)
    if checkpoint is not None:
        weights = torch.load(Path(checkpoint) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        load_model_state(fabric, policy.model, weights)
    sha = fabric.broadcast(state_sha(full_model_state(fabric, policy.model)) if fabric.global_rank == 0 else None)
    source = TableSource(load_table(path, "preferences", f"train.phases[{index}].table"), "preferences", 0,
                         manifest.train.max_seq_len)
    chosen, rejected = compute_reference(fabric, policy.model, source, config.batch_size, PAD_ID)
    if fabric.global_rank == 0:
        write_reference(path, chosen, rejected, sha)
        log(f"ref-logps: {source.rows} pairs of {path} scored by model {sha}")
    return {"table": str(path), "ref_model_sha": sha, "rows": source.rows}
