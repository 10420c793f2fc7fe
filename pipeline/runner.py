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

A chain may also hold a :class:`~pipeline.slurm_job.CommandJob` (training): run in-process
locally, or one sbatch job ``afterok`` on the member before it on Slurm. Both kinds are
:class:`~pipeline.chain.ChainMember`; this module drives members only.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from datatrove.pipeline.base import PipelineStep

from pipeline.atomic import OutputNotWritable, refused_write, remove_leftovers_under
from pipeline.chain import JOBS_FILE, ChainMember
from pipeline.executor import make_executor, sbatch_script, wait_for_jobs
from pipeline.manifest import Manifest
from pipeline.stage import StageDir, StageFailed


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


@dataclass
class StageJob(ChainMember):
    """A planned batch stage as a chain member: its task array, then the job that writes its card."""

    stage: StageDir
    pipeline: list
    finalize: Callable[[float | None], dict]  # writes the card; gets elapsed_s when this run did all tasks
    estimate: Callable[[], str] | None = None  # a dry run's line on what the stage will cost
    # Its engines' fit (stages/fit.py): (only_problems) -> lines; all of them in a dry run, the
    # engines that do not fit before the work starts.
    fit: Callable[[bool], list[str]] | None = None
    _tasks_job: object = field(default=None, init=False, repr=False)  # the submitted executors (Slurm)
    _card_job: object = field(default=None, init=False, repr=False)
    _arrays: list[str] = field(default_factory=list, init=False, repr=False)  # the task array job ids

    @property
    def name(self) -> str:
        return self.stage.stage

    @property
    def directory(self) -> Path:
        return self.stage.path

    @property
    def manifest(self) -> Manifest:
        return self.stage.manifest

    @property
    def on_slurm(self) -> bool:
        return self.manifest.executor.for_stage(self.name).type == "slurm"

    def prepare(self, force: bool) -> None:
        self.stage.prepare(force=force)

    def done(self) -> dict | None:
        card = self.stage.path / "card.json"
        return json.loads(card.read_text()) if self.stage.is_complete() and card.is_file() else None

    def describe(self, after: str | None) -> list[str]:
        ex = self.manifest.executor.for_stage(self.name)
        lines = [f"{self.name}: {self.stage.tasks} tasks on {ex.type} -> {self.stage.path}"]
        if changes := self.stage.conflicts():  # what the run would refuse, said before it is tried
            lines.append(f"{self.name}: would be refused: {self.stage.path} was made with different settings ("
                         + "; ".join(changes) + "); --force starts it over")
        if self.estimate is not None:
            lines.append(self.estimate())
        if self.fit is not None:
            lines += [f"{self.name}: {line}" for line in self.fit(False)]
        if self.on_slurm:
            # A throwaway logging dir: a dry run must leave no trace in the stage directory.
            with tempfile.TemporaryDirectory() as tmp:
                executor = make_executor(self.manifest, self.pipeline, stage=self.name, logging_dir=Path(tmp),
                                         tasks=self.stage.tasks)
                lines.append(sbatch_script(executor))
        return lines

    def preflight(self) -> list[str]:
        return [f"{self.name}: warning: {line}" for line in self.fit(True)] if self.fit is not None else []

    def _missing(self) -> list[int]:
        return sorted(set(range(self.stage.tasks)) - self.stage.completed_ranks())

    def run_local(self) -> dict:
        stage = self.stage
        fresh = not stage.completed_ranks()
        executor = make_executor(self.manifest, self.pipeline, stage=self.name, logging_dir=stage.logs,
                                 tasks=stage.tasks)
        started = time.perf_counter()
        try:
            executor.run()
        except Exception as exc:  # datatrove re-raises a task's exception: report it as the stage's
            # Its pool is stopped: the temporaries the other tasks were writing are dead weight
            # (on a full disk, the space the re-run needs).
            remove_leftovers_under(stage.path)
            # A full or read-only disk may first hit datatrove's own logs: name the stage directory.
            chain = _chain(exc)
            refused = next((e for e in chain if isinstance(e, OutputNotWritable)), None) or next(
                (r for e in chain if (r := refused_write(e, stage.path)) is not None), None)
            if refused is not None:
                raise StageFailed(f"{self.name}: {refused}") from exc
            raise StageFailed(
                f"{self.name}: a task failed: {type(exc).__name__}: {exc}\n"
                f"Finished tasks are kept; fix the cause and re-run. Logs: {stage.logs}/logs"
            ) from exc
        if missing := self._missing():
            raise StageFailed(f"{self.name}: tasks {missing} did not finish; see {stage.logs}/logs")
        return self.finalize(time.perf_counter() - started if fresh else None)

    def submit(self, after: list[str]) -> str:
        stage = self.stage
        self._tasks_job = make_executor(self.manifest, self.pipeline, stage=self.name, logging_dir=stage.logs,
                                        tasks=stage.tasks, after=after)
        self._tasks_job.launch_job()
        arrays = list(self._tasks_job.array_job_ids)  # none when every task was complete
        # The card job waits on every array of the stage (one per MaxArraySize tasks), not the last.
        self._card_job = make_executor(self.manifest, [CardStep(self.finalize)], stage=self.name,
                                       logging_dir=stage.logs / "card", tasks=1, after=arrays or after,
                                       job_suffix="card", gpus=0)
        self._card_job.launch_job()
        self._arrays = arrays
        (stage.logs / JOBS_FILE).write_text(json.dumps({"tasks": arrays, "card": str(self._card_job.job_id)}))
        return str(self._card_job.job_id)

    def submitted_line(self) -> str:
        arrays = ", ".join(self._arrays) or "none"
        kind = f"tasks, {len(self._arrays)} arrays" if len(self._arrays) > 1 else "tasks"
        return (f"{self.name}: submitted Slurm jobs {arrays} ({kind}) and {self._card_job.job_id} (card); "
                f"logs in {self.stage.logs}")

    def submitted_ids(self) -> list[str]:
        return [*self._arrays, str(self._card_job.job_id)]

    def wait(self) -> dict:
        wait_for_jobs(self._arrays)
        if missing := self._missing():
            # The card job waits afterok on the tasks; without kill_invalid_depend it would pend forever.
            subprocess.run(["scancel", str(self._card_job.job_id)], capture_output=True)
            raise StageFailed(f"{self.name}: Slurm tasks {missing} did not finish; see {self.stage.logs}/slurm_logs")
        wait_for_jobs([str(self._card_job.job_id)])
        if (card := self.done()) is None:
            raise StageFailed(f"{self.name}: the card job {self._card_job.job_id} failed; see "
                              f"{self.stage.logs}/card/slurm_logs")
        return card


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, innermost last."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def run_chain(
    manifest: Manifest,
    jobs: list[ChainMember],
    *,
    force: bool = False,
    dry_run: bool = False,
    wait: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Run or resume the members of a chain in order; returns the cards (or summaries) of the
    complete ones, by name.

    Args:
        manifest: the run's manifest (each member carries what it needs of it).
        jobs: the members, in order: batch stages and commands (training).
        force: start every member over (deletes its outputs; skips the queued-jobs guard).
        dry_run: only log what would run, where, and the Slurm scripts.
        wait: wait for the Slurm jobs (else return once they are queued).
        log: where progress lines go.

    Members already complete are skipped. A member on Slurm is queued ``afterok`` on the member
    before it when that one was queued too; a member that runs here first waits for the ones
    queued before it.

    Raises:
        StageConflict: a member's outputs were made with other settings, or its last
            submission is still queued (checked for every member before anything runs).
        StageFailed: a member did not finish (later queued jobs are cancelled).
    """
    if dry_run:
        queued_before: str | None = None
        for member in jobs:
            for line in member.describe(queued_before):
                log(line)
            if member.on_slurm:
                queued_before = member.name
        return {}

    # Every check first: a conflict in a later member must not leave earlier ones submitted.
    for member in jobs:
        if member.on_slurm and not force:
            member.guard_queued()
    for member in jobs:
        member.prepare(force=force)
    finished = [member.done() for member in jobs]  # raises if outputs were made with other settings

    cards: dict[str, dict] = {}
    submitted: list[ChainMember] = []
    last_queued: tuple[ChainMember, str] | None = None  # the member the next queued one waits on, its job id
    for member, card in zip(jobs, finished):
        if card is not None:
            log(f"{member.name}: already complete ({member.directory}); nothing to do")
            cards[member.name] = card
            continue
        if not member.on_slurm:
            if last_queued is not None:  # a member that runs here after one queued there waits for it
                last_queued[0].wait()
                last_queued = None
            for line in member.preflight():  # after its upstreams ran: counted on their tables
                log(line)
            cards[member.name] = member.run_local()
            continue
        for line in member.preflight():
            log(line)
        job_id = member.submit([last_queued[1]] if last_queued is not None else [])
        log(member.submitted_line())
        submitted.append(member)
        last_queued = (member, job_id)
    if wait:
        for i, member in enumerate(submitted):
            try:
                cards[member.name] = member.wait()
            except StageFailed:
                # Later members wait afterok on this one: without kill_invalid_depend they would pend forever.
                later = [job_id for later_member in submitted[i + 1:] for job_id in later_member.submitted_ids()]
                if later:
                    subprocess.run(["scancel", *later], capture_output=True)
                raise
    return cards
