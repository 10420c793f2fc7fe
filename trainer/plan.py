"""What a training run will do: its phases, their tables, steps and tokens (``sip train --dry-run``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.manifest import OBJECTIVE_TABLES, Manifest, ManifestError, PhaseConfig, diff_views, fingerprinted_view
from pipeline.stage import StageConflict

if TYPE_CHECKING:
    from trainer.table_cache import CachedTable

# Written last by a finished run (summary and settings): its presence marks the run done.
TRAIN_SUMMARY_FILE = "train_summary.json"

# Settings that change how a run is laid out or reported, not what it computes: a resumed run
# may change them.
_RESUMABLE_CHANGES = ("train.checkpoint", "train.log_every", "train.export_hf", "train.devices", "train.num_nodes",
                      "train.strategy")


@dataclass
class PhasePlan:
    index: int
    config: PhaseConfig
    table: Path
    rows: int
    epoch_tokens: int
    world_size: int
    # Over every table the phase reads (its own; an online phase's offline_mix table too): the
    # smallest and largest token id, each with where it is ("<file>: row group <g>").
    token_ids: tuple[tuple[int, str], tuple[int, str]] = ((0, ""), (-1, ""))
    rows_table: CachedTable | None = None  # the phase's table, opened (trainer/table_cache.py)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def rows_per_micro_batch(self) -> int:
        """Rows of the phase's table one micro-batch reads (an online phase: its prefixes; the
        offline_mix rows come from another table)."""
        return self.config.batch_size - self.config.offline_rows_per_micro_batch

    @property
    def samples_per_step(self) -> int:
        """Rows of the phase's table consumed by one optimizer step across all devices (DPO: pairs)."""
        return self.rows_per_micro_batch * self.config.grad_accum * self.world_size

    @property
    def steps(self) -> int:
        if self.config.steps is not None:
            return self.config.steps
        return max(1, math.ceil(self.config.epochs * self.rows / self.samples_per_step))

    @property
    def tokens(self) -> int:
        """Approximate tokens processed (prefix included: the model reads it)."""
        return int(self.epoch_tokens * self.steps * self.samples_per_step / self.rows)


def _several_devices(manifest: Manifest) -> bool:
    from trainer.runtime import several_devices

    return several_devices(manifest)


def _default_table(manifest: Manifest, kind: str) -> Path:
    return {"pairs": manifest.stage_dir("shard"), "prefixes": manifest.stage_dir("shard"),
            "sft": manifest.stage_dir("prefs") / "sft", "preferences": manifest.stage_dir("prefs")}[kind]


def table_path(manifest: Manifest, phase: PhaseConfig) -> Path:
    if phase.table is not None:
        return manifest.resolve_path(phase.table)
    return _default_table(manifest, phase.table_kind)


def offline_table_path(manifest: Manifest, phase: PhaseConfig) -> Path:
    """The table an online phase's ``offline_mix`` rows come from (its kind: ``OBJECTIVE_TABLES``)."""
    if phase.online.offline_table is not None:
        return manifest.resolve_path(phase.online.offline_table)
    return _default_table(manifest, OBJECTIVE_TABLES[phase.objective])


def require_train(manifest: Manifest) -> None:
    if manifest.train is None:
        raise ManifestError(f"{manifest.source or 'manifest'}: no 'train' section; add one "
                            "(see README.md, 'Training') to run `sip train`")
    if manifest.experiment is not None:
        raise ManifestError(f"{manifest.source or 'manifest'}: its phases are the arms of its experiment section; "
                            "`sip experiment` trains each arm (or remove the experiment section and give train.phases)")


def plan_phases(manifest: Manifest, world_size: int = 1, log=None) -> list[PhasePlan]:
    """Every phase with its table's row count and token total (the tables are converted into
    the run's table cache the first time, :mod:`trainer.table_cache`; ``log`` says so)."""
    from trainer.table_cache import cache_dir
    from trainer.source import load_table

    require_train(manifest)
    plans = []
    for i, phase in enumerate(manifest.train.phases):
        tables = []
        if phase.source == "online":
            check_online_phase(manifest, phase, i)
            if phase.offline_rows_per_micro_batch:
                offline = offline_table_path(manifest, phase)
                tables.append((offline, load_table(offline, OBJECTIVE_TABLES[phase.objective],
                                                   f"train.phases[{i}].online.offline_table ({phase.name})",
                                                   cache_dir(manifest), log)))
        path = table_path(manifest, phase)
        table = load_table(path, phase.table_kind, f"train.phases[{i}].table ({phase.name})", cache_dir(manifest), log)
        tables.append((path, table))
        low = min(((t.stats.min_token_id, t.stats.min_token_at) for _, t in tables), key=lambda x: x[0])
        high = max(((t.stats.max_token_id, t.stats.max_token_at) for _, t in tables), key=lambda x: x[0])
        plans.append(PhasePlan(i, phase, path, table.num_rows, table.stats.tokens, world_size, (low, high), table))
    return plans


def check_token_ids(plans: list[PhasePlan], vocab_size: int) -> None:
    """Every token id of every phase's tables has an embedding: ``0 <= id < vocab_size`` (the
    model's ``padded_vocab_size``). Read from the table cache's stats, so nothing is scanned.

    Raises:
        ModelError: naming the table, the id and the vocabulary's range.
    """
    from trainer.model import ModelError

    for plan in plans:
        (low, low_at), (high, high_at) = plan.token_ids
        for bad, where in ([(high, high_at)] if high >= vocab_size else []) + ([(low, low_at)] if low < 0 else []):
            raise ModelError(f"train.phases[{plan.index}] ({plan.name}): {where}: token id {bad} is outside the "
                             f"model's vocabulary (0..{vocab_size - 1}): the table was made with another tokenizer "
                             "than the policy's, or the file is damaged")


