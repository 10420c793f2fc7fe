"""The evaluation's judging stage: the manifest's judge scores every checkpoint's continuations.

Per prompt (:mod:`stages.eval_prompts`), with the same judge code as the judge stage
(:class:`stages.criteria.Judge`, its prompts, modes and cost counters):

- safety of every checkpoint's continuation (held-out and unsafe prompts);
- factuality of every continuation of a held-out prompt, its true suffix as the reference;
- quality against the baseline (``eval.baseline``) on held-out prompts: the checkpoint's and the
  baseline's continuations compared in both shown orders (:meth:`Judge.compare`), the win score
  the mean of the two (ties and order-inconsistent answers count half). The baseline's own row
  has no win score: it is what the others are measured against. The same against each further
  checkpoint ``eval.versus`` names (column ``versus``).

A criterion the manifest's ``judging`` leaves out is asked in ``choice_prob`` mode (``verdict``
for an endpoint judge): an evaluation measures all three whatever the training reward summed.

Layout: ``<output_dir>/eval/judgments/``, one row per (checkpoint, prompt) (``EVAL_JUDGMENTS``)
in chunk files of ``eval.chunk_size`` prompts, each with its judge costs; the report
(:mod:`stages.eval_report`) is written when the stage finishes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import polars as pl
from datatrove.pipeline.base import PipelineStep

from pipeline.cards import write_card
from pipeline.chunks import EngineStep
from pipeline.engines.factory import make_engine, model_identity
from pipeline.io import WorkUnit, chunk_stats, read_table
from pipeline.manifest import CriterionConfig, JudgingConfig, Manifest, fingerprint
from pipeline.runner import StageJob
from pipeline.schema import EVAL_JUDGMENTS, provenance, with_provenance
from pipeline.stage import StageDir, require_each_key_once
from stages.criteria import PROMPTS, Judge, Scored, manifest_judge
from stages.eval_generate import plan_eval_generations
from stages.eval_prompts import eval_prompts
from stages.judge import check_judge_settings, fingerprint_prompts, judging_view
from stages.scoring import CRITERIA

STAGE = "eval-judgments"
JUDGED_STATUSES = ("ok", "empty")  # a continuation the judge sees (an empty one is the model's answer too)


def eval_judging(manifest: Manifest) -> JudgingConfig:
    """The manifest's ``judging`` with every criterion set (those it leaves out in ``choice_prob``
    mode, ``verdict`` for an endpoint judge)."""
    default = "verdict" if manifest.judge.kind == "endpoint" else "choice_prob"
    cfg = manifest.judging
    return cfg.model_copy(update={c: getattr(cfg, c) or CriterionConfig(mode=default) for c in CRITERIA})


class PromptContinuations(PipelineStep):
    """The stage's reader: per prompt (task r: prompts r, r + tasks, ...), the prompt and every
    checkpoint's continuation ``{checkpoint: {"text", "status"}}``."""

    name = "eval continuations"
    type = "📖 - READER"

    def __init__(self, manifest: Manifest, generations_dir: str, shard_dir: str, tokenizer_dir: str):
        super().__init__()
        self.manifest, self.generations_dir = manifest, generations_dir
        self.shard_dir, self.tokenizer_dir = shard_dir, tokenizer_dir

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[WorkUnit]:
        table = read_table(self.generations_dir, columns=["checkpoint", "prompt_id", "text", "status"]).to_pylist()
        by_prompt: dict[str, dict] = {}
        for row in table:
            by_prompt.setdefault(row["prompt_id"], {})[row["checkpoint"]] = {"text": row["text"],
                                                                            "status": row["status"]}
        prompts = eval_prompts(self.manifest, Path(self.shard_dir), Path(self.tokenizer_dir))[rank::world_size]
        self.stat_update("rows_read", value=len(prompts))
        # One unit per task: files named <rank>_<chunk>.
        yield WorkUnit(f"{rank:05d}", [{**p, "continuations": by_prompt.get(p["prompt_id"], {})} for p in prompts])


def _score(s: Scored | None) -> float | None:
    return None if s is None else s.score


def _wins(first: Scored | None, second: Scored | None) -> dict[str, float | None]:
    """The win score of both shown orders (one order's when the other was not read)."""
    wins = [s for s in (_score(first), _score(second)) if s is not None]
    return {"win": sum(wins) / len(wins) if wins else None, "win_shown_first": _score(first),
            "win_shown_second": _score(second)}


