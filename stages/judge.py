"""Judge stage: score every pair's candidates (METHOD.md "Judge") into the judgments table.

Candidates per pair: the original suffix, the rewrite (when its status is ok), clipped to N
policy tokens (what the policy would be trained on), and, when ``rollouts.count`` > 0, the
policy's ok rollouts (already at most N tokens; their text is their ids decoded, never
re-tokenized). Identical texts are judged once, under the first source that gave them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import polars as pl

from pipeline.cards import write_card
from pipeline.chunks import ChunkedStep
from pipeline.engines.factory import RUN_ONLY, make_engine, model_identity
from pipeline.io import TableReader, chunk_stats, read_table
from pipeline.manifest import Manifest, ManifestError, fingerprint, fingerprinted_view
from pipeline.runner import StageJob, run_chain
from pipeline.schema import JUDGMENTS, cand_id, provenance, with_provenance
from pipeline.stage import StageDir, StageFailed
from pipeline.tokenizer import clip_to_tokens, load_tokenizer
from stages.judge_cost import describe_judge_cost
from stages.criteria import PROMPTS, Judge, Scored
from stages.rewrite import plan_rewrite
from stages.rollout import plan_rollout
from stages.shard import plan_shard

STAGE = "judge"
CRITERIA = ("safety", "quality", "factuality")


class JudgeStep(ChunkedStep):
    name = "judge"
    type = "⚖️ - JUDGE"

    def __init__(self, manifest: Manifest, output_dir: str, schema, rewrites_dir: str, tokenizer_dir: str,
                 rollouts_dir: str | None = None):
        super().__init__(output_dir, schema, manifest.judging.chunk_size)
        self.manifest = manifest
        self.rewrites_dir = rewrites_dir
        self.tokenizer_dir = tokenizer_dir
        self.rollouts_dir = rollouts_dir  # None: no rollout candidates (rollouts.count is 0)
        self._judge: Judge | None = None
        self._rewrites: dict[str, str] | None = None
        self._rollouts: dict[str, list[str]] | None = None

    def rewrites(self) -> dict[str, str]:
        if self._rewrites is None:
            table = read_table(self.rewrites_dir, columns=["pair_id", "rewrite", "status"])
            self._rewrites = {p: r for p, r, s in zip(*(table.column(c).to_pylist() for c in ("pair_id", "rewrite", "status")))
                              if s == "ok" and r}
        return self._rewrites

    def rollouts(self) -> dict[str, list[str]]:
        """pair_id -> its ok rollout texts, by sample index."""
        if self._rollouts is None:
            self._rollouts = {}
            if self.rollouts_dir is not None:
                table = pl.from_arrow(read_table(self.rollouts_dir, columns=["pair_id", "sample", "text", "status"]))
                for pair_id, texts in (table.filter(pl.col("status") == "ok").sort("pair_id", "sample")
                                       .group_by("pair_id", maintain_order=True).agg("text").iter_rows()):
                    self._rollouts[pair_id] = texts
        return self._rollouts

    def candidates(self, pair: dict) -> list[tuple[str, str]]:
        tok, n = load_tokenizer(self.tokenizer_dir), self.manifest.shard.suffix_tokens
        others = []
        if (rewrite := self.rewrites().get(pair["pair_id"])) is not None:
            others.append(("rewrite", clip_to_tokens(rewrite, tok, n)))
        # Rollouts are not clipped: their ids are at most N, and re-encoding their text could
        # tokenize differently and cut what the policy actually sampled.
        others += [("rollout", text) for text in self.rollouts().get(pair["pair_id"], [])]
        out, seen = [("original", pair["suffix"])], {pair["suffix"]}
        for source, text in others:  # each distinct text once, under the first source that gave it
            if text.strip() and text not in seen:
                seen.add(text)
                out.append((source, text))
        return out

    def process(self, rows: list[dict]) -> list[dict]:
        cfg = self.manifest.judging
        if self._judge is None:
            engine = make_engine(self.manifest, self.manifest.judge, "judge")
            self.stat_update("engine_start_ms", value=int(getattr(engine, "start_s", 0) * 1000))
            self._judge = Judge(engine, cfg, self.manifest.run.seed)
        judge = self._judge
        before = (judge.counters.calls, judge.counters.prompt_tokens, judge.counters.completion_tokens,
                  judge.counters.order_compared, judge.counters.order_agreed, dict(judge.counters.unparsable))
        started, cache_before = time.perf_counter(), self._prefix_cache()
        cands = [self.candidates(pair) for pair in rows]
        flat = [(i, source, text) for i, cs in enumerate(cands) for source, text in cs]
        scores: dict[str, list[Scored | None]] = {c: [None] * len(flat) for c in CRITERIA}
        if cfg.safety:
            scores["safety"] = judge.safety([t for _, _, t in flat])
        if cfg.factuality:
            todo = [k for k, (_, source, _) in enumerate(flat) if source != "original"]
            judged = judge.factuality([(rows[flat[k][0]]["prefix"], rows[flat[k][0]]["suffix"], flat[k][2]) for k in todo])
            scores["factuality"] = [Scored(1.0, {"note": "the reference itself"})] * len(flat)
            for k, s in zip(todo, judged):
                scores["factuality"][k] = s
        orders: dict[int, list] = {}
        if cfg.quality:
            k = 0
            judged_pairs = judge.quality_batch([(rows[i]["prefix"], [t for _, t in cs], rows[i]["pair_id"])
                                                for i, cs in enumerate(cands)])
            for i, (result, shown) in enumerate(judged_pairs):
                for s in result:
                    scores["quality"][k] = s
                    k += 1
                orders[i] = shown
        self.count("engine_ms", int((time.perf_counter() - started) * 1000))
        if cache_before is not None and (cache_after := self._prefix_cache()) is not None:
            for key in ("queried_tokens", "hit_tokens"):
                self.count(f"prefix_cache_{key}", cache_after[key] - cache_before[key])
        out = []
        for k, (i, source, text) in enumerate(flat):
            row_scores = {c: (scores[c][k].score if scores[c][k] is not None else None) for c in CRITERIA}
            applicable = [c for c in CRITERIA if getattr(cfg, c) and not (c == "quality" and len(cands[i]) < 2)]
            parsed = all(row_scores[c] is not None for c in applicable)
            reward = sum(getattr(cfg, c).weight * row_scores[c] for c in applicable) if parsed else None
            raw = {c: scores[c][k].raw for c in CRITERIA if scores[c][k] is not None}
            out.append({
                "pair_id": rows[i]["pair_id"], "cand_id": cand_id(rows[i]["pair_id"], text), "source": source,
                "text": text, **row_scores, "reward": reward, "judge_raw": json.dumps(raw, default=str),
                "parse_status": "ok" if parsed else "unparsable",
                "shown_order": json.dumps(orders.get(i)) if orders.get(i) else None,
                "judge_samples": cfg.samples,
            })
            self.stat_update(f"candidates_{source}")
            self.stat_update("unparsable" if not parsed else "judged")
        c = judge.counters
        self.count("judge_calls", c.calls - before[0])
        self.count("prompt_tokens", c.prompt_tokens - before[1])
        self.count("completion_tokens", c.completion_tokens - before[2])
        self.count("order_compared", c.order_compared - before[3])
        self.count("order_agreed", c.order_agreed - before[4])
        for crit, count in c.unparsable.items():
            if count - before[5].get(crit, 0):
                self.count(f"unparsable_{crit}", count - before[5].get(crit, 0))
        return out

    def _prefix_cache(self) -> dict[str, int] | None:
        stats = getattr(self._judge.engine, "prefix_cache_stats", None)
        return stats() if stats else None

    def finish(self) -> None:
        if self._judge is not None:
            self._judge.engine.close()
            self._judge = None


@dataclass
class JudgePlan:
    manifest: Manifest
    stage: StageDir
    pairs_dir: Path
    rewrites_dir: Path
    tokenizer_dir: Path
    model: dict
    rollouts_dir: Path | None = None

    def pipeline(self) -> list:
        templates = {c: (PROMPTS / f"judge_{c}.txt").read_text() for c in CRITERIA}
        prov = provenance(
            stage=STAGE, table="judgments", manifest_fingerprint=fingerprint(self.manifest),
            stage_fingerprint=self.stage.fingerprint, models={"judge": self.model}, prompts=templates,
            settings=self.manifest.judging.model_dump(),
        )
        return [
            TableReader(str(self.pairs_dir), columns=["pair_id", "prefix", "suffix"]),
            JudgeStep(self.manifest, str(self.stage.path), with_provenance(JUDGMENTS, prov), str(self.rewrites_dir),
                      str(self.tokenizer_dir), str(self.rollouts_dir) if self.rollouts_dir else None),
        ]


def plan_judge(manifest: Manifest, upstream_pending: bool = False) -> JudgePlan:
    if manifest.judge is None:
        raise StageFailed("judge: the manifest has no 'judge' section (model: embedded, a path or an endpoint)")
    cfg = manifest.judging
    if manifest.judge.kind == "endpoint":
        soft = [c for c in CRITERIA if getattr(cfg, c) and getattr(cfg, c).mode != "verdict"]
        if soft:
            raise ManifestError(f"judging.{soft[0]}.mode: an endpoint judge supports only 'verdict' "
                                "(choice_prob and likelihood need the model's log-probs: use a local judge)")
    shard, rewrite = plan_shard(manifest), plan_rewrite(manifest, upstream_pending=True)
    # Rollouts are an upstream only when there are any: count 0 leaves the judge as it was.
    rollout = plan_rollout(manifest, upstream_pending=True) if manifest.rollouts.count else None
    if not upstream_pending:
        rewrite.stage.check_upstream_of(STAGE)
        if rollout is not None:
            rollout.stage.check_upstream_of(STAGE)
    model = model_identity(manifest, manifest.judge, "judge")
    view = {k: v for k, v in fingerprinted_view(manifest, ("judge", "judging", "run.seed", "shard.suffix_tokens")).items()
            if k.removeprefix("judge.") not in RUN_ONLY and k not in ("judging.chunk_size", "judging.self_check")}
    view.update({"upstream.rewrite": rewrite.stage.fingerprint,
                 "judge.identity": model.get("weights_sha") or model.get("url"),
                 "judging.prompts": fingerprint_prompts()})
    if rollout is not None:
        view["upstream.rollout"] = rollout.stage.fingerprint
    tasks = manifest.executor.for_stage(STAGE).tasks
    layout = {"executor.tasks": tasks, "judging.chunk_size": cfg.chunk_size}
    return JudgePlan(manifest, StageDir(manifest, STAGE, "judgments", view, layout), shard.stage.path,
                     rewrite.stage.path, shard.tokenizer_dir, model, rollout.stage.path if rollout else None)


def fingerprint_prompts() -> str:
    import hashlib

    return hashlib.sha256("".join((PROMPTS / f"judge_{c}.txt").read_text() for c in CRITERIA).encode()).hexdigest()[:16]


def judge_summary(plan: JudgePlan, elapsed_s: float | None) -> dict:
    # Costs come from the chunk files (complete after any resume); only the engine start-up,
    # a per-task cost, comes from the tasks' stats.
    stats = chunk_stats(plan.stage.path)
    j = pl.from_arrow(read_table(plan.stage.path))
    by_source = (
        j.group_by("source")
        .agg(pl.len().alias("candidates"), *(pl.col(c).mean().round(3) for c in (*CRITERIA, "reward")))
        .sort("source")
    )
    compared = int(stats.get("order_compared", 0))
    summary = {
        "candidates": len(j),
        "pairs": j["pair_id"].n_unique(),
        "by_source": {r["source"]: {k: v for k, v in r.items() if k != "source"} for r in by_source.iter_rows(named=True)},
        "unparsable_candidates": int((j["parse_status"] == "unparsable").sum()),
        "unparsable_by_criterion": {k.removeprefix("unparsable_"): int(v) for k, v in stats.items()
                                    if k.startswith("unparsable_")},
        "order_agreement": round(stats.get("order_agreed", 0) / compared, 3) if compared else None,
        "prefix_cache_hit_rate": (round(stats["prefix_cache_hit_tokens"] / stats["prefix_cache_queried_tokens"], 3)
                                  if stats.get("prefix_cache_queried_tokens") else None),
        "judge_calls": int(stats.get("judge_calls", 0)),
        "prompt_tokens": int(stats.get("prompt_tokens", 0)),
        "completion_tokens": int(stats.get("completion_tokens", 0)),
        "engine_s": round(stats.get("engine_ms", 0) / 1000, 2),
        "engine_start_s": round(plan.stage.merged_stats().get("engine_start_ms", 0) / 1000, 2),
        "modes": {c: getattr(plan.manifest.judging, c).mode for c in CRITERIA if getattr(plan.manifest.judging, c)},
    }
    if elapsed_s:
        summary["elapsed_s"] = round(elapsed_s, 2)
    return summary


def finalize_judge(manifest: Manifest, elapsed_s: float | None = None) -> dict:
    plan = plan_judge(manifest)
    judged = set(read_table(plan.stage.path, columns=["pair_id"]).column("pair_id").to_pylist())
    pairs = set(read_table(plan.pairs_dir, columns=["pair_id"]).column("pair_id").to_pylist())
    if judged != pairs:
        raise StageFailed(f"judge: {len(pairs - judged)} pairs have no judgments")
    summary, notes = judge_summary(plan, elapsed_s), ""
    return write_card(plan.stage, summary, notes)


def judge_job(manifest: Manifest, upstream_pending: bool = False) -> StageJob:
    plan = plan_judge(manifest, upstream_pending)
    return StageJob(plan.stage, plan.pipeline(), partial(finalize_judge, manifest),
                    estimate=partial(describe_judge_cost, plan))


def run_judge(manifest: Manifest, *, force: bool = False, dry_run: bool = False, wait: bool = True,
              log: Callable[[str], None] = print) -> dict | None:
    return run_chain(manifest, [judge_job(manifest)], force=force, dry_run=dry_run, wait=wait, log=log).get(STAGE)


def summary_line(card: dict) -> str:
    """The one line ``sip`` prints for a finished judge stage (its card's summary)."""
    s = card["summary"]
    agree = f", order agreement {s['order_agreement']}" if s.get("order_agreement") is not None else ""
    return (f"judge: {s['candidates']} candidates of {s['pairs']} pairs ({s['modes']}); "
            f"{s['unparsable_candidates']} unparsable{agree}; {s['judge_calls']} judge calls")
