"""The offline training loop: the manifest's phases (ntp, rf_nll, dpo) over the precomputed tables.

``run_train(manifest)`` is the entry point of ``sip train`` (and of Slurm jobs and benchmarks).
The loop state (phase, step in phase, data position, tokens, the DPO reference's hash and
fingerprint keys) is saved in every checkpoint with the model, optimizer, scheduler and RNG states, so a resumed
run continues exactly where the checkpoint was taken: same rows, same learning rates, same
losses as a run that was never interrupted.

Outputs under ``manifest.stage_dir("train")``: ``checkpoints/step-N/`` (the last k),
``metrics/version_n/metrics.csv``, ``ref_logps/<fingerprint>/`` (DPO reference log-probs,
trainer/ref_logps.py), ``phases/<name>/`` (each phase's final model, kept whatever
``keep_last`` prunes), ``start/`` (the initial weights of a from-scratch model), ``final/`` (the
last checkpoint), ``hf/`` (its Hugging Face export) and ``train_summary.json``. ``sip eval``
evaluates ``start``, ``phases/<name>`` and ``final`` by those names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.atomic import remove_leftovers, write_text_atomic
from pipeline.checkpoints import FINAL_DIR, PHASES_DIR, START_DIR
from pipeline.io import table_files
from pipeline.manifest import Manifest, diff_views, fingerprint
from pipeline.stage import StageConflict
from trainer import checkpoint as ckpt
from trainer.metrics import Window, available_flops, format_duration, make_loggers, peak_memory_gb
from trainer.model import model_config, state_sha
from trainer.online import OnlinePhase, logprob_gap, online_rewrites
from trainer.plan import (TRAIN_SUMMARY_FILE, PhasePlan, check_same_settings, check_token_ids, describe,
                          finished_summary, plan_phases, require_train, train_view)
from trainer.ref_logps import (REF_DIR, ReferenceMismatch, check_unique_pairs, compute_reference, differences,
                               fingerprint_of, join_reference, reference_keys, reference_root, stored_sets, write_set)
from trainer.runtime import PAD_ID, full_model_state, make_fabric, setup_policy
from trainer.schedule import warmup_cosine
from trainer.source import TableSource
from trainer.steps import MicroBatch, dpo_step, nll_step


def run_train(manifest: Manifest, *, force: bool = False, dry_run: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Train the policy through the manifest's phases; returns the run summary.

    Resumes from the latest checkpoint (``train.checkpoint.resume: auto``); a finished run
    returns its summary without training again; ``force`` deletes the outputs first, except the
    stored reference log-probs (keyed by everything that changes them, they cannot be stale).
    """
    require_train(manifest)
    out = manifest.stage_dir("train")
    view = train_view(manifest)
    if not dry_run and not force and (summary := finished_summary(out, view)) is not None:
        log(f"train: already complete ({out}); --force trains again")
        return summary
    # The tables and the model are checked before anything is deleted: a refused run leaves
    # every output as it was, --force included.
    plans = plan_phases(manifest, log=log)
    check_token_ids(plans, model_config(manifest).padded_vocab_size)
    if dry_run:
        log(describe(manifest, plans))
        return {"dry_run": True}
    if force and out.exists():
        for path in out.iterdir():
            if path.name != REF_DIR:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if manifest.train.checkpoint.resume == "never" and ckpt.list_checkpoints(out / "checkpoints"):
        raise StageConflict(f"{out / 'checkpoints'} holds checkpoints and train.checkpoint.resume is never; "
                            "use --force to delete them and start over")
    fabric = make_fabric(manifest, make_loggers(out))
    fabric.launch()
    return _Trainer(manifest, fabric, out, view, log).run(plans)


