"""Rewrite stage: the rewriter model improves each pair's suffix (METHOD.md, "Rewriter").

For every pair the rewriter sees the prefix and the original suffix and answers with a
rewritten suffix. Following the paper, the last few words of the prefix (the *primer*) are
put at the start of the continuation it is shown, and its answer is primed with them, so
the rewrite flows on from the prefix; the primer is stripped afterwards. Each pair gives
exactly one row, with a status:

- ``ok``: a rewrite; ``copied``: the rewriter returned the original (whitespace aside);
- ``refused``: the rewriter declined (never kept as a rewrite); ``empty``: nothing came back;
- ``too_long``: the prompt does not fit the model's context; ``error``: the request failed.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import partial
from pathlib import Path

import polars as pl

from pipeline.cards import write_card
from pipeline.chunks import EngineStep
from pipeline.engines.base import Engine, Request, Result, Sampling
from pipeline.engines.factory import RUN_ONLY, counting_tokenizer, make_engine, model_identity
from pipeline.io import UNIT_LAYOUT, UnitReader, chunk_stats, unit_tables
from pipeline.manifest import Manifest, fingerprint, fingerprinted_view
from pipeline.prompts import PromptTemplate
from pipeline.runner import StageJob
from pipeline.schema import REWRITES, provenance, with_provenance
from pipeline.stage import StageDir, StageFailed, require_unit_keys
from pipeline.tokenizer import Window, join_encoding, load_tokenizer, prefix_window
from stages.refusals import is_refusal
from stages.shard import plan_shard
from stages.fit import fit_lines

STAGE = "rewrite"
UPSTREAMS = ("shard",)  # the stages whose tables this one reads (pipeline.app.registry)
DEFAULT_PROMPT = Path(__file__).parent / "prompts" / "rewrite.txt"
_WORD = re.compile(r"\S+\s*$")


def primer_of(prefix: str, words: int) -> str:
    """The prefix's last ``words`` words, verbatim (with the whitespace between them)."""
    if words <= 0:
        return ""
    tail = prefix.rstrip()
    start = len(tail)
    for _ in range(words):
        match = _WORD.search(tail[:start])
        if not match:
            break
        start = match.start()
    return prefix[start:]


def normalize_ws(text: str) -> str:
    return " ".join(text.split())


def to_row(result: Result, pair: dict, primer: str, model: str, prompt_sha: str) -> dict:
    row = {
        "pair_id": pair["pair_id"], "rewrite": None, "status": result.status, "error": result.error,
        "model": model, "prompt_sha": prompt_sha, "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reasons[0] if result.finish_reasons else None,
    }
    if result.status != "ok":
        return row
    text = result.texts[0] if result.texts else ""
    # Some models repeat the primer although it was prefilled: never keep it twice.
    head = text.lstrip()
    if primer.strip() and head.startswith(primer.strip()) and not head[len(primer.strip()):][:1].isalnum():
        text = head[len(primer.strip()):]
    if not text.strip():
        row["status"] = "empty"
    elif is_refusal(text, pair["suffix"]):
        row["status"] = "refused"
        row["error"] = f"refusal: {text.strip()[:200]}"
    elif normalize_ws(text) == normalize_ws(pair["suffix"]):
        row["status"], row["rewrite"] = "copied", pair["suffix"]
    else:
        row["rewrite"] = text
    return row