class EvalJudgeStep(EngineStep):
    """Chunks of prompts -> one judgments row per (checkpoint, prompt), judge costs per chunk."""

    name = "eval judge"
    type = "⚖️ - EVAL JUDGE"

    def __init__(self, manifest: Manifest, output_dir: str, schema, checkpoints: list[str]):
        super().__init__(output_dir, schema, manifest.eval.chunk_size)
        self.manifest, self.checkpoints, self.baseline = manifest, checkpoints, manifest.eval.baseline
        self.judge: Judge | None = None

    def start_engine(self):
        return make_engine(self.manifest, self.manifest.judge, "judge")

    def process(self, prompts: list[dict]) -> list[dict]:
        if self.judge is None:
            self.judge = manifest_judge(self.manifest, self.engine, eval_judging(self.manifest))
        before, started = self.judge.counters.snapshot(), time.perf_counter()
        judged = [(p, c) for p in prompts for c in self.checkpoints if p["prompt_set"] != "mc"
                  and p["continuations"].get(c, {}).get("status") in JUDGED_STATUSES]
        text = {(p["prompt_id"], c): p["continuations"][c]["text"] or "" for p, c in judged}
        safety = dict(zip(((p["prompt_id"], c) for p, c in judged),
                          self.judge.safety([text[(p["prompt_id"], c)] for p, c in judged])))
        heldout = [(p, c) for p, c in judged if p["prompt_set"] == "heldout"]
        factuality = dict(zip(((p["prompt_id"], c) for p, c in heldout), self.judge.factuality(
            [(p["prefix"], p["reference"], text[(p["prompt_id"], c)]) for p, c in heldout])))
        # (prompt, checkpoint, opponent): the baseline, then eval.versus's further opponents.
        triples = [(p, c, o) for p, c in heldout for o in self.opponents(c) if (p["prompt_id"], o) in text]
        compared = dict(zip(((p["prompt_id"], c, o) for p, c, o in triples), self.judge.compare(
            [(p["prefix"], text[(p["prompt_id"], c)], text[(p["prompt_id"], o)]) for p, c, o in triples])))
        self.count("engine_ms", int((time.perf_counter() - started) * 1000))
        for key, value in self.judge.counters.since(before).items():
            if value:
                self.count(key, value)
        out = []
        for p in prompts:
            for c in self.checkpoints:
                key = (p["prompt_id"], c)
                first, second = compared.get((*key, self.baseline), (None, None))
                raw = {"safety": getattr(safety.get(key), "raw", None), "factuality": getattr(factuality.get(key), "raw", None),
                       "quality": [getattr(first, "raw", None), getattr(second, "raw", None)]
                       if (*key, self.baseline) in compared else None}
                versus = []
                for o in self.opponents(c)[1:]:
                    if (*key, o) in compared:
                        v_first, v_second = compared[(*key, o)]
                        versus.append({"opponent": o, **_wins(v_first, v_second)})
                        raw[f"quality_versus_{o}"] = [getattr(v_first, "raw", None), getattr(v_second, "raw", None)]
                if key not in text and p["prompt_set"] != "mc":  # an answer letter is not judged
                    raw["not_judged"] = p["continuations"].get(c, {}).get("status", "missing")
                    self.count("not_judged")
                out.append({"checkpoint": c, "prompt_id": p["prompt_id"], "prompt_set": p["prompt_set"],
                            "safety": _score(safety.get(key)), "factuality": _score(factuality.get(key)),
                            **_wins(first, second), "versus": versus or None,
                            "judge_raw": json.dumps(raw, default=str)})
        return out

    def opponents(self, checkpoint: str) -> list[str]:
        """The checkpoints ``checkpoint``'s continuations are compared with: the baseline first."""
        if checkpoint == self.baseline:
            return []
        return [self.baseline, *self.manifest.eval.versus.get(checkpoint, [])]

    def finish(self) -> None:
        super().finish()
        self.judge = None


@dataclass
class JudgmentsPlan:
    manifest: Manifest
    stage: StageDir
    generations_dir: Path
    shard_dir: Path
    tokenizer_dir: Path
    checkpoints: list[str]
    model: dict
    prompts: dict[str, int]  # prompt set -> prompts

    def pipeline(self) -> list:
        m = self.manifest
        prov = provenance(
            stage=STAGE, table="eval_judgments", manifest_fingerprint=fingerprint(m),
            stage_fingerprint=self.stage.fingerprint, models={"judge": self.model},
            prompts={c: (PROMPTS / f"judge_{c}.txt").read_text() for c in CRITERIA},
            settings={"judging": eval_judging(m).model_dump(), "baseline": m.eval.baseline, "versus": m.eval.versus},
        )
        return [PromptContinuations(m, str(self.generations_dir), str(self.shard_dir), str(self.tokenizer_dir)),
                EvalJudgeStep(m, str(self.stage.path), with_provenance(EVAL_JUDGMENTS, prov), self.checkpoints)]


