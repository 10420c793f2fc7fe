"""Judge stage: score every pair's candidates (METHOD.md "Judge") into the judgments table.

The stage is plumbing around the scoring core (``stages/scoring.py``): it reads each task's
pairs, looks up their ok rewrites and (when ``rollouts.count`` > 0) ok rollouts in the
upstream tables, and writes one judgments row per candidate, with the token ids it is trained
on, in chunk files that a crash never duplicates. What a candidate is, how it is scored and
what its reward is are the scoring core's, shared with the prefs stage and the online phase.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import polars as pl

from pipeline.cards import write_card
from pipeline.chunks import EngineStep
from pipeline.engines.counter import CallCounter
from pipeline.engines.factory import RUN_ONLY, make_engine, model_identity
from pipeline.io import UNIT_LAYOUT, UnitReader, chunk_stats, read_unit, table_files, table_units, unit_tables
from pipeline.models import resolve_model_dir
from pipeline.manifest import Manifest, ManifestError, fingerprint, fingerprinted_view
from pipeline.runner import StageJob
from pipeline.schema import JUDGMENTS, provenance, with_provenance
from pipeline.stage import StageDir, older_file_layout, require_unit_keys
from pipeline.tokenizer import load_tokenizer
from stages.criteria import PROMPTS, Judge, manifest_judge
from stages.rewrite import plan_rewrite
from stages.rollout import plan_rollout
from stages.schemes import SCHEMES, scheme_calls
from stages.scoring import CRITERIA, CandidateSet, Judged, assemble_candidates, score_pairs
from stages.shard import plan_shard
from stages.fit import fit_lines

STAGE = "judge"
# The stages whose tables this one reads (pipeline.app.registry); rollout only when
# rollouts.count > 0 (the registry skips an inactive stage).
UPSTREAMS = ("shard", "rewrite", "rollout")
PAIR_COLUMNS = ["pair_id", "prefix", "suffix", "suffix_ids"]  # what a pair's candidates need


class UpstreamCandidates:
    """A task's view of the rewrites and rollouts tables: pair -> its :class:`CandidateSet`.

    Both tables are pair-keyed (:class:`pipeline.io.Unit`): a pair's rows are in the files of
    its unit, so only the units asked for are read, and only the last few are kept. A task's
    memory is a few units' candidates whatever the corpus size.
    """

    kept_units = 4  # the online phase's micro-batches draw from any unit; a stage task reads one at a time

    def __init__(self, rewrites_dir: str | None, tokenizer_dir: str, suffix_tokens: int,
                 rollouts_dir: str | None = None):
        self.rewrites_dir = rewrites_dir  # None: no rewrite candidates (no rewriter)
        self.tokenizer_dir = tokenizer_dir
        self.suffix_tokens = suffix_tokens
        self.rollouts_dir = rollouts_dir  # None: no rollout candidates (rollouts.count is 0)
        self._units: dict[str, tuple[dict[str, str], dict[str, list[tuple[str, list[int]]]]]] = {}

    def _read(self, unit: str) -> tuple[dict[str, str], dict[str, list[tuple[str, list[int]]]]]:
        if unit in self._units:
            self._units[unit] = self._units.pop(unit)  # most recently used last
            return self._units[unit]
        rewrites: dict[str, str] = {}
        if self.rewrites_dir is not None:
            table = read_unit(self.rewrites_dir, unit, columns=["pair_id", "rewrite", "status"])
            rewrites = {p: r for p, r, s in zip(*(table.column(c).to_pylist() for c in ("pair_id", "rewrite", "status")))
                        if s == "ok" and r}
        rollouts: dict[str, list[tuple[str, list[int]]]] = {}
        if self.rollouts_dir is not None:
            table = pl.from_arrow(read_unit(self.rollouts_dir, unit,
                                            columns=["pair_id", "sample", "text", "token_ids", "status"]))
            for pair_id, texts, ids in (table.filter(pl.col("status") == "ok").sort("pair_id", "sample")
                                        .group_by("pair_id", maintain_order=True).agg("text", "token_ids").iter_rows()):
                rollouts[pair_id] = list(zip(texts, ids))
        while len(self._units) >= self.kept_units:
            self._units.pop(next(iter(self._units)))
        self._units[unit] = (rewrites, rollouts)
        return rewrites, rollouts

    def rewrite(self, pair_id: str, unit: str) -> str | None:
        """The ok rewrite (unclipped) of ``pair_id`` of unit ``unit``; None without one."""
        return self._read(unit)[0].get(pair_id)

    def for_pair(self, pair: dict, unit: str) -> CandidateSet:
        """``pair``: a pairs-table row with ``pair_id``, ``prefix``, ``suffix``, ``suffix_ids``;
        ``unit``: the key of its row group (:class:`pipeline.io.Unit`)."""
        rewrites, rollouts = self._read(unit)
        return assemble_candidates(pair, rewrites.get(pair["pair_id"]), rollouts.get(pair["pair_id"], []),
                                   load_tokenizer(self.tokenizer_dir), self.suffix_tokens)


def judgment_rows(judged: list[Judged], samples: int) -> list[dict]:
    """Judgments-table rows of one pair's scored candidates."""
    return [{
        "pair_id": j.candidate.pair_id, "cand_id": j.candidate.cand_id, "source": j.candidate.source,
        "text": j.candidate.text, "token_ids": list(j.candidate.token_ids), **j.scores, "reward": j.reward,
        "judge_raw": json.dumps(j.raw, default=str), "parse_status": "ok" if j.parsed else "unparsable",
        "shown_order": json.dumps(j.shown_order) if j.shown_order else None, "judge_samples": samples,
        "prefix_tokens": j.prefix_tokens,
    } for j in judged]


