"""Running a batch stage: resume guard, local or Slurm execution, waiting, and the card.

Every stage goes through :func:`run_stage`, so resume, dry runs, failure reporting and the
Slurm job chain behave the same everywhere:

- local: datatrove's LocalPipelineExecutor runs the tasks without a completion marker, then
  the card is written in-process;
- Slurm: the task array is submitted, plus a one-task job that writes the card ``afterok``;
  the job ids are kept in ``_logs/slurm_jobs.json`` so a second submission while they are
  still queued is refused instead of racing them.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from datatrove.pipeline.base import PipelineStep

from pipeline.executor import make_executor, sbatch_script, wait_for_jobs
from pipeline.manifest import Manifest
from pipeline.stage import StageConflict, StageDir, StageFailed

JOBS_FILE = "slurm_jobs.json"


class CardStep(PipelineStep):
    """One-task pipeline that writes a stage's card once all its tasks are done (Slurm)."""

    name = "card"
    type = "📝 - CARD"

    def __init__(self, finalize: Callable[[float | None], dict]):
        super().__init__()
        self.finalize = finalize

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        self.finalize(None)
        yield from ()


def _queued(job_ids: list[str]) -> list[str]:
    ids = ",".join(str(j) for j in job_ids)
    out = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i"], capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else []


def _missing(stage: StageDir) -> list[int]:
    return sorted(set(range(stage.tasks)) - stage.completed_ranks())


def run_stage(
    manifest: Manifest,
    stage: StageDir,
    pipeline: list,
    finalize: Callable[[float | None], dict],
    *,
    force: bool = False,
    dry_run: bool = False,
    wait: bool = True,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Run or resume ``stage``; returns its card once complete (None for dry runs / --no-wait).

    ``finalize(elapsed_s)`` writes the card; ``elapsed_s`` is given only when this call ran
    every task itself, so throughput in the card is never inflated by earlier partial runs.
    """
    ex = manifest.executor.for_stage(stage.stage)
    name = stage.stage
    if dry_run:
        log(f"{name}: {stage.tasks} tasks on {ex.type} -> {stage.path}")
        if ex.type == "slurm":
            # A throwaway logging dir: a dry run must leave no trace in the stage directory.
            with tempfile.TemporaryDirectory() as tmp:
                executor = make_executor(manifest, pipeline, stage=name, logging_dir=Path(tmp), tasks=stage.tasks)
                log(sbatch_script(executor))
        return None

    jobs_file = stage.logs / JOBS_FILE
    if not force and jobs_file.is_file():
        still = _queued(list(json.loads(jobs_file.read_text()).values()))
        if still:
            raise StageConflict(
                f"{name}: Slurm jobs {', '.join(still)} from an earlier submission are still queued or running; "
                f"wait for them (squeue -j {','.join(still)}) or cancel them (scancel) before resubmitting"
            )
    stage.prepare(force=force)
    if stage.is_complete() and (stage.path / "card.json").is_file():
        log(f"{name}: already complete ({stage.path}); nothing to do")
        return json.loads((stage.path / "card.json").read_text())

    fresh = not stage.completed_ranks()
    executor = make_executor(manifest, pipeline, stage=name, logging_dir=stage.logs, tasks=stage.tasks)
    if ex.type == "local":
        started = time.perf_counter()
        try:
            executor.run()
        except Exception as exc:  # datatrove re-raises a task's exception: report it as the stage's
            raise StageFailed(
                f"{name}: a task failed: {type(exc).__name__}: {exc}\n"
                f"Finished tasks are kept; fix the cause and re-run. Logs: {stage.logs}/logs"
            ) from exc
        if missing := _missing(stage):
            raise StageFailed(f"{name}: tasks {missing} did not finish; see {stage.logs}/logs")
        return finalize(time.perf_counter() - started if fresh else None)

    card_job = make_executor(
        manifest, [CardStep(finalize)], stage=name, logging_dir=stage.logs / "card", tasks=1,
        depends=executor, job_suffix="card",
    )
    card_job.run()
    jobs = {"tasks": str(executor.job_id), "card": str(card_job.job_id)}
    jobs_file.write_text(json.dumps(jobs))
    log(f"{name}: submitted Slurm jobs {jobs['tasks']} (tasks) and {jobs['card']} (card); logs in {stage.logs}")
    if not wait:
        return None
    wait_for_jobs([jobs["tasks"]])
    if missing := _missing(stage):
        # The card job waits afterok on the tasks; without kill_invalid_depend it would pend forever.
        subprocess.run(["scancel", jobs["card"]], capture_output=True)
        raise StageFailed(f"{name}: Slurm tasks {missing} did not finish; see {stage.logs}/slurm_logs")
    wait_for_jobs([jobs["card"]])
    card = stage.path / "card.json"
    if not card.is_file():
        raise StageFailed(f"{name}: the card job {jobs['card']} failed; see {stage.logs}/card/slurm_logs")
    return json.loads(card.read_text())
