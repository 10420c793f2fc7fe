"""Rollout stage: K samples of N tokens per prefix from the policy (METHOD.md "Units").

The policy is a base LM continuing text: it is fed each pair's ``prefix_ids`` as they are (no
chat template) and samples K = ``rollouts.count`` continuations of at most N =
``shard.suffix_tokens`` tokens in one request (n = K), at ``rollouts.temperature``/``top_p``.
Every pair gives exactly K rows (``sample`` 0..K-1), each with a status:

- ``ok``: a continuation; ``text`` is its ids decoded after the prefix's ids (the exact text
  the judge sees: decoded on their own, a SentencePiece-style tokenizer's ids lose their
  leading space);
- ``empty``: only whitespace or an immediate end-of-text;
- ``too_long``: prefix + N tokens do not fit ``rollouts.max_model_len``; ``error``: the request failed.

Seeding: vLLM on CPU cannot seed single requests, so task r's engine is seeded with
``run.seed + r``. An uninterrupted run with the same task layout repeats its samples; a
chunk redone after a crash draws fresh samples from the same distribution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.cards import write_card
from pipeline.chunks import EngineStep
from pipeline.engines.base import Engine, Request, Result, Sampling
from pipeline.io import UNIT_LAYOUT, UnitReader, chunk_stats, unit_tables
from pipeline.manifest import Manifest, fingerprint, fingerprinted_view
from pipeline.policy import check_context, policy_hf_dir, policy_identity
from pipeline.runner import StageJob
from pipeline.schema import ROLLOUT_STATUSES, ROLLOUTS, cand_id, provenance, with_provenance
from pipeline.stage import StageDir, StageFailed, require_unit_keys
from pipeline.tokenizer import decode_continuations, load_tokenizer
from stages.shard import plan_shard
from stages.fit import fit_lines

STAGE = "rollout"
UPSTREAMS = ("shard",)  # the stages whose tables this one reads (pipeline.app.registry)
# Engine settings that change how the policy runs, not what it samples: resumable when changed.
_RUN_ONLY = ("rollouts.chunk_size", "rollouts.gpu_memory_utilization")


def rollout_rows(pair: dict, result: Result, k: int, tokenizer, model: str) -> list[dict]:
    """The K rows of one pair (``pair``: ``pair_id``, ``prefix_ids``). Texts are decoded from the
    sampled ids as a continuation of the prefix's ids, never re-tokenized."""
    base = {"pair_id": pair["pair_id"], "model": model, "prompt_tokens": result.prompt_tokens}
    status, error = result.status, result.error
    if status == "ok" and len(result.token_ids) != k:
        status, error = "error", f"the engine returned {len(result.token_ids)} samples, expected {k}"
    if status != "ok":
        return [{**base, "sample": s, "cand_id": None, "text": None, "token_ids": [], "finish_reason": None,
                 "status": status, "error": error, "completion_tokens": 0} for s in range(k)]
    rows = []
    texts = decode_continuations(tokenizer, pair["prefix_ids"], result.token_ids)
    for s, (ids, reason, text) in enumerate(zip(result.token_ids, result.finish_reasons, texts)):
        rows.append({**base, "sample": s, "cand_id": cand_id(pair["pair_id"], text), "text": text, "token_ids": ids,
                     "finish_reason": reason, "status": "ok" if text.strip() else "empty", "error": None,
                     "completion_tokens": len(ids)})
    return rows


