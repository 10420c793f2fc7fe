"""Training as a member of a stage chain: in-process, or one Slurm job that srun starts per device.

Resources come from the manifest: ``train.num_nodes`` nodes with ``train.devices`` srun tasks
each (Lightning Fabric checks both against ``SLURM_NNODES`` and ``--ntasks-per-node``);
``executor.slurm`` with the ``executor.stages.train`` overrides gives each task its CPUs,
memory and GPUs (``gpus_per_task``: 1 on GPU nodes, 0 on CPU), and the job its time limit.
"""

from __future__ import annotations

from typing import Callable

from pipeline.executor import default_venv
from pipeline.manifest import Manifest, ManifestError
from pipeline.slurm_job import CommandJob, SlurmResources
from trainer.plan import describe, finished_summary, plan_phases, require_train, train_view


def train_resources(manifest: Manifest) -> SlurmResources:
    """The allocation of the train job, with errors naming the key that cannot size it."""
    t, slurm = manifest.train, manifest.executor.for_stage("train").slurm
    if t.devices == "auto":
        raise ManifestError("train.devices: 'auto' cannot size a Slurm job; set the number of devices per node "
                            "(one srun task each)")
    if slurm.gpus_per_task > 1:
        raise ManifestError(f"executor.stages.train.gpus_per_task is {slurm.gpus_per_task}: the trainer runs one "
                            "process per GPU (train.devices per node); set it to 1 on GPU nodes or 0 on CPU")
    return SlurmResources(
        nodes=t.num_nodes, ntasks_per_node=t.devices, gpus_per_node=t.devices * slurm.gpus_per_task,
        cpus_per_task=slurm.cpus_per_task, mem_per_cpu_gb=slurm.mem_per_cpu_gb, time=slurm.time,
        partition=slurm.partition, qos=slurm.qos, extra=dict(slurm.sbatch_args),
    )


def train_job(manifest: Manifest, upstream_pending: bool = False, log: Callable[[str], None] = print) -> CommandJob:
    """The chain member that trains. ``upstream_pending``: an earlier stage of the same chain
    writes the tables, so they are not read (checked, described) before it has run."""
    require_train(manifest)
    executor = manifest.executor.for_stage("train")
    resources = train_resources(manifest) if executor.type == "slurm" else SlurmResources()  # refuses early
    out = manifest.stage_dir("train")
    view = train_view(manifest)
    if not upstream_pending:
        t = manifest.train
        world_size = t.devices * t.num_nodes if isinstance(t.devices, int) else 1
        plans = plan_phases(manifest, world_size)  # a missing or wrong table stops here, before anything is queued

    def work() -> dict:
        from trainer.loop import run_train  # torch and Fabric: only when training here

        return run_train(manifest, log=log)

    slurm = executor.slurm
    return CommandJob(
        name="train",
        directory=out,
        # --executor local: the job itself must train, not submit another job.
        command=["sip", "train", "-m", "{manifest}", "--executor", "local"],
        resources=resources,
        job_name=f"sip-{manifest.run.name}-train",
        venv_activate=str(manifest.resolve_path(slurm.venv)) if slurm.venv else default_venv(),
        slurm=executor.type == "slurm",
        manifest_data=manifest.absolute_data(),
        work=work,
        summary=lambda: finished_summary(out, view),
        plan=None if upstream_pending else (lambda: describe(manifest, plans)),
    )


def summary_line(summary: dict) -> str:
    hf = f"; HF directory {summary['hf']}" if summary.get("hf") else ""
    return (f"train: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['elapsed_s']} s; "
            f"checkpoint {summary['final']}{hf}")
