"""Preferences stage: judgments -> the preferences table (DPO) and its SFT view (RF-NLL).

Per pair: chosen = highest reward, rejected = lowest (METHOD.md "Training"). Pairs with fewer
than two judged candidates, or whose best and worst rewards tie (margin <= prefs.min_margin),
are skipped and counted. Token ids use the policy tokenizer; a suffix is at most N tokens.
A rollout's ids are the ones the policy sampled (from the rollouts table), never its text
re-encoded, so DPO trains on exactly what the policy produced and the judge saw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import polars as pl
from datatrove.pipeline.base import PipelineStep

from pipeline.cards import write_card
from pipeline.io import read_table, write_table_atomic
from pipeline.manifest import Manifest, fingerprint, fingerprinted_view
from pipeline.runner import StageJob, run_chain
from pipeline.schema import CANDIDATE_SOURCES, PREFERENCES, SFT, provenance, with_provenance
from pipeline.stage import StageDir
from pipeline.tokenizer import load_tokenizer
from stages.judge import plan_judge
from stages.shard import plan_shard

STAGE = "prefs"
_SOURCE_ORDER = {"original": 0, "rewrite": 1, "rollout": 2}  # tie-break among equal rewards: deterministic


def build_preferences(judgments: pl.DataFrame, pairs: pl.DataFrame, tokenizer, n: int, min_margin: float,
                      rollout_ids: dict[tuple[str, str], list[int]] | None = None):
    """Returns (preferences rows, sft rows, counts).

    ``rollout_ids``: (pair_id, text) -> the sampled ids of that rollout (see :func:`rollout_ids_of`).
    """
    valid = judgments.filter(pl.col("reward").is_not_null()).with_columns(
        pl.col("source").replace_strict(_SOURCE_ORDER, default=3).alias("_order"))
    ranked = valid.sort(["pair_id", "reward", "_order", "cand_id"], descending=[False, True, False, False])
    groups = ranked.group_by("pair_id", maintain_order=True).agg(pl.all())
    info = {r["pair_id"]: r for r in pairs.iter_rows(named=True)}

    def ids_of(source: str, text: str, pair: dict) -> list[int]:
        if source == "original":
            return list(pair["suffix_ids"])
        if source == "rollout":
            ids = (rollout_ids or {}).get((pair["pair_id"], text))
            if ids is None:
                raise ValueError(f"pair {pair['pair_id']}: a rollout candidate has no row in the rollouts table with "
                                 f"its text ({text[:60]!r}); the judgments and rollouts tables do not match")
            return list(ids)
        return tokenizer.encode(text, add_special_tokens=False).ids[:n]

    prefs, sft = [], []
    counts = {"pairs": pairs.height, "usable": 0, "skipped_single_candidate": 0, "skipped_tie": 0,
              "skipped_unjudged": pairs.height - groups.height}
    for g in groups.iter_rows(named=True):
        pair = info[g["pair_id"]]
        best = {k: g[k][0] for k in ("source", "text", "reward")}
        sft.append({"pair_id": g["pair_id"], "prefix_ids": pair["prefix_ids"],
                    "target_ids": ids_of(best["source"], best["text"], pair), "source": best["source"],
                    "reward": best["reward"], "prompt": pair["prefix"], "completion": best["text"]})
        if len(g["reward"]) < 2:
            counts["skipped_single_candidate"] += 1
            continue
        worst = {k: g[k][-1] for k in ("source", "text", "reward")}
        if best["reward"] - worst["reward"] <= min_margin:
            counts["skipped_tie"] += 1
            continue
        counts["usable"] += 1
        prefs.append({
            "pair_id": g["pair_id"], "prefix_ids": pair["prefix_ids"],
            "chosen_ids": ids_of(best["source"], best["text"], pair),
            "rejected_ids": ids_of(worst["source"], worst["text"], pair),
            "chosen_source": best["source"], "rejected_source": worst["source"],
            "chosen_reward": best["reward"], "rejected_reward": worst["reward"],
            "prompt": pair["prefix"], "chosen": best["text"], "rejected": worst["text"],
            "ref_chosen_logp": None, "ref_rejected_logp": None, "ref_model_sha": None,
        })
    return prefs, sft, counts


def rollout_ids_of(rollouts_dir: Path) -> dict[tuple[str, str], list[int]]:
    """(pair_id, text) -> token ids of the ok rollouts (the lowest sample when two share a text)."""
    table = pl.from_arrow(read_table(rollouts_dir, columns=["pair_id", "sample", "text", "token_ids", "status"]))
    out: dict[tuple[str, str], list[int]] = {}
    for pair_id, text, ids in (table.filter(pl.col("status") == "ok").sort("pair_id", "sample")
                               .select("pair_id", "text", "token_ids").iter_rows()):
        out.setdefault((pair_id, text), ids)
    return out


class PrefsStep(PipelineStep):
    name = "prefs"
    type = "🏁 - PREFERENCES"

    def __init__(self, plan: "PrefsPlan"):
        super().__init__()
        self.plan = plan

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        plan, m = self.plan, self.plan.manifest
        judgments = pl.from_arrow(read_table(plan.judgments_dir))
        pairs = pl.from_arrow(read_table(plan.pairs_dir, columns=["pair_id", "prefix", "prefix_ids", "suffix_ids"]))
        rollouts = rollout_ids_of(plan.rollouts_dir) if plan.rollouts_dir else None
        prefs, sft, counts = build_preferences(judgments, pairs, load_tokenizer(str(plan.tokenizer_dir)),
                                               m.shard.suffix_tokens, m.prefs.min_margin, rollouts)
        for key, value in counts.items():
            self.stat_update(key, value=value)
        prov = provenance(stage=STAGE, table="preferences", manifest_fingerprint=fingerprint(m),
                          stage_fingerprint=plan.stage.fingerprint, settings=m.prefs.model_dump())
        os.makedirs(plan.stage.path / "sft", exist_ok=True)
        write_table_atomic(str(plan.stage.path / "sft" / "00000.parquet"), sft, with_provenance(SFT, {**prov, "table": "sft"}))
        write_table_atomic(str(plan.stage.path / "00000.parquet"), prefs, with_provenance(PREFERENCES, prov))
        yield from ()


@dataclass
class PrefsPlan:
    manifest: Manifest
    stage: StageDir
    judgments_dir: Path
    pairs_dir: Path
    tokenizer_dir: Path
    rollouts_dir: Path | None = None


def plan_prefs(manifest: Manifest, upstream_pending: bool = False) -> PrefsPlan:
    judge, shard = plan_judge(manifest, upstream_pending=True), plan_shard(manifest)
    if not upstream_pending:
        judge.stage.check_upstream_of(STAGE)
    view = fingerprinted_view(manifest, ("prefs",))
    view["upstream.judge"] = judge.stage.fingerprint
    return PrefsPlan(manifest, StageDir(manifest, STAGE, "preferences", view, {"executor.tasks": 1}),
                     judge.stage.path, shard.stage.path, shard.tokenizer_dir, judge.rollouts_dir)


def prefs_summary(plan: PrefsPlan, elapsed_s: float | None) -> dict:
    stats = plan.stage.merged_stats()
    p = pl.from_arrow(read_table(plan.stage.path))
    # Every source that can be a candidate is listed, 0.0 included: the rollout chosen rate is
    # the curriculum's signal, and an absent key would read as "not measured".
    sources = [s for s in CANDIDATE_SOURCES if s != "rollout" or plan.manifest.rollouts.count]

    def rates(col: str) -> dict[str, float]:
        counts = dict(p[col].value_counts().iter_rows()) if p.height else {}
        return {s: round(counts.get(s, 0) / max(1, p.height), 3) for s in sources}

    summary = {
        **{k: int(stats.get(k, 0)) for k in ("pairs", "usable", "skipped_single_candidate", "skipped_tie", "skipped_unjudged")},
        "chosen_source_rate": rates("chosen_source"),
        "rejected_source_rate": rates("rejected_source"),
        "reward_margin_mean": round(float((p["chosen_reward"] - p["rejected_reward"]).mean()), 4) if p.height else None,
        "sft_rows": len(read_table(plan.stage.path / "sft", columns=["pair_id"])),
    }
    if elapsed_s:
        summary["elapsed_s"] = round(elapsed_s, 2)
    return summary


def finalize_prefs(manifest: Manifest, elapsed_s: float | None = None) -> dict:
    plan = plan_prefs(manifest)
    return write_card(plan.stage, prefs_summary(plan, elapsed_s),
                      "The SFT view (best candidate per pair, for RF-NLL) is in `sft/`.")


def prefs_job(manifest: Manifest, upstream_pending: bool = False) -> StageJob:
    plan = plan_prefs(manifest, upstream_pending)
    # One task: the whole table is small next to the judgments it summarises.
    return StageJob(plan.stage, [PrefsStep(plan)], partial(finalize_prefs, manifest))


def run_prefs(manifest: Manifest, *, force: bool = False, dry_run: bool = False, wait: bool = True,
              log: Callable[[str], None] = print) -> dict | None:
    return run_chain(manifest, [prefs_job(manifest)], force=force, dry_run=dry_run, wait=wait, log=log).get(STAGE)


def summary_line(card: dict) -> str:
    """The one line ``sip`` prints for a finished prefs stage (its card's summary)."""
    s = card["summary"]
    return (f"prefs: {s['usable']} preference pairs of {s['pairs']} (ties {s['skipped_tie']}, single "
            f"{s['skipped_single_candidate']}); chosen sources {s['chosen_source_rate']}; {s['sft_rows']} SFT rows")