class JudgeStep(EngineStep):
    """Plumbing around the scoring core: a chunk of pairs -> their judgments rows, with the
    chunk's judge costs kept in its file (see ``ChunkedStep.count``)."""

    name = "judge"
    type = "⚖️ - JUDGE"

    def __init__(self, manifest: Manifest, output_dir: str, schema, upstream: UpstreamCandidates):
        super().__init__(output_dir, schema, manifest.judging.chunk_size)
        self.manifest = manifest
        self.upstream = upstream
        self.judge: Judge | None = None  # built around the engine on the first chunk that needs it

    def start_engine(self):
        return make_engine(self.manifest, self.manifest.judge, "judge")

    def process(self, rows: list[dict]) -> list[dict]:
        if self.judge is None:
            self.judge = manifest_judge(self.manifest, self.engine)
        counters = self.judge.counters
        before = counters.snapshot()
        started, cache_before = time.perf_counter(), self._prefix_cache()
        sets = [self.upstream.for_pair(pair, self.unit) for pair in rows]
        judged = score_pairs(self.judge, sets)
        self.count("engine_ms", int((time.perf_counter() - started) * 1000))
        if cache_before is not None and (cache_after := self._prefix_cache()) is not None:
            for key in ("queried_tokens", "hit_tokens"):
                self.count(f"prefix_cache_{key}", cache_after[key] - cache_before[key])
        out = []
        for candidate_set, pair_judged in zip(sets, judged):
            for name, value in (("duplicate", candidate_set.duplicates), ("empty", candidate_set.empty),
                                ("fused", candidate_set.fused)):
                if value:
                    self.count(f"candidates_dropped_{name}", value)
            for j in pair_judged:
                self.count(f"candidates_{j.candidate.source}")
                self.count("judged" if j.parsed else "unparsable")
            out += judgment_rows(pair_judged, self.manifest.judging.samples)
        for key, value in counters.since(before).items():
            if value:
                self.count(key, value)
        return out

    def _prefix_cache(self) -> dict[str, int] | None:
        return self.engine.prefix_cache_stats()

    def finish(self) -> None:
        super().finish()
        self.judge = None