class RewriteStep(EngineStep):
    name = "rewrite"
    type = "✍️ - REWRITER"

    def __init__(self, manifest: Manifest, output_dir: str, schema, template: PromptTemplate, model: str):
        super().__init__(output_dir, schema, manifest.rewrite.chunk_size)
        self.manifest = manifest
        self.template = template
        self.model = model
        self._counter = None  # the rewriter's tokenizer, loaded on first use
        cfg = manifest.rewrite
        self.sampling = Sampling(
            max_tokens=cfg.max_new_tokens or -(-5 * manifest.shard.suffix_tokens // 4),
            temperature=cfg.temperature, top_p=cfg.top_p, stop=tuple(cfg.stop),
        )

    def window(self, prefix: str) -> Window:
        """What the rewriter is shown of ``prefix`` (``rewrite.prefix_tokens``, counted by the
        rewriter's tokenizer; an endpoint's by the policy's)."""
        if self._counter is None:
            self._counter = counting_tokenizer(self.manifest, self.manifest.rewriter, "rewriter")
        return prefix_window(self._counter, prefix, self.manifest.rewrite.prefix_tokens)

    def request(self, pair: dict) -> tuple[Request, str, Window]:
        primer = primer_of(pair["prefix"], self.manifest.rewrite.prime_words)
        shown = self.window(pair["prefix"])
        messages = self.template.messages(prefix=shown.text, continuation=primer + pair["suffix"])
        return Request(pair["pair_id"], messages, prefill=primer), primer, shown

    def start_engine(self) -> Engine:
        return make_engine(self.manifest, self.manifest.rewriter, "rewriter")

    def process(self, rows: list[dict]) -> list[dict]:
        engine = self.engine
        built = [self.request(pair) for pair in rows]
        started = time.perf_counter()
        results = engine.generate([r for r, _, _ in built], self.sampling)
        self.count("engine_ms", int((time.perf_counter() - started) * 1000))
        if len(results) > 1 and all(r.status == "error" for r in results):
            # Every request failed: the engine or server is down or misconfigured, not the data.
            # Fail the task without writing the chunk, so a re-run retries these pairs.
            raise StageFailed(f"rewrite: all {len(results)} requests of a chunk failed, e.g. {results[0].error}")
        out = []
        for pair, (_, primer, shown), result in zip(rows, built, results):
            row = to_row(result, pair, primer, self.model, self.template.sha) | {"prefix_tokens": shown.tokens}
            self.count("prefix_cut", int(shown.cut))
            self.count(f"status_{row['status']}")
            self.count("prompt_tokens", row["prompt_tokens"] or 0)
            self.count("completion_tokens", row["completion_tokens"] or 0)
            out.append(row)
        return out


@dataclass
class RewritePlan:
    manifest: Manifest
    stage: StageDir
    pairs_dir: Path
    template: PromptTemplate
    model: dict

    def step(self) -> RewriteStep:
        """The stage's rewrite step (its requests and sampling settings are what a benchmark replays)."""
        prov = provenance(
            stage=STAGE, table="rewrites", manifest_fingerprint=fingerprint(self.manifest),
            stage_fingerprint=self.stage.fingerprint, models={"rewriter": self.model},
            prompts={"rewrite": self.template.text}, settings=self.manifest.rewrite.model_dump(),
            sampling={"temperature": self.manifest.rewrite.temperature, "top_p": self.manifest.rewrite.top_p},
        )
        return RewriteStep(self.manifest, str(self.stage.path), with_provenance(REWRITES, prov), self.template,
                           self.model.get("served_name") or self.model.get("name") or "model")

    def pipeline(self) -> list:
        return [UnitReader(str(self.pairs_dir), columns=["pair_id", "prefix", "suffix"]), self.step()]


def plan_rewrite(manifest: Manifest, upstream_pending: bool = False) -> RewritePlan:
    """``upstream_pending``: the shard stage is queued in the same Slurm chain (not done yet)."""
    if manifest.rewriter is None:
        raise StageFailed("rewrite: the manifest has no 'rewriter' section (model: embedded, a path or an endpoint)")
    shard = plan_shard(manifest).stage
    if not upstream_pending:
        shard.check_upstream_of(STAGE)
    template = PromptTemplate.load(manifest.resolve_path(manifest.rewrite.prompt) if manifest.rewrite.prompt else DEFAULT_PROMPT)
    model = model_identity(manifest, manifest.rewriter, "rewriter")
    if manifest.rewriter.kind == "embedded":
        model["name"] = "SmolLM2-135M-Instruct"
    view = {k: v for k, v in fingerprinted_view(manifest, ("rewriter", "rewrite", "run.seed")).items()
            if k.removeprefix("rewriter.") not in RUN_ONLY}
    view.update({"upstream.shard": shard.fingerprint, "rewrite.prompt_sha": template.sha,
                 "rewriter.identity": model.get("weights_sha") or model.get("url")})
    tasks = manifest.executor.for_stage(STAGE).tasks
    return RewritePlan(manifest, StageDir(manifest, STAGE, "rewrites", view, {"executor.tasks": tasks, **UNIT_LAYOUT}),
                       shard.path, template, model)


_OVERLAP_SAMPLE = 20_000  # rewrites (the first, in table order) whose overlap and length the card reports


def rewrite_summary(plan: RewritePlan, elapsed_s: float | None) -> dict:
    stage = plan.stage
    # Costs come from the chunk files (complete after any resume); the engine start-up, a
    # per-task cost, and the resumed chunks come from the tasks' stats.
    stats, task_stats = chunk_stats(stage.path), stage.merged_stats()
    tok = load_tokenizer(str(plan_shard(plan.manifest).tokenizer_dir))
    # A unit at a time (a rewrite's pair is in its unit): the card job holds one unit's texts.
    counts, pairs, rows, overlaps, lengths = Counter(), 0, 0, [], []
    for unit_pairs, unit_rows in unit_tables(plan.pairs_dir, stage.path, ["pair_id", "rewrite", "status"],
                                             ["pair_id", "prefix", "suffix_ids"]):
        rewrites = pl.from_arrow(unit_rows)
        pairs, rows = pairs + unit_pairs.num_rows, rows + rewrites.height
        counts.update(dict(rewrites.group_by("status").len().iter_rows()))
        if len(overlaps) >= _OVERLAP_SAMPLE:
            continue
        kept = rewrites.filter(pl.col("rewrite").is_not_null()).join(pl.from_arrow(unit_pairs), on="pair_id")
        for prefix, text, original in zip(*(kept.head(_OVERLAP_SAMPLE - len(overlaps))[c].to_list()
                                            for c in ("prefix", "rewrite", "suffix_ids"))):
            joined = join_encoding(tok, prefix, text)  # the rewrite's tokens as they follow the prefix
            ids = joined.ids[joined.start:]
            lengths.append(len(ids))
            overlaps.append(SequenceMatcher(None, original, ids, autojunk=False).ratio())
    length = pl.Series(lengths or [0])
    summary = {
        "pairs": pairs, "rows": rows,
        "status_counts": {s: int(counts.get(s, 0)) for s in ("ok", "copied", "refused", "empty", "too_long", "error")},
        "token_overlap_with_original_mean": round(sum(overlaps) / len(overlaps), 3) if overlaps else None,
        "rewrite_tokens": {"mean": round(float(length.mean()), 1), "p50": float(length.quantile(0.5)),
                           "p90": float(length.quantile(0.9)), "target": plan.manifest.shard.suffix_tokens},
        # Pairs whose prefix was longer than rewrite.prefix_tokens: the rewriter saw its end only.
        "prefix_window": {"prefix_tokens": plan.manifest.rewrite.prefix_tokens, "cut": int(stats.get("prefix_cut", 0))},
        "prompt_tokens": int(stats.get("prompt_tokens", 0)),
        "completion_tokens": int(stats.get("completion_tokens", 0)),
        "engine_s": round(stats.get("engine_ms", 0) / 1000, 2),
        "engine_start_s": round(task_stats.get("engine_start_ms", 0) / 1000, 2),
        "chunks_resumed": int(task_stats.get("chunks_resumed", 0)),
    }
    if summary["engine_s"]:
        summary["completion_tokens_per_engine_s"] = round(summary["completion_tokens"] / summary["engine_s"], 1)
    if elapsed_s:
        summary["elapsed_s"] = round(elapsed_s, 2)
    return summary


def finalize_rewrite(manifest: Manifest, elapsed_s: float | None = None) -> dict:
    plan = plan_rewrite(manifest)
    require_unit_keys(plan.stage.path, plan.pairs_dir, ["pair_id"], lambda pairs: {(p,) for p in pairs},
                      "one rewrite row per pair")
    notes = "## Prompt template\n\n```\n" + plan.template.text.strip() + "\n```"
    return write_card(plan.stage, rewrite_summary(plan, elapsed_s), notes)


def rewrite_job(manifest: Manifest, upstream_pending: bool = False) -> StageJob:
    plan = plan_rewrite(manifest, upstream_pending)
    return StageJob(plan.stage, plan.pipeline(), partial(finalize_rewrite, manifest),
                    fit=partial(fit_lines, manifest, ("rewriter",)))



def summary_line(card: dict) -> str:
    """The one line ``sip`` prints for a finished rewrite stage (its card's summary)."""
    s = card["summary"]
    counts = ", ".join(f"{k} {v}" for k, v in s["status_counts"].items() if v)
    rate = f"; {s['completion_tokens_per_engine_s']} output tokens/s" if "completion_tokens_per_engine_s" in s else ""
    return f"rewrite: {s['rows']} rows ({counts}){rate}; engine start {s['engine_start_s']} s"
