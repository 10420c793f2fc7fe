"""``sip experiment``: train several arms from one start on the same data, evaluate them side by side.

The manifest's ``experiment.arms`` name each arm's phases (``ntp``, ``sip-offline``,
``sip-online``, ...). One invocation runs, each step resuming and skipping what is complete:

1. the data stages (shard, rewrite, rollout, judge, prefs) once, shared by every arm;
2. a from-scratch experiment's shared starting weights (``start/``);
3. every arm with every seed (:mod:`.arms`), each a plain training run of its own;
4. ``sip eval`` of the start and every run's final model, every run against the start and
   against the baseline arm's run of the same seed;
5. the side-by-side report (:mod:`.report`).
"""

from __future__ import annotations

import json
import shutil
from typing import Callable

from pipeline.checkpoints import LIT_WEIGHTS_FILE
from pipeline.manifest import Manifest, ManifestError
from pipeline.runner import run_chain
from pipeline.stage import StageConflict
from pipeline.app.experiment.arms import ARMS_DIR, arm_manifest, arm_runs, eval_manifest, shared_start_dir
from pipeline.app.experiment.report import REPORT_FILES, printed_table, write_experiment_report

DATA_STAGES = ["shard", "rewrite", "rollout", "judge", "prefs"]


def require_experiment(manifest: Manifest) -> None:
    if manifest.experiment is None:
        raise ManifestError(f"{manifest.source or 'manifest'}: no 'experiment' section; add one (see README.md, "
                            "'Experiments') to run `sip experiment`")


def ensure_shared_start(manifest: Manifest, *, force: bool, log: Callable[[str], None]) -> None:
    """A from-scratch experiment's initial weights, made once (seeded with the train seed) so every
    arm starts from the same model.

    Raises:
        StageConflict: ``start/`` holds weights made with another model config or seed (without
            ``force``, which makes them again).
    """
    start = shared_start_dir(manifest)
    if start is None:
        return
    about = {"model": "train.model.init: scratch", "seed": manifest.train_seed, "global_step": 0,
             "config": manifest.train.model.config}
    if (start / LIT_WEIGHTS_FILE).is_file():
        made = json.loads((start / "train_state.json").read_text())
        if made == about:
            return
        if not force:
            raise StageConflict(f"{start} holds starting weights made with other settings ({made.get('config')}, "
                                f"seed {made.get('seed')}); every arm trained from them is stale too: use --force "
                                "to start the experiment over")
    from pipeline.atomic import remove_leftovers
    from pipeline.models import policy_tokenizer_dir
    from trainer.checkpoint import save_model
    from trainer.model import build_model, check_vocab, model_config

    remove_leftovers(start)
    config = model_config(manifest)
    tokenizer_dir = policy_tokenizer_dir(manifest)
    check_vocab(config, tokenizer_dir)
    model = build_model(config, manifest.train_seed, None)
    save_model(model.state_dict(), config, tokenizer_dir, start, about)
    log(f"experiment: shared starting weights ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, seed {manifest.train_seed}) -> {start}")


def redo(manifest: Manifest, names: list[str], log: Callable[[str], None]) -> None:
    """Delete the runs of the arms named (all their seeds) and the evaluation, whose checkpoints
    they change; ``eval`` alone deletes only the evaluation and the report.

    Raises:
        ManifestError: a name that is neither an arm nor ``eval``.
    """
    arms = manifest.experiment.arms
    if unknown := [n for n in names if n not in arms and n != "eval"]:
        raise ManifestError(f"--redo {', '.join(unknown)}: name an arm ({', '.join(arms)}) or eval")
    doomed = [manifest.output_root / ARMS_DIR / n for n in names if n in arms]
    doomed += [manifest.output_root / "eval", *(manifest.output_root / name for name in REPORT_FILES)]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
            log(f"experiment: removed {path}")
        elif path.exists():
            path.unlink()


def run_experiment(manifest: Manifest, *, force: bool = False, redo_names: list[str] = (), dry_run: bool = False,
                   log: Callable[[str], None] = print) -> dict | None:
    """Run or resume the whole experiment; returns experiment.json's content (None on a dry run).

    ``force`` starts every step over (the data stages, every run, the evaluation);
    ``redo_names`` trains the arms named again and evaluates again (:func:`redo`).

    Raises:
        ManifestError: the manifest has no experiment section.
        StageConflict: outputs made with other settings (naming them and how to start them over).
        StageFailed: a stage or run did not finish.
    """
    from pipeline.app.evaluate import run_eval
    from pipeline.app.registry import SUMMARY_LINES, run_stages
    from trainer.job import summary_line, train_job

    require_experiment(manifest)
    if redo_names and not dry_run:
        redo(manifest, list(redo_names), log)
    runs = arm_runs(manifest)
    log(f"experiment {manifest.run.name}: {len(manifest.experiment.arms)} arms, {len(runs)} runs "
        f"({', '.join(r.name for r in runs)}); baseline arm {manifest.experiment.baseline!r}")
    for name, card in run_stages(manifest, DATA_STAGES, force=force, dry_run=dry_run, log=log).items():
        log(SUMMARY_LINES[name](card))
    if not dry_run:
        ensure_shared_start(manifest, force=force, log=log)
    for i, run in enumerate(runs):
        arm = arm_manifest(manifest, run)
        log(f"experiment: run {i + 1}/{len(runs)} {run.name} -> {arm.stage_dir('train')}")
        try:
            done = run_chain(arm, [train_job(arm, upstream_pending=dry_run, log=log)], force=force, dry_run=dry_run,
                             log=log)
        except StageConflict as exc:
            raise StageConflict(f"{exc}\n`sip experiment --redo {run.arm}` trains arm {run.arm!r} again (every "
                                "seed) and evaluates again; --force starts the whole experiment over") from None
        if "train" in done:
            log(summary_line(done["train"]))
    evaluation = eval_manifest(manifest)
    if dry_run:
        log(f"experiment: then `sip eval` of {', '.join(evaluation.eval.checkpoints)} against 'start', and each "
            f"run of another arm against its {manifest.experiment.baseline!r} run; then experiment.md")
        return None
    if force:
        for name in REPORT_FILES:
            path = manifest.output_root / name
            if path.is_file():
                path.unlink()
    try:
        metrics = run_eval(evaluation, force=force, log=log)
    except StageConflict as exc:
        raise StageConflict(f"{exc}\n`sip experiment --redo eval` evaluates every run again") from None
    data = write_experiment_report(manifest, evaluation.output_root / "eval", metrics)
    log(printed_table(data))
    log(f"experiment: report {manifest.output_root / 'experiment.md'}; every number "
        f"{manifest.output_root / 'experiment.json'}")
    return data