class _Trainer:
    def __init__(self, manifest: Manifest, fabric, out: Path, view: dict, log: Callable[[str], None]):
        self.m, self.fabric, self.out, self.view = manifest, fabric, out, view
        self.log = log if fabric.global_rank == 0 else (lambda _msg: None)
        self.t = manifest.train
        self.root = out / "checkpoints"
        self.online_summary: dict[str, dict] = {}  # per online phase: judge calls made, micro-batches replayed

    def run(self, plans: list[PhasePlan]) -> dict:
        """Train through ``plans`` (:func:`trainer.plan.plan_phases`, planned before launching:
        the steps are recounted here for the launched world size)."""
        fabric, started = self.fabric, time.perf_counter()
        self.plans = plans = [dataclasses.replace(p, world_size=fabric.world_size) for p in plans]
        if fabric.global_rank == 0:
            # Unfinished saves of a killed run: checkpoints, final/, hf/, the summary.
            for stale in remove_leftovers(self.root / f"{ckpt.CHECKPOINT_PREFIX}*") + remove_leftovers(self.out / "*") \
                    + remove_leftovers(self.out / PHASES_DIR / "*"):
                self.log(f"train: removed an unfinished save {stale}")
        resume = ckpt.latest_checkpoint(self.root) if self.t.checkpoint.resume == "auto" else None
        fabric.seed_everything(self.m.train_seed)
        self.policy = setup_policy(fabric, self.m, load_init=resume is None)
        if resume is None and self.t.model.init == "scratch":
            # The starting point of an evaluation: random weights exist nowhere else. Every rank
            # gathers (a collective under FSDP), rank 0 writes.
            state = full_model_state(fabric, self.policy.model)
            if fabric.global_rank == 0:
                ckpt.save_model(state, self.policy.config, self.policy.tokenizer_dir, self.out / START_DIR,
                                {"model": "train.model.init: scratch", "seed": self.m.train_seed, "global_step": 0})
            fabric.barrier()
        for plan in plans:  # an online phase's upstream tables, checked before any phase trains
            if plan.config.source == "online":
                online_rewrites(self.m, plan.config)
        self.state = {"phase_index": 0, "phase": plans[0].name, "phase_step": 0, "global_step": 0, "samples": 0,
                      "tokens": 0, "ref_sha": None, "ref_keys": None, "view": self.view}
        saved = None
        if resume is not None:
            model_state, saved = ckpt.load_checkpoint(resume)
            check_same_settings(resume, saved["loop"]["view"], self.view)
            ckpt.load_model_state(fabric, self.policy.model, model_state)
            self.state = saved["loop"]
            ckpt.restore_rng(saved["rng"])
            self.log(f"train: resumed from {resume} (phase '{self.state['phase']}', step {self.state['phase_step']})")
        self.log(describe(self.m, plans) + f"\n  model: {self.policy.params / 1e6:.2f}M parameters on {fabric.device}")
        last = {}
        for plan in plans[self.state["phase_index"]:]:
            if plan.index > self.state["phase_index"]:
                self.state.update(phase_index=plan.index, phase=plan.name, phase_step=0, samples=0, ref_sha=None,
                                  ref_keys=None)
            if self.state["phase_step"] < plan.steps:
                last[plan.name] = self._phase(plan, saved if self.state["phase_step"] > 0 else None)
            saved = None
        final = self.out / FINAL_DIR
        if fabric.global_rank == 0:
            ckpt.publish_final(ckpt.latest_checkpoint(self.root), final)
        fabric.barrier()
        summary = {"final": str(final), "metrics": str(self.out / "metrics"), "steps": self.state["global_step"],
                   "tokens": self.state["tokens"], "elapsed_s": round(time.perf_counter() - started, 2),
                   "last_logged": last, "view": self.view}
        if self.online_summary:
            summary["online"] = self.online_summary
        if self.t.export_hf and fabric.global_rank == 0:
            summary["hf"] = str(export_final_hf(final, self.out / "hf", self.policy.tokenizer_dir))
        if fabric.global_rank == 0:
            # The summary marks the run done: it appears whole or not at all.
            write_text_atomic(self.out / TRAIN_SUMMARY_FILE, json.dumps(summary, indent=1, sort_keys=True) + "\n")
            self.log(f"train: done in {format_duration(summary['elapsed_s'])}; checkpoint {final}; "
                     f"metrics {self.out / 'metrics'}" + (f"; HF {summary['hf']}" if "hf" in summary else ""))
        return summary

    def _phase(self, plan: PhasePlan, saved: dict | None) -> dict:
        fabric, c, model = self.fabric, plan.config, self.policy.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
        optimizer = fabric.setup_optimizers(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer.optimizer, warmup_cosine(c.warmup_steps, plan.steps, c.min_lr_ratio))
        if saved is not None:  # resumed inside this phase
            ckpt.load_optimizer_state(fabric, model, optimizer, saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        table = plan.rows_table
        source = TableSource(table, c.table_kind, self.m.train_seed + plan.index, self.t.max_seq_len)
        online, ref = None, None
        if c.source == "online":
            online = OnlinePhase(self.m, plan, self.out, self.policy, fabric, self.log)
            if c.objective == "dpo":
                self.state["ref_sha"] = online.setup_reference(self.state["ref_sha"])
        elif c.objective == "dpo":
            ref = self._reference(plan, source)
        self.log(f"train: phase {plan.index + 1} '{plan.name}' ({c.source} {c.objective}) from step "
                 f"{self.state['phase_step']} of {plan.steps}")
        window, peak_flops, logged = Window(), available_flops(fabric.device, self.t.precision), {}
        phase_started, first_step = time.perf_counter(), self.state["phase_step"]
        micro_batch = self._micro_batches(plan, source, ref, online)
        while self.state["phase_step"] < plan.steps:
            loss, stats = self._step(plan, micro_batch, model)
            if c.grad_clip is not None:
                fabric.clip_gradients(model, optimizer, max_norm=c.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            self.state["phase_step"] += 1
            self.state["global_step"] += 1
            self.state["samples"] += plan.samples_per_step
            self.state["tokens"] += sum(s["tokens"] for s in stats) * fabric.world_size
            window.add(loss, stats)
            step, done = self.state["phase_step"], self.state["phase_step"] == plan.steps
            if step % self.t.log_every == 0 or done:
                logged = {"loss": loss, "lr": lr, "phase_index": plan.index, "phase_step": step,
                          **window.metrics(fabric.world_size, self.policy.params, peak_flops),
                          "peak_mem_gb": peak_memory_gb(fabric.device)}
                fabric.log_dict(logged, step=self.state["global_step"])
                self._progress(plan, logged, (time.perf_counter() - phase_started) / (step - first_step))
                window.reset()
            if done:  # before the checkpoint: a kill in between redoes the last step and this
                self._publish_phase(plan)
            if self.state["global_step"] % self.t.checkpoint.every == 0 or done:
                self._save(optimizer, scheduler)
        if online is not None:
            self.online_summary[plan.name] = online.summary()
            online.close()
        return {k: round(v, 6) for k, v in logged.items()}

    def _step(self, plan: PhasePlan, micro_batch: Callable[[int, int], MicroBatch], model) -> tuple[float, list[dict]]:
        """Forward and backward of ``grad_accum`` micro-batches; returns the mean loss over ranks.

        ``micro_batch(micro, start)`` gives micro-batch ``micro``, whose rows are the phase's
        samples ``start ..``: read from a table, or sampled, judged and picked online.
        """
        fabric, c = self.fabric, plan.config
        losses, stats = [], []
        for micro in range(c.grad_accum):
            start = self.state["samples"] + (micro * fabric.world_size + fabric.global_rank) * \
                plan.rows_per_micro_batch
            batch = micro_batch(micro, start)
            started = time.perf_counter()
            with fabric.no_backward_sync(model, enabled=micro < c.grad_accum - 1):
                if not batch.examples:  # online: every prefix tied or had one candidate
                    # A zero loss through the model keeps the ranks' gradient syncs in step.
                    loss = model(torch.zeros((1, 1), dtype=torch.long, device=fabric.device)).sum() * 0.0
                    s = {"tokens": 0, "target_tokens": 0, "sources": {}}
                elif c.objective == "dpo":
                    loss, s = dpo_step(model, batch.examples, batch.ref, c.beta, PAD_ID, self.t.max_seq_len,
                                       fabric.device)
                else:
                    loss, s = nll_step(model, batch.examples, PAD_ID, self.t.max_seq_len, fabric.device)
                fabric.backward(loss / c.grad_accum)
            if batch.examples:
                losses.append(loss.detach())
            if batch.stats is not None:
                s["online"] = {**batch.stats, "train_s": time.perf_counter() - started,
                               **logprob_gap(batch.examples, s.get("seq_logps", []), c.objective)}
            stats.append(s)
        mean = torch.stack(losses).mean() if losses else torch.zeros((), device=fabric.device)
        if fabric.world_size > 1:
            mean = fabric.all_reduce(mean, reduce_op="mean")
        value = float(mean)
        if not math.isfinite(value):
            raise FloatingPointError(f"phase '{plan.name}' step {self.state['phase_step'] + 1}: loss is {value}; "
                                     f"lower train.phases[{plan.index}].lr or check the table")
        return value, stats

    def _micro_batches(self, plan: PhasePlan, source: TableSource, ref, online: OnlinePhase | None):
        """The phase's ``micro_batch(micro, start)`` for :meth:`_step`."""
        size = plan.config.batch_size
        if online is not None:
            return lambda micro, start: online.micro_batch(self.state["phase_step"] + 1, micro,
                                                           *online.rows(source, start), self.state["global_step"])

        def from_table(micro: int, start: int) -> MicroBatch:
            rows = source.row_indices(start, size)
            pair_ref = (torch.from_numpy(ref[0][rows]), torch.from_numpy(ref[1][rows])) if ref is not None else None
            return MicroBatch(source.examples(rows), pair_ref)

        return from_table

    def _reference(self, plan: PhasePlan, source: TableSource) -> tuple[np.ndarray, np.ndarray]:
        """The phase's reference log-probs, aligned to the table's rows by pair_id: the stored set
        of the phase's reference fingerprint, computed first when there is none."""
        fabric, name = self.fabric, plan.name
        if self.state["ref_sha"] is None:  # the phase starts now: the current policy is its reference
            weights = full_model_state(fabric, self.policy.model)
            self.state["ref_sha"] = fabric.broadcast(state_sha(weights) if fabric.global_rank == 0 else None)
        sha, started = self.state["ref_sha"], self.state["phase_step"] > 0
        keys = reference_keys(sha, self.policy.config, self.t.max_seq_len, self.t.precision, source.table, plan.table)
        if started and self.state.get("ref_keys") and self.state["ref_keys"] != keys:
            raise ReferenceMismatch(
                f"phase '{name}' started with reference log-probs made under other settings than hold now:\n  "
                + "\n  ".join(diff_views(self.state["ref_keys"], keys)) + f"\nThe reference (model {sha}) cannot be "
                "recomputed from a later checkpoint: restore what changed, or train again with --force")
        root = reference_root(self.out)
        directory = root / fingerprint_of(keys)
        if not table_files(directory):
            if started:
                raise ReferenceMismatch(f"{directory}: the reference log-probs of phase '{name}' (model {sha}) were "
                                        "removed after the phase started; they cannot be recomputed from a later "
                                        "checkpoint: train the phase again with --force")
            check_unique_pairs(source.table, plan.table)
            self.log(f"train: computing reference log-probs of {source.rows} pairs (model {sha}) into {directory}; "
                     + differences(keys, stored_sets(root)))
            chosen, rejected = compute_reference(fabric, self.policy.model, source, plan.config.batch_size, PAD_ID)
            if fabric.global_rank == 0:
                start = ckpt.latest_checkpoint(self.root)
                write_set(root, keys, source.table, chosen, rejected,
                          checkpoint=str(start) if start else f"train.model.init: {self.t.model.init}",
                          phase=name, table_path=plan.table, manifest_fingerprint=fingerprint(self.m))
            fabric.barrier()
        else:
            self.log(f"train: reference log-probs of phase '{name}' from {directory}")
        self.state["ref_keys"] = keys
        return join_reference(source.table, plan.table, directory)

    def _publish_phase(self, plan: PhasePlan) -> None:
        """``phases/<name>/``: the model at the end of ``plan`` (what ``sip eval`` calls ``phase:<name>``)."""
        state = full_model_state(self.fabric, self.policy.model)
        if self.fabric.global_rank == 0:
            about = {"phase": plan.name, "phase_index": plan.index, "global_step": self.state["global_step"],
                     "tokens": self.state["tokens"], "manifest_fingerprint": fingerprint(self.m)}
            ckpt.save_model(state, self.policy.config, self.policy.tokenizer_dir, self.out / PHASES_DIR / plan.name,
                            about)
        self.fabric.barrier()

    def _save(self, optimizer, scheduler) -> None:
        path = ckpt.save_checkpoint(self.fabric, self.root, model=self.policy.model, optimizer=optimizer,
                                    scheduler=scheduler, loop_state=dict(self.state), config=self.policy.config,
                                    tokenizer_dir=self.policy.tokenizer_dir, keep_last=self.t.checkpoint.keep_last)
        self.log(f"train: checkpoint {path}")

    def _progress(self, plan: PhasePlan, m: dict, step_s: float) -> None:
        remaining = (plan.steps - self.state["phase_step"]) * step_s
        later = sum(p.steps for p in self.plans[plan.index + 1:])
        extra = "".join(f" | {k} {m[k]:.3f}" for k in ("dpo_accuracy", "dpo_margin", "chosen_rate_rollout") if k in m)
        if "judge_calls" in m:
            extra += (f" | judge calls {m['judge_calls']:.0f} | sample/judge/train {m['sample_s']:.1f}/"
                      f"{m['judge_s']:.1f}/{m['train_s']:.1f} s")
        self.log(f"train [{plan.name} {plan.index + 1}/{len(self.t.phases)}] step {self.state['phase_step']}/"
                 f"{plan.steps} | loss {m['loss']:.4f}{extra} | lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s | "
                 f"phase ETA {format_duration(remaining)}" + (f" (+{later} steps in later phases)" if later else ""))


def export_final_hf(final: Path, hf_dir: Path, tokenizer_dir: Path) -> Path:
    """The final checkpoint as a Hugging Face directory (what vLLM serves for rollouts and eval)."""
    from pipeline.export import export_hf

    return export_hf(final, hf_dir, tokenizer_dir)
