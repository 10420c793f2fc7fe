"""The batch stages in pipeline order, their one-line summaries, and running several as one chain."""

from __future__ import annotations

from functools import partial
from typing import Callable

from pipeline.app.judge_check.self_check import finalize_with_self_check
from pipeline.manifest import Manifest, ManifestError
from pipeline.runner import StageJob, run_chain
from pipeline.chain import ChainMember
from stages import judge, prefs, rewrite, rollout, shard
from trainer import job as train


def judge_job(manifest: Manifest, upstream_pending: bool = False) -> StageJob:
    """The judge stage; with ``judging.self_check`` its card also gets the judge self-check,
    run wherever the card is written (in-process, or the card job on Slurm)."""
    job = judge.judge_job(manifest, upstream_pending)
    if manifest.judging.self_check:
        job.finalize = partial(finalize_with_self_check, job.finalize, job.stage)
    return job


# name -> builder(manifest, upstream_pending) ; in pipeline order
JOBS: dict[str, Callable[[Manifest, bool], StageJob]] = {
    "shard": shard.shard_job,
    "rewrite": rewrite.rewrite_job,
    "rollout": rollout.rollout_job,  # after rewrite, so `make judge` runs it; judge needs it when count > 0
    "judge": judge_job,
    "prefs": prefs.prefs_job,
}

# name -> the line `sip` prints for its card (the train job's summary for "train")
SUMMARY_LINES: dict[str, Callable[[dict], str]] = {
    "shard": shard.summary_line,
    "rewrite": rewrite.summary_line,
    "rollout": rollout.summary_line,
    "judge": judge.summary_line,
    "prefs": prefs.summary_line,
    "train": train.summary_line,
}


# The stage graph: the stages whose tables each stage reads, as each stage module states it.
UPSTREAMS: dict[str, tuple[str, ...]] = {module.STAGE: module.UPSTREAMS for module in (shard, rewrite, rollout, judge, prefs)}


def upstream_closure(name: str) -> list[str]:
    """Every stage ``name`` depends on, directly or not, in pipeline order."""
    found: set[str] = set()
    todo = list(UPSTREAMS[name])
    while todo:
        up = todo.pop()
        if up not in found:
            found.add(up)
            todo.extend(UPSTREAMS[up])
    return [n for n in JOBS if n in found]


def inactive(manifest: Manifest, name: str) -> str | None:
    """Why a stage has no work under this manifest (it is then skipped, not failed), or None."""
    if name == "rollout" and manifest.rollouts.count == 0:
        return "rollouts.count is 0 (no policy rollouts; judge uses the original and the rewrite)"
    return None


def run_stages(
    manifest: Manifest, names: list[str], *, force: bool = False, dry_run: bool = False, wait: bool = True,
    log: Callable[[str], None] = print, then: ChainMember | None = None,
) -> dict[str, dict]:
    """Run the named stages in pipeline order; ``then`` (training) ends the chain, after them.

    Returns:
        The cards of the complete stages (and ``then``'s summary), by name.

    Raises:
        ManifestError: an unknown stage name.
        StageFailed: a stage left out of ``names`` that a named one reads is not complete.
    """
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        raise ManifestError(f"--stages: unknown stage(s) {unknown}; stages in order: {', '.join(JOBS)}, train")
    ordered = []
    for name in (n for n in JOBS if n in names):
        if reason := inactive(manifest, name):
            log(f"{name}: {reason}; nothing to do")
        else:
            ordered.append(name)
    # A stage whose upstream is earlier in this chain is planned before that upstream has run;
    # an upstream outside the chain must already be complete, with the settings planned now.
    for name in ordered[1:]:
        for up in UPSTREAMS[name]:
            if up not in ordered and not inactive(manifest, up):
                JOBS[up](manifest, True).stage.check_upstream_of(name)
    jobs = [JOBS[name](manifest, i > 0) for i, name in enumerate(ordered)]
    return run_chain(manifest, jobs + ([then] if then is not None else []), force=force, dry_run=dry_run,
                     wait=wait, log=log)
