"""Running a batch stage: resume guard, local or Slurm execution, waiting, and the card.

Every stage goes through :func:`run_chain` (a chain of one or more stages), so resume, dry
runs, failure reporting and Slurm job chains behave the same everywhere:

- local: the stages run one after the other; datatrove's LocalPipelineExecutor runs the
  tasks without a completion marker, then the card is written in-process;
- Slurm: each stage's task array is submitted, plus a one-task job that writes its card
  ``afterok``; the next stage's array waits ``afterok`` on that card job, so
  ``sip run --stages shard,rewrite`` queues the whole chain at once. Job ids are kept in
  ``_logs/slurm_jobs.json`` so a second submission while they are still queued is refused
  instead of racing them.

A chain may end with a :class:`~pipeline.slurm_job.CommandJob` (training): run in-process
locally, or one sbatch job ``afterok`` on the last stage's card job on Slurm.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from dataclasses import dataclass

from datatrove.pipeline.base import PipelineStep

from pipeline.executor import make_executor, sbatch_script, wait_for_jobs
from pipeline.manifest import Manifest
from pipeline.slurm_job import CommandJob
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


@dataclass
class StageJob:
    """What :func:`run_chain` needs of a planned stage."""

    stage: StageDir
    pipeline: list
    finalize: Callable[[float | None], dict]  # writes the card; gets elapsed_s when this run did all tasks
    estimate: Callable[[], str] | None = None  # a dry run's line on what the stage will cost


def _guard_queued(stage: StageDir) -> None:
    jobs_file = stage.logs / JOBS_FILE
    if jobs_file.is_file():
        still = _queued(list(json.loads(jobs_file.read_text()).values()))
        if still:
            raise StageConflict(
                f"{stage.stage}: Slurm jobs {', '.join(still)} from an earlier submission are still queued or "
                f"running; wait for them (squeue -j {','.join(still)}) or cancel them (scancel) before resubmitting"
            )


def _done(stage: StageDir) -> dict | None:
    card = stage.path / "card.json"
    return json.loads(card.read_text()) if stage.is_complete() and card.is_file() else None


def _run_local(manifest: Manifest, job: StageJob) -> dict:
    stage = job.stage
    fresh = not stage.completed_ranks()
    executor = make_executor(manifest, job.pipeline, stage=stage.stage, logging_dir=stage.logs, tasks=stage.tasks)
    started = time.perf_counter()
    try:
        executor.run()
    except Exception as exc:  # datatrove re-raises a task's exception: report it as the stage's
        raise StageFailed(
            f"{stage.stage}: a task failed: {type(exc).__name__}: {exc}\n"
            f"Finished tasks are kept; fix the cause and re-run. Logs: {stage.logs}/logs"
        ) from exc
    if missing := _missing(stage):
        raise StageFailed(f"{stage.stage}: tasks {missing} did not finish; see {stage.logs}/logs")
    return job.finalize(time.perf_counter() - started if fresh else None)


def _submit(manifest: Manifest, job: StageJob, depends) -> tuple[object, object]:
    stage = job.stage
    executor = make_executor(manifest, job.pipeline, stage=stage.stage, logging_dir=stage.logs, tasks=stage.tasks,
                             depends=depends)
    card_job = make_executor(manifest, [CardStep(job.finalize)], stage=stage.stage, logging_dir=stage.logs / "card",
                             tasks=1, depends=executor, job_suffix="card", gpus=0)
    card_job.run()  # launches the task array first (its dependency), then itself
    (stage.logs / JOBS_FILE).write_text(json.dumps({"tasks": str(executor.job_id), "card": str(card_job.job_id)}))
    return executor, card_job


def _wait_slurm(job: StageJob, executor, card_job) -> dict:
    stage = job.stage
    wait_for_jobs([str(executor.job_id)])
    if missing := _missing(stage):
        # The card job waits afterok on the tasks; without kill_invalid_depend it would pend forever.
        subprocess.run(["scancel", str(card_job.job_id)], capture_output=True)
        raise StageFailed(f"{stage.stage}: Slurm tasks {missing} did not finish; see {stage.logs}/slurm_logs")
    wait_for_jobs([str(card_job.job_id)])
    if (card := _done(stage)) is None:
        raise StageFailed(f"{stage.stage}: the card job {card_job.job_id} failed; see {stage.logs}/card/slurm_logs")
    return card


def _dry_run_command(manifest: Manifest, job: CommandJob, after: str | None, log: Callable[[str], None]) -> None:
    ex = manifest.executor.for_stage(job.name)
    log(f"{job.name}: one job on {ex.type} -> {job.directory}")
    if job.plan is not None:
        log(job.plan())
    if ex.type == "slurm":
        # The upstream job id exists only once it is submitted: show where it goes.
        log(job.script(f"afterok:<{after} card job id>" if after else None))


def _run_command(manifest: Manifest, job: CommandJob, submitted: list, log: Callable[[str], None]) -> dict | None:
    """Run a command job here, or submit it after the last submitted stage; returns its summary
    when it ran here, or None when it was queued (``submitted`` gets it)."""
    if manifest.executor.for_stage(job.name).type != "slurm":
        if submitted:  # it runs here, after jobs that run there
            _wait_slurm(*submitted[-1])
        return job.run_local()
    after = [str(submitted[-1][2].job_id)] if submitted else []
    job_id = job.submit(after)
    log(f"{job.name}: submitted Slurm job {job_id}" + (f" (afterok {after[0]})" if after else "")
        + f"; output in {job.logs}")
    submitted.append((job, job_id, None))
    return None


def run_chain(
    manifest: Manifest,
    jobs: list[StageJob | CommandJob],
    *,
    force: bool = False,
    dry_run: bool = False,
    wait: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Run or resume stages in order; returns the cards of the complete ones (by stage name).

    ``force`` applies to every stage in the chain. Stages already complete are skipped. A
    :class:`CommandJob` can only end the chain (nothing here makes a datatrove job wait on it).
    """
    if any(isinstance(job, CommandJob) for job in jobs[:-1]):
        raise ValueError("a CommandJob can only be the last member of a chain")
    if dry_run:
        for i, job in enumerate(jobs):
            if isinstance(job, CommandJob):
                queued = [j.stage.stage for j in jobs[:i] if manifest.executor.for_stage(j.stage.stage).type == "slurm"]
                _dry_run_command(manifest, job, queued[-1] if queued else None, log)
                continue
            ex = manifest.executor.for_stage(job.stage.stage)
            log(f"{job.stage.stage}: {job.stage.tasks} tasks on {ex.type} -> {job.stage.path}")
            if job.estimate is not None:
                log(job.estimate())
            if ex.type == "slurm":
                # A throwaway logging dir: a dry run must leave no trace in the stage directory.
                with tempfile.TemporaryDirectory() as tmp:
                    executor = make_executor(manifest, job.pipeline, stage=job.stage.stage, logging_dir=Path(tmp),
                                             tasks=job.stage.tasks)
                    log(sbatch_script(executor))
        return {}

    cards: dict[str, dict] = {}
    submitted = []
    depends = None
    # Every check first: a conflict in a later stage must not leave earlier stages submitted.
    command = jobs[-1] if jobs and isinstance(jobs[-1], CommandJob) else None
    stage_jobs = jobs[:-1] if command is not None else jobs
    for job in stage_jobs:
        if manifest.executor.for_stage(job.stage.stage).type == "slurm" and not force:
            _guard_queued(job.stage)
    if command is not None and manifest.executor.for_stage(command.name).type == "slurm" and not force:
        command.guard_queued()
    for job in stage_jobs:
        job.stage.prepare(force=force)
    command_done = None
    if command is not None:
        command.prepare(force=force)
        command_done = command.done()  # raises if its outputs were made with other settings
    for job in stage_jobs:
        stage = job.stage
        slurm = manifest.executor.for_stage(stage.stage).type == "slurm"
        if (card := _done(stage)) is not None:
            log(f"{stage.stage}: already complete ({stage.path}); nothing to do")
            cards[stage.stage] = card
            continue
        if not slurm:
            if depends is not None:  # a local stage after a submitted one must wait for it
                _wait_slurm(*submitted[-1])
                depends = None
            cards[stage.stage] = _run_local(manifest, job)
            continue
        executor, card_job = _submit(manifest, job, depends)
        log(f"{stage.stage}: submitted Slurm jobs {executor.job_id} (tasks) and {card_job.job_id} (card); "
            f"logs in {stage.logs}")
        submitted.append((job, executor, card_job))
        depends = card_job
    if command is not None:
        if (summary := command_done) is not None:
            log(f"{command.name}: already complete ({command.directory}); nothing to do")
            cards[command.name] = summary
        elif (summary := _run_command(manifest, command, submitted, log)) is not None:
            cards[command.name] = summary
    if wait:
        for i, (job, executor, card_job) in enumerate(submitted):
            try:
                if isinstance(job, CommandJob):
                    cards[job.name] = job.wait(executor)  # executor: the job id
                else:
                    cards[job.stage.stage] = _wait_slurm(job, executor, card_job)
            except StageFailed:
                # Later stages wait afterok on this one: without kill_invalid_depend they would pend forever.
                later = [str(j) for later_job, ex, card in submitted[i + 1:]
                         for j in ((ex,) if isinstance(later_job, CommandJob) else (ex.job_id, card.job_id))]
                if later:
                    subprocess.run(["scancel", *later], capture_output=True)
                raise
    return cards