class RolloutStep(EngineStep):
    name = "rollout"
    type = "🎲 - ROLLOUTS"

    def __init__(self, manifest: Manifest, output_dir: str, schema, tokenizer_dir: str, model: str):
        super().__init__(output_dir, schema, manifest.rollouts.chunk_size)
        self.manifest = manifest
        self.tokenizer_dir = tokenizer_dir
        self.model = model
        cfg = manifest.rollouts
        self.sampling = Sampling(max_tokens=manifest.shard.suffix_tokens, temperature=cfg.temperature,
                                 top_p=cfg.top_p, n=cfg.count)

    def start_engine(self) -> Engine:
        from pipeline.engines.vllm_engine import VLLMEngine

        started = time.perf_counter()
        directory = policy_hf_dir(self.manifest)  # exports a LitGPT checkpoint once
        self.stat_update("export_ms", value=int((time.perf_counter() - started) * 1000))
        cfg = self.manifest.rollouts
        return VLLMEngine(directory, max_model_len=cfg.max_model_len, dtype=cfg.dtype,
                          seed=self.manifest.run.seed + self.rank,  # this task's seed (see the module doc)
                          gpu_memory_utilization=cfg.gpu_memory_utilization, model_id=self.model)

    def process(self, rows: list[dict]) -> list[dict]:
        engine = self.engine
        requests = [Request(pair["pair_id"], prompt_ids=tuple(pair["prefix_ids"])) for pair in rows]
        started = time.perf_counter()
        results = engine.generate(requests, self.sampling)
        self.count("engine_ms", int((time.perf_counter() - started) * 1000))
        if len(results) > 1 and all(r.status == "error" for r in results):
            # The engine is broken, not the data: fail without writing, so a re-run retries the chunk.
            raise StageFailed(f"rollout: all {len(results)} requests of a chunk failed, e.g. {results[0].error}")
        tokenizer, out = load_tokenizer(self.tokenizer_dir), []
        for pair, result in zip(rows, results):
            for row in rollout_rows(pair, result, self.sampling.n, tokenizer, self.model):
                self.count(f"status_{row['status']}")
                self.count("completion_tokens", row["completion_tokens"])
                out.append(row)
            if result.status == "ok":  # prompts that were sent (too_long ones never reach the model)
                self.count("prompt_tokens", result.prompt_tokens or 0)
        return out


@dataclass
class RolloutPlan:
    manifest: Manifest
    stage: StageDir
    pairs_dir: Path
    tokenizer_dir: Path
    model: dict

    def pipeline(self) -> list:
        m = self.manifest
        prov = provenance(
            stage=STAGE, table="rollouts", manifest_fingerprint=fingerprint(m), stage_fingerprint=self.stage.fingerprint,
            models={"policy": self.model}, settings=m.rollouts.model_dump(),
            sampling={"n": m.rollouts.count, "max_tokens": m.shard.suffix_tokens, "temperature": m.rollouts.temperature,
                      "top_p": m.rollouts.top_p, "engine_seed": f"run.seed + task rank = {m.run.seed} + r"},
        )
        return [
            UnitReader(str(self.pairs_dir), columns=["pair_id", "prefix_ids"]),
            RolloutStep(m, str(self.stage.path), with_provenance(ROLLOUTS, prov), str(self.tokenizer_dir),
                        self.model["name"]),
        ]


def plan_rollout(manifest: Manifest, upstream_pending: bool = False) -> RolloutPlan:
    """``upstream_pending``: the shard stage is queued in the same chain (not done yet)."""
    if manifest.rollouts.count == 0:
        raise StageFailed("rollout: rollouts.count is 0, so there is no rollout stage; set rollouts.count to K > 0")
    check_context(manifest)
    shard = plan_shard(manifest)
    if not upstream_pending:
        shard.stage.check_upstream_of(STAGE)
    model = policy_identity(manifest)
    view = {k: v for k, v in fingerprinted_view(manifest, ("rollouts", "run.seed", "shard.suffix_tokens")).items()
            if k not in _RUN_ONLY}
    view.update({"upstream.shard": shard.stage.fingerprint, "policy.identity": model["weights_sha"]})
    tasks = manifest.executor.for_stage(STAGE).tasks
    layout = {"executor.tasks": tasks, "rollouts.chunk_size": manifest.rollouts.chunk_size, **UNIT_LAYOUT}
    return RolloutPlan(manifest, StageDir(manifest, STAGE, "rollouts", view, layout), shard.stage.path,
                       shard.tokenizer_dir, model)


def _median(counts: np.ndarray) -> float:
    """The median (nearest rank) of the values ``0 .. len(counts) - 1`` counted by ``counts``."""
    position = int(round(0.5 * (int(counts.sum()) - 1)))
    return float(np.searchsorted(np.cumsum(counts), position + 1))