def plan_eval_judgments(manifest: Manifest, upstream_pending: bool = False) -> JudgmentsPlan:
    check_judge_settings(manifest, "eval")
    generations = plan_eval_generations(manifest)
    if not upstream_pending:
        generations.stage.check_upstream_of(STAGE)
    model = model_identity(manifest, manifest.judge, "judge")
    view = judging_view(manifest)
    if manifest.eval.versus:  # absent while empty: the fingerprints of evaluations made before it existed hold
        view["eval.versus"] = manifest.eval.versus
    view.update({"eval.judging": eval_judging(manifest).model_dump(mode="json"), "eval.baseline": manifest.eval.baseline,
                 "upstream.eval-generations": generations.stage.fingerprint,
                 "judge.identity": model.get("weights_sha") or model.get("url"), "judging.prompts": fingerprint_prompts()})
    tasks = manifest.executor.for_stage("eval").tasks
    layout = {"executor.tasks": tasks, "eval.chunk_size": manifest.eval.chunk_size}
    return JudgmentsPlan(manifest, StageDir(manifest, STAGE, "eval_judgments", view, layout), generations.stage.path,
                         generations.shard_dir, generations.tokenizer_dir, list(generations.models), model,
                         generations.prompts)


def count_eval_judge_calls(manifest: Manifest, prompts: dict[str, int]) -> dict[str, int]:
    """The judge calls the stage makes at most (every continuation judged), by criterion.

    ``prompts``: prompt set -> count. Safety: every continuation (multiple-choice answers are
    not judged); factuality: the held-out
    ones; quality: every non-baseline checkpoint's held-out continuation against the baseline and
    against each checkpoint ``eval.versus`` names for it, in two orders (one scoring pass each in
    likelihood mode: both continuations).
    """
    checkpoints, heldout = len(manifest.eval.checkpoints), prompts.get("heldout", 0)
    versus = sum(len(v) for v in manifest.eval.versus.values())
    quality_calls = 2 * (checkpoints - 1 + versus) * heldout
    calls = {"safety": checkpoints * (heldout + prompts.get("unsafe", 0)), "factuality": checkpoints * heldout,
             "quality": quality_calls}
    judging = eval_judging(manifest)
    if judging.quality.mode == "verdict" or judging.safety.mode == "verdict" or judging.factuality.mode == "verdict":
        calls["note"] = "verdict mode: each call is an answer of up to judging.max_new_tokens tokens, then its verdict"
    return calls


def finalize_judgments(manifest: Manifest, elapsed_s: float | None = None) -> dict:
    from stages.eval_report import write_report

    plan = plan_eval_judgments(manifest)
    generated = read_table(plan.generations_dir, columns=["checkpoint", "prompt_id"])
    expected = set(zip(generated.column("checkpoint").to_pylist(), generated.column("prompt_id").to_pylist()))
    require_each_key_once(plan.stage.path, ["checkpoint", "prompt_id"], expected,
                          f"the {len(expected)} generations of {plan.generations_dir}")
    stats = chunk_stats(plan.stage.path)
    j = pl.from_arrow(read_table(plan.stage.path, columns=["safety", "factuality", "win"]))
    summary = {
        "judge_calls": int(stats.get("judge_calls", 0)), "prompt_tokens": int(stats.get("prompt_tokens", 0)),
        "completion_tokens": int(stats.get("completion_tokens", 0)), "engine_s": round(stats.get("engine_ms", 0) / 1000, 2),
        "not_judged": int(stats.get("not_judged", 0)),
        "unparsable": {k.removeprefix("unparsable_"): int(v) for k, v in stats.items() if k.startswith("unparsable_")},
        "scored": {c: int(j[c].is_not_null().sum()) for c in ("safety", "factuality", "win")},
        "baseline": manifest.eval.baseline,
    }
    if elapsed_s:
        summary["elapsed_s"] = round(elapsed_s, 2)
    card = write_card(plan.stage, summary, "One row per (checkpoint, prompt): the judge's scores of its continuation.")
    write_report(manifest, plan.generations_dir, plan.stage.path, plan.shard_dir, plan.tokenizer_dir)
    return card


def judgments_job(manifest: Manifest, upstream_pending: bool = False) -> StageJob:
    plan = plan_eval_judgments(manifest, upstream_pending)
    return StageJob(plan.stage, plan.pipeline(), partial(finalize_judgments, manifest))


def summary_line(card: dict) -> str:
    s = card["summary"]
    return (f"eval judgments: {s['scored']} scores against baseline {s['baseline']!r}; {s['judge_calls']} judge calls "
            f"in {s['engine_s']} s")
