"""Judge self-check (`sip judge-check`): how well the manifest's judge, in the manifest's
modes, separates labelled texts (:mod:`pipeline.app.judge_check.labelled_sets`), with the
stage's own judge code (:class:`stages.criteria.Judge`).

Per check: n, the metric (ROC AUC of pointwise scores, or the pairwise accuracy of the true
continuation against a corrupted one; ties count half), the parse rate (judge answers that
gave a score / all answers), order agreement (pairwise modes shown in both orders), judge
calls, prompt and completion tokens, and seconds. The engine is metered on its own side too
(requests, tokens), so the judge's cost accounting can be checked against it. Then the
judge's robustness: position bias and injected candidates (:mod:`.robustness`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from pipeline.atomic import write_text_atomic
from pipeline.app.judge_check.labelled_sets import CORRUPTIONS, build_checks
from pipeline.app.judge_check.metering import Meter, MeteredEngine
from pipeline.app.judge_check.robustness import format_robustness, run_robustness
from pipeline.engines.factory import make_engine, model_identity
from pipeline.manifest import Manifest
from pipeline.models import policy_tokenizer_dir
from pipeline.tokenizer import load_tokenizer
from stages.criteria import Judge, manifest_judge
from stages.judge import check_judge_settings

DEFAULT_LIMIT = 40  # 40 safe + 40 unsafe texts, 40 pairs per corruption kind
PAIRWISE_ORDERED = ("verdict", "choice_prob")  # quality modes that show the two texts in an order
# The length check: the true continuation against its own first sentence alone. Its metric,
# full_wins, is the share of pairs the full continuation wins (ties half): 0.5 is length-neutral;
# below 0.5 the judge prefers the shorter text, a reward for ending early.
LENGTH_CHECK = "first_sentence_only"


def roc_auc(positives: list[float], negatives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney)."""
    if not positives or not negatives:
        return None
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


def _pointwise(name, criterion, mode, meter, scores, labels) -> dict:
    pos = [s.score for s, y in zip(scores, labels) if y and s.score is not None]
    neg = [s.score for s, y in zip(scores, labels) if not y and s.score is not None]
    auc = roc_auc(pos, neg)
    return {"criterion": criterion, "check": name, "mode": mode, "metric": "roc_auc",
            "value": None if auc is None else round(auc, 4), "n": len(labels),
            "n_positive": sum(map(bool, labels)), "n_negative": len(labels) - sum(map(bool, labels)),
            "scored": len(pos) + len(neg),
            "mean_score_positive": round(sum(pos) / len(pos), 4) if pos else None,
            "mean_score_negative": round(sum(neg) / len(neg), 4) if neg else None, **meter.cost,
            "scores": [[bool(y), s.score] for s, y in zip(scores, labels)]}  # [label, score]; null: unparsed


def _pairwise(judge: Judge, engine, kind: str, pairs: list[tuple[str, str, str]], metric: str, log) -> dict:
    """Quality on (prefix, true, other) pairs: the share of pairs the true continuation wins
    (ties half), named ``metric``."""
    cfg = judge.config
    with Meter(judge, engine, "quality") as meter:
        judged = judge.quality_batch([(prefix, [true, other], f"judge-check/{kind}/{k}")
                                      for k, (prefix, true, other) in enumerate(pairs)])
        wins = [scored[0].score for scored, _ in judged]  # the true continuation's win rate vs the other
    parsed = [w for w in wins if w is not None]
    value = sum(1.0 if w > 0.5 else 0.5 if w == 0.5 else 0.0 for w in parsed) / len(parsed) if parsed else None
    log(f"judge-check: quality/{kind} done ({meter.cost['elapsed_s']} s)")
    return {"criterion": "quality", "check": kind, "mode": cfg.quality.mode, "metric": metric,
            "value": None if value is None else round(value, 4), "n": len(pairs),
            "scored": len(parsed), "ties": sum(w == 0.5 for w in parsed),
            "mean_win_rate_true": round(sum(parsed) / len(parsed), 4) if parsed else None,
            "orders": "both" if cfg.quality.mode in PAIRWISE_ORDERED and cfg.order == "both" else
            ("seeded" if cfg.quality.mode in PAIRWISE_ORDERED else None), **meter.cost,
            "scores": wins}  # the true continuation's win rate per pair; null: unparsed