def rollout_summary(plan: RolloutPlan, elapsed_s: float | None) -> dict:
    # Costs come from the chunk files (complete after any resume); the export and the engine
    # start-up, per-task costs, and the resumed chunks come from the tasks' stats. The rows are
    # summarized a unit at a time (a rollout's pair is in its unit): the card job holds one
    # unit's texts, not the table's.
    stats, task_stats = chunk_stats(plan.stage.path), plan.stage.merged_stats()
    n = plan.manifest.shard.suffix_tokens
    statuses, reasons = Counter(), Counter()
    lengths = np.zeros(n + 2, np.int64)  # ok rollouts by token count (a count past N lands in the last bin)
    pairs = rows = distinct_sum = distinct_pairs = equal = completion = 0
    columns = ["pair_id", "text", "token_ids", "finish_reason", "status", "completion_tokens"]
    for unit_pairs, unit_rows in unit_tables(plan.pairs_dir, plan.stage.path, columns, ["pair_id", "suffix"]):
        r, suffixes = pl.from_arrow(unit_rows), pl.from_arrow(unit_pairs)
        pairs, rows = pairs + suffixes.height, rows + r.height
        statuses.update(dict(r.group_by("status").len().iter_rows()))
        reasons.update(dict(r.filter(pl.col("finish_reason").is_not_null()).group_by("finish_reason").len().iter_rows()))
        ok = r.filter(pl.col("status") == "ok").with_columns(pl.col("token_ids").list.len().alias("tokens"))
        lengths += np.bincount(np.minimum(ok["tokens"].to_numpy(), n + 1), minlength=n + 2)
        # Diversity: distinct texts among a pair's ok rollouts (K = every sample differs).
        per_pair = ok.group_by("pair_id").agg(pl.col("text").n_unique())["text"]
        distinct_sum, distinct_pairs = distinct_sum + int(per_pair.sum() or 0), distinct_pairs + per_pair.len()
        equal += ok.join(suffixes, on="pair_id").filter(pl.col("text") == pl.col("suffix")).height
        completion += int(r["completion_tokens"].sum() or 0)
    ok_count = int(lengths.sum())
    tokens = np.arange(n + 2)
    summary = {
        "pairs": pairs, "rows": rows, "rollouts_per_pair": plan.manifest.rollouts.count,
        "status_counts": {s: int(statuses.get(s, 0)) for s in ROLLOUT_STATUSES},
        "finish_reasons": dict(sorted(reasons.items())),
        "rollout_tokens": {"mean": round(float((lengths * tokens).sum() / ok_count), 1) if ok_count else 0.0,
                           "p50": float(_median(lengths)) if ok_count else 0.0,
                           "max": int(tokens[lengths > 0].max()) if ok_count else 0, "target": n},
        "distinct_per_pair_mean": round(distinct_sum / distinct_pairs, 2) if distinct_pairs else 0.0,
        "equal_to_original": equal,
        "completion_tokens": completion,
        "engine_s": round(stats.get("engine_ms", 0) / 1000, 2),
        "engine_start_s": round(task_stats.get("engine_start_ms", 0) / 1000, 2),
        "export_s": round(task_stats.get("export_ms", 0) / 1000, 2),
        "chunks_resumed": int(task_stats.get("chunks_resumed", 0)),
        "policy": plan.model["name"],
    }
    if summary["engine_s"]:  # the work and the time of the same chunks
        summary["completion_tokens_per_engine_s"] = round(stats.get("completion_tokens", 0) / summary["engine_s"], 1)
    if elapsed_s:
        summary["elapsed_s"] = round(elapsed_s, 2)
    return summary


def finalize_rollout(manifest: Manifest, elapsed_s: float | None = None) -> dict:
    plan = plan_rollout(manifest)
    count = manifest.rollouts.count
    require_unit_keys(plan.stage.path, plan.pairs_dir, ["pair_id", "sample"],
                      lambda pairs: {(p, s) for p in pairs for s in range(count)},
                      f"every pair x {count} samples (rollouts.count)")
    notes = ("Each row is one sample of the policy continuing the pair's `prefix_ids` (no chat template); "
             "`text` is `token_ids` decoded, special tokens not shown.")
    return write_card(plan.stage, rollout_summary(plan, elapsed_s), notes)


def rollout_job(manifest: Manifest, upstream_pending: bool = False) -> StageJob:
    plan = plan_rollout(manifest, upstream_pending)
    return StageJob(plan.stage, plan.pipeline(), partial(finalize_rollout, manifest),
                    fit=partial(fit_lines, manifest, ("policy",)))



def summary_line(card: dict) -> str:
    """The one line ``sip`` prints for a finished rollout stage (its card's summary)."""
    s = card["summary"]
    counts = ", ".join(f"{k} {v}" for k, v in s["status_counts"].items() if v)
    rate = f"; {s['completion_tokens_per_engine_s']} output tokens/s" if "completion_tokens_per_engine_s" in s else ""
    return (f"rollout: {s['rows']} rollouts of {s['pairs']} pairs ({counts}){rate}; "
            f"engine start {s['engine_start_s']} s")
