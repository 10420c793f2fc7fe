"""What a member of a chain is: the one interface :func:`pipeline.runner.run_chain` drives.

A chain runs its members in order, here or on Slurm, each ``afterok`` on the one before. Two
kinds of member exist: a batch stage (:class:`pipeline.runner.StageJob`, a datatrove task
array plus the job that writes its card) and a command (:class:`pipeline.slurm_job.CommandJob`,
training: one sbatch job). Both keep the ids of their last submission in
``<directory>/_logs/slurm_jobs.json``, so a second submission while they are queued is
refused the same way.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path

from pipeline.executor import queued_jobs
from pipeline.stage import StageConflict

JOBS_FILE = "slurm_jobs.json"  # {"<role>": Slurm job id or ids} of a member's last submission, in its _logs/


class ChainMember(abc.ABC):
    """One member of a chain (see the module docstring).

    Attributes:
        name: the stage name (``executor.stages.<name>``, log lines, the key of its card).
        directory: its output directory; Slurm files go to ``directory/_logs``.
    """

    name: str
    directory: Path

    @property
    def logs(self) -> Path:
        return self.directory / "_logs"

    @property
    @abc.abstractmethod
    def on_slurm(self) -> bool:
        """True when the manifest runs this member on Slurm (``executor.stages.<name>.type``)."""

    @abc.abstractmethod
    def prepare(self, force: bool) -> None:
        """Make its output directory ready; ``force`` deletes what an earlier run left.

        Raises:
            StageConflict: the directory was made with other settings (and not ``force``).
        """

    @abc.abstractmethod
    def done(self) -> dict | None:
        """Its card or summary when its work is complete, else None.

        Raises:
            StageConflict: complete, but made with other settings than planned now.
        """

    def preflight(self) -> list[str]:
        """Warnings to print before its work starts (a model whose context the longest pair does
        not fit, say); none by default."""
        return []

    @abc.abstractmethod
    def describe(self, after: str | None) -> list[str]:
        """A dry run's lines: what would run, where, and (on Slurm) the script; ``after`` is the
        name of the earlier member it would wait on, when that one is queued too."""

    @abc.abstractmethod
    def run_local(self) -> dict:
        """Run the work in this process; returns its card or summary.

        Raises:
            StageFailed: the work did not finish.
        """

    @abc.abstractmethod
    def submit(self, after: list[str]) -> str:
        """Queue the work on Slurm ``afterok`` on the job ids ``after``; record its job ids in
        ``_logs/slurm_jobs.json``. Returns the id of the job that ends it (what a later member
        depends on)."""

    @abc.abstractmethod
    def submitted_line(self) -> str:
        """One line saying what :meth:`submit` queued (job ids, where the logs go)."""

    @abc.abstractmethod
    def submitted_ids(self) -> list[str]:
        """The Slurm job ids :meth:`submit` queued (to cancel them when an earlier member fails)."""

    @abc.abstractmethod
    def wait(self) -> dict:
        """Wait for the submitted jobs; returns the card or summary.

        Raises:
            StageFailed: they ended without finishing the work.
        """

    def guard_queued(self) -> None:
        """Refuse to submit again while the jobs of the last submission are queued or running.

        Raises:
            StageConflict: naming the jobs still queued, and how to wait for or cancel them.
        """
        jobs_file = self.logs / JOBS_FILE
        if not jobs_file.is_file():
            return
        # {"tasks": [array ids] (or one id, as older runs wrote it), "card": id}
        recorded = [str(j) for v in json.loads(jobs_file.read_text()).values() for j in (v if isinstance(v, list) else [v])]
        if still := queued_jobs(recorded):
            them, are = ("them", "are") if len(recorded) > 1 else ("it", "is")
            raise StageConflict(
                f"{self.name}: Slurm job{'s' if len(recorded) > 1 else ''} {', '.join(still)} from an earlier "
                f"submission {are} still queued or running; wait for {them} (squeue -j {','.join(still)}) or cancel "
                f"{them} (scancel) before resubmitting"
            )
