"""Runs a stage's datatrove pipeline on the executor the manifest names (local or Slurm)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

from pipeline.manifest import Manifest
from pipeline.stage import StageFailed


class SipSlurmExecutor(SlurmPipelineExecutor):
    """datatrove's Slurm executor with unset options left out of the script, and every array
    job of a stage tracked.

    datatrove writes every sbatch key it has (``--partition=None`` when no partition is
    set) and asks for GPUs per job; sip jobs ask for ``--gpus-per-task`` and leave the
    partition to the cluster's default when the manifest names none.

    A stage with more tasks than the cluster's ``MaxArraySize`` is launched as several array
    jobs (datatrove's ``max_array_size``, set from the cluster). datatrove keeps only the last
    job's id; :attr:`array_job_ids` keeps them all, so what waits on the stage (its card job,
    ``sip run``'s wait, the next stage) waits on every array.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, job_id_retriever=self._record_job_id, **kwargs)
        self.array_job_ids: list[str] = []

    def _record_job_id(self, sbatch_output: str) -> str:
        job_id = sbatch_output.split()[-1]
        self.array_job_ids.append(job_id)
        return job_id

    def launch_merge_stats(self):
        arrays = list(self.array_job_ids)  # the merge job is not one of the stage's arrays
        gpus, self.gpus_per_task = self.gpus_per_task, 0  # merging stats needs no GPU
        last, self.job_id = self.job_id, ":".join(arrays)  # afterok on every array, not the last
        try:
            super().launch_merge_stats()
        finally:
            self.gpus_per_task, self.job_id, self.array_job_ids = gpus, last, arrays

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        args.pop("gpus", None)
        if self.gpus_per_task:
            args["gpus-per-task"] = self.gpus_per_task
        return {k: v for k, v in args.items() if v is not None and v != "None"}


@functools.lru_cache(maxsize=1)
def cluster_max_array_size() -> int:
    """The cluster's ``MaxArraySize`` (array indices run 0..MaxArraySize-1), from ``scontrol
    show config``; Slurm's default, 1001, when it cannot be read."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize" and value.strip().isdigit():
            return int(value.strip())
    return 1001


def default_venv() -> str:
    """The running interpreter's virtualenv activate script (what Slurm jobs must source)."""
    return str(Path(sys.prefix) / "bin" / "activate")


def make_executor(
    manifest: Manifest,
    pipeline: list,
    *,
    stage: str,
    logging_dir: Path,
    tasks: int,
    depends=None,
    after: list[str] = (),
    job_suffix: str = "",
    gpus: int | None = None,
):
    """The datatrove executor for ``stage``, with the manifest's per-stage overrides applied.

    On Slurm, ``depends`` (an executor, launched first if it is not yet) or ``after`` (job ids
    already queued) make the task array start only ``afterok`` on them.
    """
    ex = manifest.executor.for_stage(stage)
    if ex.type == "local":
        workers = min(tasks, ex.workers if ex.workers > 0 else os.cpu_count() or 1)
        return LocalPipelineExecutor(
            pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir), depends=depends,
            # Not fork: by the time a later stage of a chain starts, this process has run
            # polars/tokenizers thread pools, and a forked child inherits them broken (it hangs).
            # forkserver costs about a second of start-up per run.
            start_method="forkserver",
        )
    slurm = ex.slurm
    return SipSlurmExecutor(
        pipeline=pipeline,
        tasks=tasks,
        workers=ex.workers,
        time=slurm.time,
        partition=slurm.partition,
        cpus_per_task=slurm.cpus_per_task,
        mem_per_cpu_gb=slurm.mem_per_cpu_gb,
        gpus_per_task=slurm.gpus_per_task if gpus is None else gpus,
        job_name=f"sip-{manifest.run.name}-{stage}{'-' + job_suffix if job_suffix else ''}",
        qos=slurm.qos or "",
        venv_path=manifest.resolve_path(slurm.venv).as_posix() if slurm.venv else default_venv(),
        sbatch_args=dict(slurm.sbatch_args),
        logging_dir=str(logging_dir),
        slurm_logs_folder=str(logging_dir / "slurm_logs"),
        depends=depends,
        depends_job_id=":".join(str(j) for j in after if str(j) != "-1") or None,
        mail_type="",
        max_array_size=cluster_max_array_size(),
        # Several arrays run side by side (every id is tracked) unless workers caps the tasks at
        # once: each array applies the cap on its own, so capped arrays run one after another.
        max_array_launch_parallel=ex.workers == -1,
    )


def sbatch_script(executor: SipSlurmExecutor) -> str:
    """The array-job script a Slurm executor would submit (for --dry-run)."""
    ranks = executor.get_incomplete_ranks()
    script = executor.get_launch_file_contents(
        executor.get_sbatch_args(max(1, len(ranks))),
        f"srun -l -n {executor.nodes_per_task} launch_pickled_pipeline "
        f"{executor.logging_dir.resolve_paths('executor.pik')}",
    )
    return script


def queued_jobs(job_ids: list[str]) -> list[str]:
    """The ids among ``job_ids`` that Slurm still has queued or running (squeue: no slurmdbd
    needed). Ids Slurm no longer knows (ended long ago) count as not queued.

    Raises:
        StageFailed: squeue failed for another reason (the controller is down, say).
    """
    ids = ",".join(str(j) for j in job_ids if j not in (None, -1, "-1"))
    if not ids:
        return []
    out = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i"], capture_output=True, text=True)
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise StageFailed(f"squeue failed: {out.stderr.strip()}")
    return out.stdout.split() if out.returncode == 0 else []


def wait_for_jobs(job_ids: list[str], poll_s: float = 2.0) -> None:
    """Block until none of the Slurm jobs is queued or running (see :func:`queued_jobs`)."""
    while queued_jobs(job_ids):
        time.sleep(poll_s)
