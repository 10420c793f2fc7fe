"""Preferences stage: judgments -> the preferences table (DPO) and its SFT view (RF-NLL).

Pair-keyed like the stages before it: a task is dealt units of the pairs table
(:class:`pipeline.io.Unit`), reads the judgments of each unit only, and writes
``<unit>.parquet`` and ``sft/<unit>.parquet`` (the preferences file last: it marks the unit
done, so a resumed task skips it). A task's memory is one unit's judgments.

Per pair, the scoring core's pick (``stages/scoring.py``): chosen = highest reward, rejected =
lowest (METHOD.md "Training"). Pairs with fewer than two judged candidates, or whose best and
worst rewards tie (margin <= prefs.min_margin), are skipped and counted. Token ids are the
ones the judge scored (the judgments table's ``token_ids``: a rollout's sampled ids, the
clipped rewrite's encoding), never text re-encoded here, so DPO trains on exactly what the
judge saw.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable

import polars as pl
import pyarrow.parquet as pq
from datatrove.pipeline.base import PipelineStep

from pipeline.cards import write_card
from pipeline.io import (UNIT_LAYOUT, UnitReader, WorkUnit, chunk_stats, read_unit, row_count, table_files, table_units,
                         write_table_atomic)
from pipeline.manifest import Manifest, fingerprint, fingerprinted_view
from pipeline.runner import StageJob
from pipeline.schema import CANDIDATE_SOURCES, PREFERENCES, SFT, provenance, with_provenance
from pipeline.stage import StageDir, StageFailed
from stages.judge import plan_judge
from stages.scoring import Ranked, pick
from stages.shard import plan_shard

STAGE = "prefs"
UPSTREAMS = ("shard", "judge")  # the stages whose tables this one reads (pipeline.app.registry)
JUDGMENT_COLUMNS = ["pair_id", "cand_id", "source", "text", "token_ids", "reward"]
PAIR_SCHEMA = {"pair_id": pl.String, "prefix": pl.String, "prefix_ids": pl.List(pl.Int32)}


def build_preferences(judgments: pl.DataFrame, pairs: pl.DataFrame, min_margin: float):
    """Returns (preferences rows, sft rows, counts), one pick per pair of ``pairs``.

    Args:
        judgments: judgments-table rows (:data:`JUDGMENT_COLUMNS`); ``token_ids`` are the ids
            the judge scored (a rollout's sampled ids, the clipped rewrite's encoding).
        pairs: pairs-table rows with ``pair_id``, ``prefix``, ``prefix_ids``.
        min_margin: ``prefs.min_margin`` (see :func:`stages.scoring.pick`).
    """
    by_pair: dict[str, list[Ranked]] = {}
    for row in judgments.iter_rows(named=True):
        by_pair.setdefault(row["pair_id"], []).append(Ranked(row["cand_id"], row["source"], row["reward"], row))
    prefs, sft = [], []
    counts = {"pairs": pairs.height, "usable": 0, "skipped_single_candidate": 0, "skipped_tie": 0,
              "skipped_unjudged": 0}
    for pair in pairs.sort("pair_id").iter_rows(named=True):
        chosen = pick(by_pair.get(pair["pair_id"], []), min_margin)
        if chosen.status == "unjudged":
            counts["skipped_unjudged"] += 1
            continue
        best = chosen.best
        sft.append({"pair_id": pair["pair_id"], "prefix_ids": pair["prefix_ids"], "target_ids": best["token_ids"],
                    "source": best["source"], "reward": best["reward"], "prompt": pair["prefix"],
                    "completion": best["text"]})
        if chosen.status != "usable":
            counts[f"skipped_{chosen.status}"] += 1
            continue
        counts["usable"] += 1
        rejected = chosen.rejected
        prefs.append({
            "pair_id": pair["pair_id"], "prefix_ids": pair["prefix_ids"],
            "chosen_ids": best["token_ids"], "rejected_ids": rejected["token_ids"],
            "chosen_source": best["source"], "rejected_source": rejected["source"],
            "chosen_reward": best["reward"], "rejected_reward": rejected["reward"],
            "prompt": pair["prefix"], "chosen": best["text"], "rejected": rejected["text"],
        })
    return prefs, sft, counts


def check_judgments(judgments_dir: Path) -> None:
    """Refuse a judgments table from before candidates carried their ids (re-judging is the
    only way to know which ids were scored)."""
    files = table_files(judgments_dir)
    if files and "token_ids" not in pq.read_schema(files[0]).names:
        raise StageFailed(f"prefs: the judgments table at {judgments_dir} has no token_ids column (made by an older "
                          "sip); re-run the judge stage with --force")


class PrefsStep(PipelineStep):
    """A task's units -> their preferences and SFT rows, one pair of files per unit; the
    counts (pairs, usable, skipped) are kept in each preferences file (``io.chunk_stats``)."""

    name = "prefs"
    type = "🏁 - PREFERENCES"

    def __init__(self, plan: "PrefsPlan"):
        super().__init__()
        self.plan = plan

    def run(self, data: Iterable[WorkUnit] | None = None, rank: int = 0, world_size: int = 1):
        plan, m = self.plan, self.plan.manifest
        check_judgments(plan.judgments_dir)
        prov = provenance(stage=STAGE, table="preferences", manifest_fingerprint=fingerprint(m),
                          stage_fingerprint=plan.stage.fingerprint, settings=m.prefs.model_dump())
        os.makedirs(plan.stage.path / "sft", exist_ok=True)
        for work in data or ():
            path = plan.stage.path / f"{work.key}.parquet"
            if path.exists():
                self.stat_update("units_resumed")
                continue
            judgments = pl.from_arrow(read_unit(plan.judgments_dir, work.key, columns=JUDGMENT_COLUMNS))
            prefs, sft, counts = build_preferences(judgments, pl.from_dicts(work.rows, schema=PAIR_SCHEMA),
                                                   m.prefs.min_margin)
            for key, value in counts.items():
                self.stat_update(key, value=value)
            write_table_atomic(str(plan.stage.path / "sft" / path.name), sft,
                               with_provenance(SFT, {**prov, "table": "sft"}))
            write_table_atomic(str(path), prefs, with_provenance(PREFERENCES, prov), counts)  # last: the unit is done
        yield from ()


@dataclass
class PrefsPlan:
    manifest: Manifest
    stage: StageDir
    judgments_dir: Path
    pairs_dir: Path


def plan_prefs(manifest: Manifest, upstream_pending: bool = False) -> PrefsPlan:
    judge, shard = plan_judge(manifest, upstream_pending=True), plan_shard(manifest)
    if not upstream_pending:
        judge.stage.check_upstream_of(STAGE)
    view = fingerprinted_view(manifest, ("prefs",))
    view["upstream.judge"] = judge.stage.fingerprint
    layout = {"executor.tasks": manifest.executor.for_stage(STAGE).tasks, **UNIT_LAYOUT}
    return PrefsPlan(manifest, StageDir(manifest, STAGE, "preferences", view, layout), judge.stage.path,
                     shard.stage.path)


def prefs_summary(plan: PrefsPlan, elapsed_s: float | None) -> dict:
    stats = chunk_stats(plan.stage.path)  # each unit's counts, kept in its file: right after any resume
    # A file (a unit) at a time, the columns summarized only: the card job holds one unit's rows.
    chosen, rejected, margin_sum, rows = Counter(), Counter(), 0.0, 0
    for file in table_files(plan.stage.path):
        p = pl.read_parquet(file, columns=["chosen_source", "rejected_source", "chosen_reward", "rejected_reward"])
        rows += p.height
        chosen.update(dict(p["chosen_source"].value_counts().iter_rows()))
        rejected.update(dict(p["rejected_source"].value_counts().iter_rows()))
        margin_sum += float((p["chosen_reward"] - p["rejected_reward"]).sum())
    # Every source that can be a candidate is listed, 0.0 included: the rollout chosen rate is
    # the curriculum's signal, and an absent key would read as "not measured".
    sources = [s for s in CANDIDATE_SOURCES if s != "rollout" or plan.manifest.rollouts.count]

    def rates(counts: Counter) -> dict[str, float]:
        return {s: round(counts.get(s, 0) / max(1, rows), 3) for s in sources}

    summary = {
        **{k: int(stats.get(k, 0)) for k in ("pairs", "usable", "skipped_single_candidate", "skipped_tie", "skipped_unjudged")},
        "chosen_source_rate": rates(chosen),
        "rejected_source_rate": rates(rejected),
        "reward_margin_mean": round(margin_sum / rows, 4) if rows else None,
        "sft_rows": row_count(plan.stage.path / "sft"),
    }
    if elapsed_s:
        summary["elapsed_s"] = round(elapsed_s, 2)
    return summary


def finalize_prefs(manifest: Manifest, elapsed_s: float | None = None) -> dict:
    plan = plan_prefs(manifest)
    units = {unit.key for unit in table_units(plan.pairs_dir)}
    written = {p.stem for p in table_files(plan.stage.path)}
    if units != written:
        raise StageFailed(f"prefs: {len(units - written)} units of the pairs table have no preferences file in "
                          f"{plan.stage.path} and {len(written - units)} files belong to no unit; re-run `sip prefs`")
    return write_card(plan.stage, prefs_summary(plan, elapsed_s),
                      "The SFT view (best candidate per pair, for RF-NLL) is in `sft/`.")


def prefs_job(manifest: Manifest, upstream_pending: bool = False) -> StageJob:
    plan = plan_prefs(manifest, upstream_pending)
    return StageJob(plan.stage, [UnitReader(str(plan.pairs_dir), columns=list(PAIR_SCHEMA)), PrefsStep(plan)],
                    partial(finalize_prefs, manifest))


def summary_line(card: dict) -> str:
    """The one line ``sip`` prints for a finished prefs stage (its card's summary)."""
    s = card["summary"]
    return (f"prefs: {s['usable']} preference pairs of {s['pairs']} (ties {s['skipped_tie']}, single "
            f"{s['skipped_single_candidate']}); chosen sources {s['chosen_source_rate']}; {s['sft_rows']} SFT rows")