def describe(manifest: Manifest, plans: list[PhasePlan]) -> str:
    t = manifest.train
    lines = [f"train: model init={t.model.init} config={t.model.config if t.model.init == 'scratch' else '(checkpoint)'}; "
             f"precision {t.precision}, devices {t.devices} x nodes {t.num_nodes}, strategy {t.strategy}, "
             f"seed {manifest.train_seed}, max_seq_len {t.max_seq_len}"]
    for p in plans:
        c = p.config
        extra = f", beta {c.beta}" if c.objective == "dpo" else ""
        if c.source == "online":
            o = c.online
            sampler = f"vLLM, weights pushed every {o.push_every} step(s)" if o.sampler == "vllm" else "trainer's module"
            extra += (f"; online: {o.rollouts} rollouts of {manifest.shard.suffix_tokens} tokens per prefix from the "
                      f"current weights ({sampler}; temperature {o.temperature}, top_p {o.top_p}), judged with the "
                      "original"
                      + (" and the rewrite" if o.rewrite and manifest.rewriter is not None else ""))
            if c.offline_rows_per_micro_batch:
                extra += (f"; {c.offline_rows_per_micro_batch} of {c.batch_size} rows per micro-batch from "
                          f"{offline_table_path(manifest, c)}")
        lines.append(f"  phase {p.index + 1}/{len(plans)} '{p.name}': {c.objective} on {p.table} ({p.rows} rows); "
                     f"{p.steps} steps x {p.samples_per_step} rows = {p.steps * p.samples_per_step / p.rows:.2f} "
                     f"epochs, ~{p.tokens:,} tokens; lr {c.lr} (warmup {c.warmup_steps}, cosine to "
                     f"{c.min_lr_ratio:g}x){extra}")
    lines.append(f"  checkpoints every {t.checkpoint.every} steps, keep {t.checkpoint.keep_last}, "
                 f"resume {t.checkpoint.resume}; outputs in {manifest.stage_dir('train')}")
    return "\n".join(lines)


def train_view(manifest: Manifest) -> dict:
    """The settings a checkpoint must share with the manifest to be resumed. With an online
    phase they include what decides its judgments (judge, judging, prefs, shard.suffix_tokens):
    a resumed phase must not mix two judges."""
    view = {k: v for k, v in fingerprinted_view(manifest, ("train",)).items()
            if not any(k == s or k.startswith(s + ".") for s in _RESUMABLE_CHANGES)}
    view["train.seed"] = manifest.train_seed
    if any(p.source == "online" for p in manifest.train.phases) and manifest.judge is not None:
        from pipeline.engines.factory import model_identity
        from stages.judge import judging_view

        view.update(judging_view(manifest))
        view.update(fingerprinted_view(manifest, ("prefs",)))
        view["judge.identity"] = model_identity(manifest, manifest.judge, "judge").get("weights_sha") or manifest.judge.model
    return view


def check_online_phase(manifest: Manifest, phase: PhaseConfig, index: int) -> None:
    """Refuse an online phase the manifest cannot run, before any phase trains (and in dry runs).

    Raises:
        ManifestError: no judge, a judge mode it cannot serve, no room for a prefix, or a
            strategy that shards the weights.
    """
    from stages.judge import check_judge_settings

    check_judge_settings(manifest, who=f"train.phases[{index}] ({phase.name}) is online")
    t, n = manifest.train, manifest.shard.suffix_tokens
    if t.max_seq_len <= n:
        raise ManifestError(f"train.max_seq_len ({t.max_seq_len}) leaves no room for a prefix before the N = {n} "
                            f"suffix tokens of online phase '{phase.name}'; raise it above {n}")
    if t.strategy == "fsdp" or (t.strategy == "auto" and _several_devices(manifest)):
        # Both samplers need the whole model on each rank (one decodes with it, one is pushed it).
        raise ManifestError(f"train.strategy: online phase '{phase.name}' samples its rollouts from the whole model "
                            "on every rank; set train.strategy: ddp (FSDP shards the weights)")
    if phase.online.sampler == "vllm" and phase.online.push_every > 1 and t.checkpoint.every % phase.online.push_every:
        # A resumed run pushes on the global-step grid from its checkpoint; off the grid it would
        # sample from other weights than the uninterrupted run did.
        raise ManifestError(f"train.phases[{index}].online.push_every ({phase.online.push_every}) must divide "
                            f"train.checkpoint.every ({t.checkpoint.every}) so a resumed run pushes the weights an "
                            "uninterrupted run pushed")
    if phase.online.sampler == "vllm":
        from pipeline.export import ExportError, check_llama_mapping
        from trainer.model import model_config

        try:
            check_llama_mapping(model_config(manifest), "train.model")
        except ExportError as exc:
            raise ManifestError(f"train.phases[{index}].online.sampler: vllm needs a policy vLLM can be handed; {exc}. "
                                "Set online.sampler: trainer to sample with the trainer's module") from None


def check_same_settings(out: Path, old: dict, new: dict) -> None:
    """Raise StageConflict naming every setting that differs between ``old`` (what ``out`` was
    trained with) and ``new`` (the settings planned now)."""
    if changes := diff_views(old, new):
        raise StageConflict(f"{out} was trained with different settings:\n  " + "\n  ".join(changes)
                            + "\nRe-run with --force to delete it and train again, or set run.output_dir elsewhere.")


def finished_summary(out: Path, view: dict) -> dict | None:
    """The summary of the finished run in ``out``, or None when none has finished there.

    Raises:
        StageConflict: the run in ``out`` was trained with other settings than ``view``.
    """
    summary_file = out / TRAIN_SUMMARY_FILE
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    check_same_settings(out, summary["view"], view)
    return summary