@dataclass
class JudgePlan:
    manifest: Manifest
    stage: StageDir
    pairs_dir: Path
    rewrites_dir: Path
    tokenizer_dir: Path
    model: dict
    rollouts_dir: Path | None = None

    def upstream(self) -> UpstreamCandidates:
        return UpstreamCandidates(str(self.rewrites_dir), str(self.tokenizer_dir), self.manifest.shard.suffix_tokens,
                                  str(self.rollouts_dir) if self.rollouts_dir else None)

    def pipeline(self) -> list:
        templates = {c: (PROMPTS / f"judge_{c}.txt").read_text() for c in CRITERIA}
        prov = provenance(
            stage=STAGE, table="judgments", manifest_fingerprint=fingerprint(self.manifest),
            stage_fingerprint=self.stage.fingerprint, models={"judge": self.model}, prompts=templates,
            settings=self.manifest.judging.model_dump(),
        )
        return [
            UnitReader(str(self.pairs_dir), columns=PAIR_COLUMNS),
            JudgeStep(self.manifest, str(self.stage.path), with_provenance(JUDGMENTS, prov), self.upstream()),
        ]


def judging_view(manifest: Manifest) -> dict:
    """The manifest settings that decide a judgment (engine layout and chunking aside): the
    judge stage's fingerprint and the online phase's record are keyed by them."""
    return {k: v for k, v in fingerprinted_view(manifest, ("judge", "judging", "run.seed", "shard.suffix_tokens")).items()
            if k.removeprefix("judge.") not in RUN_ONLY and k not in ("judging.chunk_size", "judging.self_check")}


def check_judge_settings(manifest: Manifest, who: str = "judge") -> None:
    """Refuse a judge the manifest cannot run, before any work (the stage and online phases).

    Raises:
        ManifestError: no ``judge`` section, or a scoring mode the judge cannot serve.
    """
    if manifest.judge is None:
        raise ManifestError(f"{who}: the manifest has no 'judge' section (model: embedded, a path or an endpoint)")
    cfg = manifest.judging
    if manifest.judge.kind == "endpoint":
        soft = [c for c in CRITERIA if getattr(cfg, c) and getattr(cfg, c).mode in ("choice_prob", "likelihood")]
        if soft:
            raise ManifestError(f"judging.{soft[0]}.mode: an endpoint judge supports 'verdict' (and 'classifier' "
                                "for safety); choice_prob and likelihood need the model's log-probs: use a local judge")
        if not manifest.judge.prefill:
            # The verdict step continues the judge's own answer after the verdict's lead-in.
            raise ManifestError("judge.prefill: verdict mode continues the judge's reasoning with the verdict's "
                                "lead-in (vLLM's continue_final_message) and restricts the next words to the "
                                "verdicts (vLLM's structured outputs); serve the judge with vLLM and set "
                                "judge.prefill: true, or use a local judge")


def plan_judge(manifest: Manifest, upstream_pending: bool = False) -> JudgePlan:
    check_judge_settings(manifest)
    cfg = manifest.judging
    shard, rewrite = plan_shard(manifest), plan_rewrite(manifest, upstream_pending=True)
    # Rollouts are an upstream only when there are any: count 0 leaves the judge as it was.
    rollout = plan_rollout(manifest, upstream_pending=True) if manifest.rollouts.count else None
    if not upstream_pending:
        rewrite.stage.check_upstream_of(STAGE)
        if rollout is not None:
            rollout.stage.check_upstream_of(STAGE)
    model = model_identity(manifest, manifest.judge, "judge")
    view = judging_view(manifest)
    view.update({"upstream.rewrite": rewrite.stage.fingerprint,
                 "judge.identity": model.get("weights_sha") or model.get("url"),
                 "judging.prompts": fingerprint_prompts()})
    if rollout is not None:
        view["upstream.rollout"] = rollout.stage.fingerprint
    tasks = manifest.executor.for_stage(STAGE).tasks
    layout = {"executor.tasks": tasks, "judging.chunk_size": cfg.chunk_size, **UNIT_LAYOUT}
    return JudgePlan(manifest, StageDir(manifest, STAGE, "judgments", view, layout), shard.stage.path,
                     rewrite.stage.path, shard.tokenizer_dir, model, rollout.stage.path if rollout else None)


def fingerprint_prompts() -> str:
    import hashlib

    return hashlib.sha256("".join((PROMPTS / f"judge_{c}.txt").read_text() for c in CRITERIA).encode()).hexdigest()[:16]


