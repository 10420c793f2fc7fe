"""A job that is not a datatrove pipeline (training): run in-process, or as one sbatch job on Slurm.

On Slurm the job is one allocation of ``nodes`` x ``ntasks_per_node`` tasks and a single
``srun`` step that starts the command once per task. That is the launch Lightning Fabric
expects: it reads ``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID`` and the node list, and
checks ``--ntasks-per-node`` against its ``devices`` (one task per GPU).

Layout (the filesystem is the API, as for the batch stages)::

    <directory>/_logs/
        manifest.yaml        the manifest the job runs (every --set applied, paths absolute)
        launch_script.slurm  the sbatch script
        slurm_jobs.json      {"<name>": job id}: a second submission while it is queued is refused
        slurm-<id>.out       the job's output (every task, prefixed with its rank)
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from pipeline.chain import JOBS_FILE, ChainMember
from pipeline.executor import wait_for_jobs
from pipeline.stage import StageFailed

MANIFEST_PLACEHOLDER = "{manifest}"


@dataclass
class SlurmResources:
    """One allocation: ``nodes`` x ``ntasks_per_node`` tasks, each with its CPUs and memory."""

    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    time: str = "04:00:00"
    partition: str | None = None
    qos: str | None = None
    extra: dict = field(default_factory=dict)  # more #SBATCH options (executor.slurm.sbatch_args)

    def sbatch_lines(self) -> list[str]:
        options: dict[str, object] = {
            "nodes": self.nodes,
            "ntasks-per-node": self.ntasks_per_node,
            "gpus-per-node": self.gpus_per_node or None,
            "cpus-per-task": self.cpus_per_task,
            "mem-per-cpu": f"{self.mem_per_cpu_gb}G",
            "time": self.time,
            "partition": self.partition,
            "qos": self.qos,
            **self.extra,
        }
        return [f"#SBATCH --{key}={value}" for key, value in options.items() if value not in (None, "")]


@dataclass
class CommandJob(ChainMember):
    """A chain member that runs ``work()`` in-process, or ``command`` under srun on Slurm.

    Attributes:
        name: the stage name (``executor.stages.<name>``, log lines).
        directory: the job's output directory; Slurm files go to ``directory/_logs``.
        command: argv run by every srun task; ``{manifest}`` becomes the frozen manifest's path.
        slurm: True when the manifest runs it on Slurm (``executor.stages.<name>.type``).
        manifest_data: the manifest to freeze for the job (``Manifest.absolute_data()``).
        work: runs the work here and returns its summary.
        summary: the summary if the work is already complete, else None (raises on a conflict).
        plan: a dry run's description of the work, or None when it cannot be known yet.
    """

    name: str
    directory: Path
    command: list[str]
    resources: SlurmResources
    job_name: str
    venv_activate: str
    slurm: bool
    manifest_data: dict
    work: Callable[[], dict]
    summary: Callable[[], dict | None]
    plan: Callable[[], str] | None = None
    _job_id: str | None = field(default=None, init=False, repr=False)
    _after: list[str] = field(default_factory=list, init=False, repr=False)

    @property
    def on_slurm(self) -> bool:
        return self.slurm

    def script(self, dependency: str | None = None) -> str:
        manifest = str(self.logs / "manifest.yaml")
        argv = " ".join(manifest if a == MANIFEST_PLACEHOLDER else shlex.quote(a) for a in self.command)
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name={self.job_name}",
            *self.resources.sbatch_lines(),
            f"#SBATCH --output={self.logs}/slurm-%j.out",
            "#SBATCH --open-mode=append",  # a requeued run adds to the same output file
            # Preempted or failed node: Slurm queues the job again and the command resumes
            # (the trainer continues from its latest checkpoint).
            "#SBATCH --requeue",
            *([f"#SBATCH --dependency={dependency}", "#SBATCH --kill-on-invalid-dep=yes"] if dependency else []),
            "set -euo pipefail",
            f"source {shlex.quote(self.venv_activate)}",
            "export PYTHONUNBUFFERED=1",
            # Torch would otherwise start one thread per core of the node in every task.
            'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
            # One srun step: one task per device, each running the command (Fabric reads SLURM_*).
            f"srun --kill-on-bad-exit=1 --label {argv}",
            "",
        ]
        return "\n".join(lines)

    def prepare(self, force: bool) -> None:
        if force and self.directory.exists():
            shutil.rmtree(self.directory)

    def done(self) -> dict | None:
        return self.summary()

    def describe(self, after: str | None) -> list[str]:
        lines = [f"{self.name}: one job on {'slurm' if self.slurm else 'local'} -> {self.directory}"]
        if self.plan is not None:
            lines.append(self.plan())
        if self.slurm:
            # The upstream job id exists only once it is submitted: show where it goes.
            lines.append(self.script(f"afterok:<{after} card job id>" if after else None))
        return lines

    def run_local(self) -> dict:
        return self.work()

    def submit(self, after: list[str]) -> str:
        """Write the manifest and script under ``_logs`` and sbatch it; returns the job id."""
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / "manifest.yaml").write_text(yaml.safe_dump(self.manifest_data, sort_keys=False))
        dependency = "afterok:" + ":".join(after) if after else None
        script = self.logs / "launch_script.slurm"
        script.write_text(self.script(dependency))
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
        if out.returncode != 0:
            raise StageFailed(f"{self.name}: sbatch refused {script}: {out.stderr.strip()}")
        self._job_id, self._after = out.stdout.strip().split(";")[0], list(after)
        (self.logs / JOBS_FILE).write_text(json.dumps({self.name: self._job_id}))
        return self._job_id

    def submitted_line(self) -> str:
        return (f"{self.name}: submitted Slurm job {self._job_id}" + (f" (afterok {self._after[0]})" if self._after
                else "") + f"; output in {self.logs}")

    def submitted_ids(self) -> list[str]:
        return [self._job_id]

    def wait(self) -> dict:
        wait_for_jobs([self._job_id])
        if (summary := self.summary()) is not None:
            return summary
        log = self.logs / f"slurm-{self._job_id}.out"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.is_file() else "(no output file)"
        raise StageFailed(f"{self.name}: Slurm job {self._job_id} ended without finishing; its output ({log}) ends "
                          f"with:\n{tail}")
