"""``sip eval``: the evaluation's two stages as one chain, then the report's headline table."""

from __future__ import annotations

import json
import shutil
from functools import partial
from typing import Callable

from pipeline.manifest import Manifest, ManifestError
from pipeline.runner import run_chain
from pipeline.stage import StageConflict
from stages import eval_generate, eval_judge
from stages.eval_report import REPORT_FILES, printed_table, write_report


def _estimate(manifest: Manifest, plan: eval_judge.JudgmentsPlan) -> str:
    calls = eval_judge.count_eval_judge_calls(manifest, plan.prompts)
    note = f" ({calls.pop('note')})" if "note" in calls else ""
    return (f"eval judge: at most {sum(calls.values()):,} judge calls ({', '.join(f'{k} {v}' for k, v in calls.items())})"
            f" for {len(plan.checkpoints)} checkpoints against {manifest.eval.baseline!r}{note}")


def run_eval(manifest: Manifest, *, force: bool = False, rejudge: bool = False, dry_run: bool = False,
             wait: bool = True, log: Callable[[str], None] = print) -> dict | None:
    """Generate, judge and report (each stage resumes; complete ones are skipped).

    ``rejudge`` deletes the judgments and the report first, keeping the generations (after a
    change of ``eval.baseline`` or of the judge); ``force`` starts both stages over.

    Returns:
        metrics.json's content, or None (a dry run, or Slurm jobs left queued with ``wait`` off).

    Raises:
        StageConflict: a stage's outputs were made with other settings (naming the keys and
            whether ``--rejudge`` is enough).
    """
    if manifest.experiment is not None:
        raise ManifestError(f"{manifest.source or 'manifest'}: an experiment manifest is evaluated by `sip "
                            "experiment` (it names every arm's checkpoints)")
    generations = eval_generate.generations_job(manifest)
    judgments = eval_judge.judgments_job(manifest, upstream_pending=True)
    plan = eval_judge.plan_eval_judgments(manifest, upstream_pending=True)
    judgments.estimate = partial(_estimate, manifest, plan)
    if note := eval_generate.plan_eval_generations(manifest).shortfall():
        log(note)
    out = manifest.output_root / "eval"
    if rejudge and not dry_run:
        for path in (judgments.directory, *(out / name for name in REPORT_FILES)):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    try:
        cards = run_chain(manifest, [generations, judgments], force=force, dry_run=dry_run, wait=wait, log=log)
    except StageConflict as exc:
        if str(judgments.directory) in str(exc) and not generations.stage.conflicts():
            raise StageConflict(f"{exc}\nOnly the judging changed: `sip eval --rejudge` judges again and keeps the "
                                "generations") from None
        raise
    if dry_run or judgments.name not in cards:
        return None
    log(eval_generate.summary_line(cards[generations.name]))
    log(eval_judge.summary_line(cards[judgments.name]))
    if not (out / "metrics.json").is_file():  # the judgments were complete, the report was removed
        plan = eval_judge.plan_eval_judgments(manifest)
        write_report(manifest, plan.generations_dir, plan.stage.path, plan.shard_dir, plan.tokenizer_dir)
    data = json.loads((out / "metrics.json").read_text())
    log(printed_table(data))
    log(f"eval: report {out / 'report.md'}; metrics {out / 'metrics.json'}; per prompt {out / 'prompts.parquet'}")
    return data