def count_judge_calls(plan: JudgePlan) -> dict | str:
    """Calls and tokens the judge stage of ``plan`` will make (``sip judge --dry-run``), or why
    they cannot be counted yet (an upstream table is not complete).

    The stage's own candidates and scoring core run over every pair, chunk by chunk as a task
    would, with a :class:`~pipeline.engines.counter.CallCounter` in place of the judge model.
    """
    # Complete upstream stages only (a stage writes its card last): a partial table would undercount.
    upstream = [("shard", plan.pairs_dir), ("rewrite", plan.rewrites_dir)]
    if plan.rollouts_dir is not None:
        upstream.append(("rollout", plan.rollouts_dir))
    missing = [name for name, path in upstream if not (Path(path) / "card.json").is_file() or not table_files(path)]
    if missing:
        return f"calls and tokens are counted once {' and '.join(missing)} have run"
    stale = [name for name, path in upstream[1:] if older_file_layout(Path(path))]
    if stale:
        return (f"calls and tokens cannot be counted: {' and '.join(stale)} were written with an older file layout; "
                "the stage will refuse them (re-run them with --force)")
    manifest, ref = plan.manifest, plan.manifest.judge
    local = ref.kind != "endpoint"
    model_dir = resolve_model_dir(manifest, ref.model, "judge.model") if local else None
    counter = CallCounter(model_dir, plan.model.get("name", ref.model), ref.max_model_len)
    judge, upstream_candidates = manifest_judge(manifest, counter), plan.upstream()
    sizes, chunk = [], manifest.judging.chunk_size
    for unit in table_units(plan.pairs_dir):
        pairs = unit.read(PAIR_COLUMNS).to_pylist()
        for start in range(0, len(pairs), chunk):
            judged = score_pairs(judge, [upstream_candidates.for_pair(p, unit.key) for p in pairs[start : start + chunk]])
            sizes += [len(j) for j in judged]
    candidates = sum(sizes)
    quality, both = manifest.judging.quality, manifest.judging.order == "both"
    by_scheme = ({s: sum(scheme_calls(s, n, both, quality.degree) for n in sizes) for s in SCHEMES}
                 if quality is not None and quality.mode != "likelihood" else None)
    return {
        "engine_calls": counter.calls,
        "pairs": len(sizes),
        "candidates": candidates,
        "judge_calls": judge.counters.calls,
        "prompt_tokens": judge.counters.prompt_tokens if local else None,
        "max_completion_tokens": counter.max_completion_tokens,
        "quality_calls_by_scheme": by_scheme,  # what judging.quality.scheme would cost instead
    }


def describe_judge_cost(plan: JudgePlan) -> str:
    counted = count_judge_calls(plan)
    if isinstance(counted, str):
        return f"judge: {counted}"
    tokens = f"{counted['prompt_tokens']:,} prompt tokens" if counted["prompt_tokens"] is not None else \
        "prompt tokens unknown (an endpoint judge's tokenizer is not local)"
    line = (f"judge: {counted['judge_calls']:,} judge calls for {counted['candidates']:,} candidates of "
            f"{counted['pairs']:,} pairs; {tokens}; at most {counted['max_completion_tokens']:,} completion tokens")
    if counted["quality_calls_by_scheme"]:
        chosen = plan.manifest.judging.quality.scheme
        line += "\njudge: quality calls by judging.quality.scheme: " + ", ".join(
            f"{name} {calls:,}" + (" (this manifest)" if name == chosen else "")
            for name, calls in counted["quality_calls_by_scheme"].items())
    return line