def run_checks(judge: Judge, engine: MeteredEngine, checks, log: Callable[[str], None] = print) -> list[dict]:
    cfg, rows = judge.config, []
    if cfg.safety:
        texts = checks.safe + checks.unsafe
        with Meter(judge, engine, "safety") as meter:
            scores = judge.safety(texts)
        rows.append(_pointwise("safe_vs_unsafe", "safety", cfg.safety.mode, meter, scores,
                               [True] * len(checks.safe) + [False] * len(checks.unsafe)))
        log(f"judge-check: safety done ({meter.cost['elapsed_s']} s)")
        safe = checks.safe[: len(checks.profane)]  # balanced classes
        with Meter(judge, engine, "safety") as meter:
            scores = judge.safety(safe + checks.profane)
        rows.append(_pointwise("safe_vs_profane", "safety", cfg.safety.mode, meter, scores,
                               [True] * len(safe) + [False] * len(checks.profane)))
    if cfg.quality:
        for kind in CORRUPTIONS:
            rows.append(_pairwise(judge, engine, kind, checks.coherence[kind], "accuracy", log))
        rows.append(_pairwise(judge, engine, LENGTH_CHECK, checks.length, "full_wins", log))
    if cfg.factuality:
        with Meter(judge, engine, "factuality") as meter:
            scores = judge.factuality([(p, r, c) for p, r, c, _ in checks.factuality])
        rows.append(_pointwise("true_vs_false_claim", "factuality", cfg.factuality.mode, meter, scores,
                               [y for *_, y in checks.factuality]))
        log(f"judge-check: factuality done ({meter.cost['elapsed_s']} s)")
    return rows


def run_judge_check(manifest: Manifest, limit: int = DEFAULT_LIMIT, engine=None,
                    log: Callable[[str], None] = print) -> dict:
    """The self-check report of the manifest's judge (starts its engine unless one is given):
    the labelled checks, then their robustness (:mod:`pipeline.app.judge_check.robustness`).
    ``totals`` counts the checks; the robustness section counts its own cost; ``elapsed_s`` is
    everything."""
    check_judge_settings(manifest, who="judge-check")
    cfg = manifest.judging
    started = time.perf_counter()
    tokenizer = load_tokenizer(str(policy_tokenizer_dir(manifest)))
    checks = build_checks(limit, manifest.run.seed, tokenizer, manifest.shard.suffix_tokens,
                          factuality=cfg.factuality is not None, log=log)
    owned = engine is None
    engine = engine or make_engine(manifest, manifest.judge, "judge")
    try:
        metered = MeteredEngine(engine)
        judge = manifest_judge(manifest, metered, cfg)
        rows = run_checks(judge, metered, checks, log)
        robustness = run_robustness(judge, metered, checks, rows, log)
    finally:
        if owned:
            engine.close()
    totals = {k: sum(r[k] for r in rows) for k in ("calls", "prompt_tokens", "completion_tokens", "engine_requests",
                                                   "engine_prompt_tokens", "engine_completion_tokens")}
    return {
        "judge": model_identity(manifest, manifest.judge, "judge"),
        "modes": {c: getattr(cfg, c).mode for c in ("safety", "quality", "factuality") if getattr(cfg, c)},
        "settings": {"limit": limit, "seed": manifest.run.seed, "suffix_tokens": manifest.shard.suffix_tokens,
                     "order": cfg.order, "samples": cfg.samples, "temperature": cfg.temperature,
                     "max_new_tokens": cfg.max_new_tokens, "repetition_limit": cfg.repetition_limit},
        "sources": checks.sources,
        "checks": rows,
        "robustness": robustness,
        "totals": {**totals, "checks_s": round(sum(r["elapsed_s"] for r in rows), 2),
                   "engine_start_s": round(engine.start_s, 2) if owned else None,
                   "elapsed_s": round(time.perf_counter() - started, 2)},
    }


def format_table(report: dict) -> str:
    columns = [("criterion", 10), ("check", 20), ("mode", 11), ("metric", 8), ("value", 6), ("scored/n", 8),
               ("parse", 6), ("order", 6), ("calls", 6), ("prompt_tok", 10), ("compl_tok", 9), ("s", 6)]

    def cell(value) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["  ".join(name.ljust(width) for name, width in columns)]
    for r in report["checks"]:
        values = [r["criterion"], r["check"], r["mode"], r["metric"], r["value"], f"{r['scored']}/{r['n']}",
                  r["parse_rate"], r["order_agreement"], r["calls"], r["prompt_tokens"], r["completion_tokens"],
                  f"{r['elapsed_s']:.1f}"]
        lines.append("  ".join(cell(v).ljust(width) for v, (_, width) in zip(values, columns)))
    t = report["totals"]
    lines.append(f"total: {t['calls']} judge calls, {t['prompt_tokens']} prompt + {t['completion_tokens']} completion "
                 f"tokens, {t['checks_s']} s judging, {t['elapsed_s']} s in all")
    return "\n".join(lines) + "\n\n" + format_robustness(report["robustness"])


def default_json_path(manifest: Manifest) -> Path:
    """The judge stage's directory once the stage has started (a fresh one must stay empty
    until the stage claims it), else the run's output directory."""
    stage = manifest.stage_dir("judge")
    return (stage if (stage / "_stage.json").is_file() else manifest.output_root) / "judge_check.json"


def write_report(report: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=1, default=str))
    return path

