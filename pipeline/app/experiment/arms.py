"""The manifests an experiment derives from its own: one per arm and seed, and one evaluation.

An experiment manifest is a run manifest whose ``train`` section gives the model, precision and
checkpointing every arm shares, and whose ``experiment.arms`` give each arm's phases. Layout
under ``run.output_dir``::

    shard/ rewrite/ rollout/ judge/ prefs/   the data stages, shared by every arm: same prefixes,
                                             same candidates, same preferences
    start/                                   a from-scratch experiment's shared starting weights
                                             (else every arm starts from train.model.init)
    arms/<arm>/seed-<seed>/                  one training run (laid out as train/ of a plain run)
    eval/                                    ``sip eval`` of the start and every run's final model
    experiment.md, experiment.json, plots/   the side-by-side report (:mod:`.report`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.manifest import Manifest, parse_manifest

START = "start"  # the eval checkpoint name of the shared starting model
ARMS_DIR = "arms"


@dataclass(frozen=True)
class ArmRun:
    """One training run of an experiment: an arm trained with one seed."""

    arm: str
    seed: int

    @property
    def name(self) -> str:
        """Its checkpoint name in the evaluation (``<arm>-s<seed>``)."""
        return f"{self.arm}-s{self.seed}"


def arm_runs(manifest: Manifest) -> list[ArmRun]:
    """Every (arm, seed) in the manifest's order: arms as listed, each arm's seeds as listed."""
    exp = manifest.experiment
    return [ArmRun(arm, seed) for arm in exp.arms for seed in exp.arm_seeds(arm)]


def run_dir(manifest: Manifest, run: ArmRun) -> Path:
    return manifest.output_root / ARMS_DIR / run.arm / f"seed-{run.seed}"


def shared_start_dir(manifest: Manifest) -> Path | None:
    """Where a from-scratch experiment keeps its one set of initial weights (None: every arm
    starts from ``train.model.init``'s checkpoint)."""
    return manifest.output_root / START if manifest.train.model.init == "scratch" else None


def baseline_partner(manifest: Manifest, run: ArmRun) -> ArmRun:
    """The baseline arm's run ``run`` is compared with: the same seed where the baseline arm
    trained with it, else the baseline arm's first seed."""
    exp = manifest.experiment
    seeds = exp.arm_seeds(exp.baseline)
    return ArmRun(exp.baseline, run.seed if run.seed in seeds else seeds[0])


def _data(manifest: Manifest) -> dict:
    """The manifest's settings as written (relative paths stay relative: the derived manifest
    resolves them against the same file, and the stages' fingerprints see the same values)."""
    return manifest.model_dump(mode="json")


def _derived(manifest: Manifest, data: dict) -> Manifest:
    data["experiment"] = None
    derived = parse_manifest(data, str(manifest.source or "<manifest>"))
    derived._source = manifest.source
    return derived


def _shared_train_section(manifest: Manifest, data: dict) -> dict:
    train = data["train"]
    if (start := shared_start_dir(manifest)) is not None:
        train["model"] = {"init": str(start), "config": None}
    return train


def arm_manifest(manifest: Manifest, run: ArmRun) -> Manifest:
    """The plain run manifest that trains ``run``: the arm's phases and seed, from the shared
    start, into :func:`run_dir`."""
    data = _data(manifest)
    train = _shared_train_section(manifest, data)
    train.update(phases=data["experiment"]["arms"][run.arm]["phases"], seed=run.seed,
                 output_dir=str(run_dir(manifest, run)))
    return _derived(manifest, data)


def eval_manifest(manifest: Manifest) -> Manifest:
    """The manifest ``sip eval`` runs on: the start and every run's final model; every run
    against the start (the baseline) and every run of a non-baseline arm against its
    :func:`baseline_partner`. The ``eval`` section's prompt settings are the experiment's."""
    runs = arm_runs(manifest)
    data = _data(manifest)
    train = _shared_train_section(manifest, data)
    # The evaluation trains nothing: its train section only says where the start is. Its own
    # train dir holds no metrics; the experiment's report plots every run's.
    train.update(phases=data["experiment"]["arms"][manifest.experiment.baseline]["phases"],
                 output_dir=str(manifest.output_root / ARMS_DIR))
    data["eval"].update(
        checkpoints={START: "start", **{r.name: str(run_dir(manifest, r) / "final") for r in runs}},
        baseline=START,
        versus={r.name: [baseline_partner(manifest, r).name] for r in runs if r.arm != manifest.experiment.baseline},
    )
    return _derived(manifest, data)