def judge_summary(plan: JudgePlan, elapsed_s: float | None) -> dict:
    # Costs come from the chunk files (complete after any resume); only the engine start-up,
    # a per-task cost, comes from the tasks' stats.
    stats = chunk_stats(plan.stage.path)
    # A unit at a time, the columns summarized only: the card job holds one unit's rows.
    scored = (*CRITERIA, "reward")
    sums: dict[str, Counter] = {}
    candidates = pairs = unparsable = 0
    prefix_max = None
    for unit_pairs, rows in unit_tables(plan.pairs_dir, plan.stage.path,
                                        ["source", *scored, "parse_status", "prefix_tokens"]):
        j = pl.from_arrow(rows)
        pairs, candidates = pairs + unit_pairs.num_rows, candidates + j.height
        unparsable += int((j["parse_status"] == "unparsable").sum())
        if j["prefix_tokens"].null_count() < j.height:
            prefix_max = max(prefix_max or 0, int(j["prefix_tokens"].max()))
        part = j.group_by("source").agg(pl.len().alias("candidates"),
                                        *(pl.col(c).sum().alias(f"{c}_sum") for c in scored),
                                        *(pl.col(c).count().alias(f"{c}_n") for c in scored))
        for row in part.iter_rows(named=True):
            sums.setdefault(row.pop("source"), Counter()).update({k: v or 0 for k, v in row.items()})
    # Each criterion's mean over the candidates it scored (nulls left out), by source.
    by_source = {source: {"candidates": int(t["candidates"]),
                          **{c: round(t[f"{c}_sum"] / t[f"{c}_n"], 3) if t[f"{c}_n"] else None for c in scored}}
                 for source, t in sorted(sums.items())}
    compared = int(stats.get("order_compared", 0))
    summary = {
        "candidates": candidates,
        "pairs": pairs,
        "by_source": by_source,
        "unparsable_candidates": unparsable,
        # Offered texts that are not candidates: repeats, blanks, rewrites fused with the prefix.
        "candidates_dropped": {k.removeprefix("candidates_dropped_"): int(v) for k, v in sorted(stats.items())
                               if k.startswith("candidates_dropped_")},
        "unparsable_by_criterion": {k.removeprefix("unparsable_"): int(v) for k, v in stats.items()
                                    if k.startswith("unparsable_")},
        "order_agreement": round(stats.get("order_agreed", 0) / compared, 3) if compared else None,
        "prefix_cache_hit_rate": (round(stats["prefix_cache_hit_tokens"] / stats["prefix_cache_queried_tokens"], 3)
                                  if stats.get("prefix_cache_queried_tokens") else None),
        "judge_calls": int(stats.get("judge_calls", 0)),
        "judge_calls_per_pair": round(stats.get("judge_calls", 0) / max(pairs, 1), 2),
        "quality_scheme": plan.manifest.judging.quality.scheme if plan.manifest.judging.quality else None,
        "prompt_tokens": int(stats.get("prompt_tokens", 0)),
        "completion_tokens": int(stats.get("completion_tokens", 0)),
        "engine_s": round(stats.get("engine_ms", 0) / 1000, 2),
        "engine_start_s": round(plan.stage.merged_stats().get("engine_start_ms", 0) / 1000, 2),
        "modes": {c: getattr(plan.manifest.judging, c).mode for c in CRITERIA if getattr(plan.manifest.judging, c)},
        # The most prefix tokens the judge saw (judging.prefix_tokens bounds it).
        "prefix_tokens_shown_max": prefix_max,
    }
    if elapsed_s:
        summary["elapsed_s"] = round(elapsed_s, 2)
    return summary


def finalize_judge(manifest: Manifest, elapsed_s: float | None = None) -> dict:
    plan = plan_judge(manifest)
    require_unit_keys(plan.stage.path, plan.pairs_dir, ["pair_id"], lambda pairs: {(p,) for p in pairs},
                      "the judgments of every pair", once=False)
    summary, notes = judge_summary(plan, elapsed_s), ""
    return write_card(plan.stage, summary, notes)


def judge_job(manifest: Manifest, upstream_pending: bool = False) -> StageJob:
    plan = plan_judge(manifest, upstream_pending)
    return StageJob(plan.stage, plan.pipeline(), partial(finalize_judge, manifest),
                    estimate=partial(describe_judge_cost, plan), fit=partial(fit_lines, manifest, ("judge",)))


def summary_line(card: dict) -> str:
    """The one line ``sip`` prints for a finished judge stage (its card's summary)."""
    s = card["summary"]
    agree = f", order agreement {s['order_agreement']}" if s.get("order_agreement") is not None else ""
    return (f"judge: {s['candidates']} candidates of {s['pairs']} pairs ({s['modes']}); "
            f"{s['unparsable_candidates']} unparsable{agree}; {s['judge_calls']} judge calls")
