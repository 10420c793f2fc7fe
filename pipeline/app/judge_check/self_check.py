"""``judging.self_check``: a small `sip judge-check` run when the judge stage finishes, merged
into the judgments card (``summary.self_check`` in ``card.json``, a table in ``README.md``)
and written in full to ``judge_check.json`` beside the table.

The judge stage does not know about it: whoever runs the stage wraps the stage's finalize with
:func:`finalize_with_self_check`, which runs in the card job on Slurm as well as in-process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.app.judge_check.checks import format_table, run_judge_check, write_report
from pipeline.cards import write_card
from pipeline.manifest import Manifest
from pipeline.stage import StageDir

SELF_CHECK_LIMIT = 8  # items per class: small enough to run once per judge stage
REPORT = "judge_check.json"


def self_check_for_card(manifest: Manifest, stage_path: Path) -> tuple[dict, str]:
    """Run the self-check with its own judge engine and write ``judge_check.json`` in ``stage_path``.

    Returns:
        The card's ``self_check`` summary entry (per check: mode, metric value, n, parse rate,
        order agreement; ``robustness``: the position-bias rate and, per criterion, the
        injection's mean score change, flip rate and lost scores; ``cost`` of it all and
        ``report``) and the README section with the tables.
    """
    report = run_judge_check(manifest, SELF_CHECK_LIMIT, log=lambda _m: None)
    write_report(report, stage_path / REPORT)
    entry = {f"{r['criterion']}/{r['check']}": {"mode": r["mode"], r["metric"]: r["value"], "n": r["n"],
                                                "parse_rate": r["parse_rate"], "order_agreement": r["order_agreement"]}
             for r in report["checks"]}
    robustness = report["robustness"]
    bias = robustness["position_bias"]
    entry["robustness"] = {
        "position_bias_rate": None if bias is None else bias["rate"],
        "injection": {c: {k: r[k] for k in ("mode", "compared", "mean_score_change", "flip_rate", "lost_score")}
                      for c, r in robustness["injection"].items()},
    }
    totals = report["totals"]
    entry["cost"] = {k: totals[k] + robustness["cost"][k] for k in ("calls", "prompt_tokens", "completion_tokens")}
    entry["cost"]["elapsed_s"] = totals["elapsed_s"]
    entry["report"] = REPORT
    notes = ("## Judge self-check\n\n"
             f"`sip judge-check` with {SELF_CHECK_LIMIT} items per class (full report: {REPORT}; "
             "README: how to read it).\n\n```\n" + format_table(report) + "\n```")
    return entry, notes


def finalize_with_self_check(finalize: Callable[[float | None], dict], stage: StageDir,
                             elapsed_s: float | None = None) -> dict:
    """The judge stage's ``finalize`` (writes its card), then the self-check merged into that card.

    Module-level so that ``functools.partial(finalize_with_self_check, finalize, stage)``
    pickles into the Slurm card job. The card is the stage's completion mark: if the self-check
    fails, the card is removed again, so the next run finalizes (and checks) again.

    Returns:
        The card as written (``summary.self_check`` set).
    """
    card = finalize(elapsed_s)
    try:
        entry, notes = self_check_for_card(stage.manifest, stage.path)
    except BaseException:
        (stage.path / "card.json").unlink(missing_ok=True)
        raise
    return write_card(stage, {**card["summary"], "self_check": entry}, notes)
