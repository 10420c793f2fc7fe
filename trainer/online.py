"""The online phase: the current policy's rollouts, judged while it trains (METHOD.md "Idea").

Each micro-batch of prefixes (rows of the pairs table, in the phase's seeded order):

1. **sample** K rollouts of at most N tokens per prefix from the weights being trained
   (``trainer/sampling.py``: a vLLM engine the trainer pushes its weights into, or the
   trainer's own module), recording the weights version each came from;
2. **judge** them with the pair's original suffix and its ok rewrite (the rewrite stage's
   table) through the scoring core (``stages/scoring.py``): the same candidates, scores,
   rewards and picks as ``sip judge`` + ``sip prefs``;
3. **pick** chosen/rejected (DPO) or the best candidate (RF-NLL); ties and prefixes without
   two judged candidates are skipped and counted;
4. **record** every candidate with its scores, role and the weights version that sampled it,
   one Parquet file per (step, rank, micro) written atomically before the step trains, under
   ``<train>/online/<phase>/``. A resumed run replays a recorded micro-batch instead of
   sampling and judging it again: no judge call is paid twice, and the data are the same as
   an uninterrupted run's even where the engine cannot be seeded.

With ``online.offline_mix``, each micro-batch's last rows come from the objective's offline
table instead (deterministic, so not recorded), trained beside the online picks.

The DPO reference is the policy at the phase start, kept as a frozen copy (its weights are
saved once under ``<train>/online/<phase>/reference/`` so a resumed phase uses the same
one); its log-probs of the chosen and rejected suffixes are computed when they are picked and
recorded with them.

Prefixes keep their last ``train.max_seq_len - N`` tokens for sampling and training alike, so
every candidate of a pair, and both sides of a DPO pair, are continuations of the same
context.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import torch

from pipeline.atomic import atomic_path
from pipeline.engines.factory import make_engine, model_identity
from pipeline.io import write_table_atomic
from pipeline.manifest import Manifest, PhaseConfig, fingerprint
from pipeline.schema import ONLINE, content_id, provenance, read_provenance, with_provenance
from pipeline.tokenizer import decode_continuations, end_of_text_ids, load_tokenizer
from stages.criteria import Judge, manifest_judge
from stages.judge import UpstreamCandidates
from stages.rewrite import plan_rewrite
from stages.scoring import CandidateSet, Judged, assemble_candidates, pick_judged, score_pairs
from trainer.model import ModelError, state_sha
from trainer.plan import PhasePlan, check_online_phase, train_view
from trainer.sampling import TrainerSampler, VLLMSampler
from trainer.steps import MicroBatch

RECORD_DIR = "online"


def record_dir(out: Path, phase: str) -> Path:
    return out / RECORD_DIR / phase


def record_path(out: Path, phase: str, step: int, rank: int, micro: int) -> Path:
    return record_dir(out, phase) / f"step-{step:08d}-rank-{rank:05d}-micro-{micro:03d}.parquet"


def clipped_prefix(pair: dict, manifest: Manifest) -> list[int]:
    """The prefix ids a pair's candidates continue in an online phase: its last
    ``train.max_seq_len - N`` (sampling and training see the same context)."""
    return list(pair["prefix_ids"])[-(manifest.train.max_seq_len - manifest.shard.suffix_tokens):]


def online_rewrites(manifest: Manifest, phase: PhaseConfig):
    """The rewrite stage (a ``StageDir``) an online phase reads its rewrites from, or None
    (``online.rewrite: false``, or no rewriter).

    Raises:
        StageFailed: the rewrite stage is not complete, or was made with other settings.
    """
    if not phase.online.rewrite or manifest.rewriter is None:
        return None
    rewrite = plan_rewrite(manifest, upstream_pending=True)
    rewrite.stage.check_upstream_of("train")
    return rewrite.stage


class OnlinePhase:
    """One online phase of one rank: micro-batches of prefixes -> judged, picked examples."""

    def __init__(self, manifest: Manifest, plan: PhasePlan, out: Path, policy, fabric, log):
        self.m, self.plan, self.out, self.policy, self.fabric, self.log = manifest, plan, out, policy, fabric, log
        self.cfg = plan.config.online
        self.objective = plan.config.objective
        self.n = manifest.shard.suffix_tokens
        self.context = manifest.train.max_seq_len - self.n
        check_online_phase(manifest, plan.config, plan.index)
        self.tokenizer = load_tokenizer(str(policy.tokenizer_dir))
        self.eos = end_of_text_ids(policy.tokenizer_dir)
        rewrites = online_rewrites(manifest, plan.config)
        if self.cfg.rewrite and rewrites is None:
            log(f"train: phase '{plan.name}': the manifest has no rewriter; candidates are the original and the rollouts")
        self.candidates = UpstreamCandidates(str(rewrites.path) if rewrites else None, str(policy.tokenizer_dir), self.n)
        # Started when the first micro-batch is not in the record; with several ranks, at once on
        # every rank: vLLM builds its groups from the trainer's process group, a collective step.
        self.judge: Judge | None = None
        self.sampler: TrainerSampler | VLLMSampler | None = None
        self.reference = None
        judge_identity = model_identity(manifest, manifest.judge, "judge")
        # What decides a recorded micro-batch: a record made under other settings is never replayed.
        # train_view holds the judge's settings whenever a phase is online.
        self.record_fingerprint = content_id("online", plan.name, json.dumps({
            **train_view(manifest), "upstream.rewrite": rewrites.fingerprint if rewrites else None,
        }, sort_keys=True, default=str))
        self.schema = with_provenance(ONLINE, provenance(
            stage="train", table="online", manifest_fingerprint=fingerprint(manifest),
            stage_fingerprint=self.record_fingerprint, models={"judge": judge_identity},
            settings={"phase": plan.config.model_dump(mode="json"), "judging": manifest.judging.model_dump(mode="json"),
                      "suffix_tokens": self.n, "prefix_context": self.context}))
        self.judge_calls_made = 0
        self.micro_batches_replayed = 0
        # offline_mix: each micro-batch's first rows are online prefixes, the rest rows of the
        # objective's offline table in its own seeded order (deterministic: nothing to record).
        self.offline_rows = plan.config.offline_rows_per_micro_batch
        self.online_rows = plan.config.batch_size - self.offline_rows
        self.offline = None
        if self.offline_rows:
            from pipeline.manifest import OBJECTIVE_TABLES
            from trainer.plan import offline_table_path
            from trainer.table_cache import cache_dir
            from trainer.source import TableSource, load_table

            kind = OBJECTIVE_TABLES[self.objective]
            table = load_table(offline_table_path(manifest, plan.config), kind,
                               f"train.phases[{plan.index}].online.offline_table ({plan.name})", cache_dir(manifest),
                               log)
            # A seed apart from the pairs table's (train_seed + index), so the two orders differ.
            self.offline = TableSource(table, kind, manifest.train_seed + plan.index + 1_000_003,
                                       manifest.train.max_seq_len)
        if fabric.world_size > 1:
            self._engines()

    # ------------------------------------------------------------------ reference
    def setup_reference(self, ref_sha: str | None) -> str:
        """The frozen phase-start policy (DPO only). Returns its weights' hash.

        ``ref_sha`` is None when the phase starts now: the current weights are saved as the
        reference. Otherwise (a resumed phase) the saved reference is loaded and checked.
        """
        path = record_dir(self.out, self.plan.name) / "reference" / "lit_model.pth"
        model = self.policy.model.module
        if ref_sha is None:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            sha = state_sha(state)
            if self.fabric.global_rank == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    torch.save(state, tmp)
            self.fabric.barrier()
        else:
            if not path.is_file():
                raise ModelError(f"{path}: the reference of online phase '{self.plan.name}' is missing; it cannot be "
                                 "recovered from a later checkpoint: train again with --force")
            state = torch.load(path, map_location="cpu", weights_only=True)
            sha = state_sha(state)
            if sha != ref_sha:
                raise ModelError(f"{path}: reference weights {sha} are not the phase's reference {ref_sha}")
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.reference.load_state_dict(state)
        return sha

    # ------------------------------------------------------------------ micro-batches
    def rows(self, prefixes, start: int) -> tuple[list[dict], list[dict]]:
        """The online prefixes (pairs-table rows) and offline examples of the micro-batch whose
        prefixes start at phase sample ``start`` of the pairs table (a multiple of the online
        rows per micro-batch; see the loop).

        ``prefixes``: the phase's :class:`trainer.source.TableSource` of the pairs table.
        Micro-batch ``j = start // online_rows`` reads offline samples ``j * offline_rows ..``,
        so neither table skips rows.
        """
        rows = prefixes.examples(prefixes.row_indices(start, self.online_rows))
        if self.offline is None:
            return rows, []
        j = start // self.online_rows
        return rows, self.offline.examples(self.offline.row_indices(j * self.offline_rows, self.offline_rows))

    def micro_batch(self, step: int, micro: int, rows: list[dict], offline: list[dict],
                    weights_version: int) -> MicroBatch:
        """Examples for phase step ``step`` (1-based) and micro-batch ``micro`` of this rank:
        the online picks of ``rows``' prefixes, then the ``offline`` examples (their DPO
        reference log-probs computed now by the phase's frozen reference); ``weights_version``:
        the optimizer steps taken so far (the weights being trained)."""
        return self._with_offline(self._online_micro_batch(step, micro, rows, weights_version), offline)

    def _with_offline(self, batch: MicroBatch, offline: list[dict]) -> MicroBatch:
        if not offline:
            return batch
        stats = {**batch.stats, "offline_rows": len(offline)}
        if self.objective != "dpo":
            return MicroBatch(batch.examples + offline, None, stats)
        ref = [self._pair_reference(e["prefix"], e["chosen"], e["rejected"]) for e in offline]
        chosen = torch.cat([batch.ref[0], torch.tensor([r["chosen"] for r in ref], dtype=torch.float32)])
        rejected = torch.cat([batch.ref[1], torch.tensor([r["rejected"] for r in ref], dtype=torch.float32)])
        return MicroBatch(batch.examples + offline, (chosen, rejected), stats)

    def _online_micro_batch(self, step: int, micro: int, rows: list[dict], weights_version: int) -> MicroBatch:
        path = record_path(self.out, self.plan.name, step, self.fabric.global_rank, micro)
        if path.is_file():
            self.micro_batches_replayed += 1
            if self.cfg.sampler == "vllm" and self.cfg.push_every > 1:
                # The engine must hold the weights an uninterrupted run's engine held when the
                # first micro-batch after the replayed ones is sampled: keep pushing on the grid.
                self._engines()[0].sync(self.policy.model.module, weights_version)
            return self._replay(path, rows)
        sampler, judge = self._engines()
        timings = {"push_s": sampler.sync(self.policy.model.module, weights_version)}
        started = time.perf_counter()
        sets, samples = self._sample(step, micro, rows, timings)
        timings["sample_s"] = time.perf_counter() - started
        started = time.perf_counter()
        before = judge.counters.snapshot()
        judged = score_pairs(judge, sets)
        if not any(j.parsed for pair_judged in judged for j in pair_judged):
            # Nothing judged at all: the judge is down or cannot read these prompts. Training on
            # nothing would look like success; stop before recording the micro-batch.
            example = next((j.raw for pair_judged in judged for j in pair_judged), {})
            raise ModelError(f"online phase '{self.plan.name}' step {step}: no candidate of the micro-batch could be "
                             f"judged (every judgment failed or was unparsable), e.g. {_json(example)[:300]}; check "
                             "the judge (its server, judging.*.mode) and re-run: finished steps resume")
        spent = judge.counters.since(before)
        timings["judge_s"] = time.perf_counter() - started
        self.judge_calls_made += spent.get("judge_calls", 0)
        record = self._record_rows(step, micro, sampler.version, sets, judged, samples, self.prefixes(rows))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table_atomic(str(path), record, self.schema, {**spent, **timings})
        return self._from_record(record, {**spent, **timings}, rows)

    def prefixes(self, rows: list[dict]) -> dict[str, list[int]]:
        """pair_id -> the prefix ids the pair's candidates continue (its last max_seq_len - N)."""
        return {pair["pair_id"]: clipped_prefix(pair, self.m) for pair in rows}

    def _engines(self) -> tuple[TrainerSampler | VLLMSampler, Judge]:
        """The sampler and the judge, started on first use (always in this order: with several
        ranks, every rank starts them at the same point)."""
        if self.sampler is None:
            self.sampler = self._make_sampler()
        if self.judge is None:
            self.log(f"train: starting the judge for online phase '{self.plan.name}'")
            self.judge = manifest_judge(self.m, make_engine(self.m, self.m.judge, "judge"))
        return self.sampler, self.judge

    def _make_sampler(self) -> TrainerSampler | VLLMSampler:
        model, cfg = self.policy.model.module, self.cfg
        if cfg.sampler == "trainer":
            return TrainerSampler(model, temperature=cfg.temperature, top_p=cfg.top_p, eos_ids=self.eos)
        rank = self.fabric.global_rank
        self.log(f"train: starting the vLLM sampler for online phase '{self.plan.name}' (weights pushed every "
                 f"{cfg.push_every} step(s))")
        return VLLMSampler(self.policy.config, self.policy.tokenizer_dir,
                           record_dir(self.out, self.plan.name) / "sampler" / f"rank-{rank:05d}",
                           precision=self.m.train.precision, max_model_len=self.m.train.max_seq_len,
                           seed=self.m.train_seed + rank, push_every=cfg.push_every, temperature=cfg.temperature,
                           top_p=cfg.top_p, eos_ids=self.eos)

    def _sample(self, step: int, micro: int, rows: list[dict], timings: dict):
        sets, samples, tokens = [], [], 0
        prefixes = self.prefixes(rows)
        # Each prefix's draws seeded by (seed, phase, step, rank, micro, row) where the sampler
        # can be seeded per prefix, so a step's samples do not depend on what ran before it.
        seeds = [int(content_id("rollout", self.m.train_seed, self.plan.name, step, self.fabric.global_rank,
                                micro, i)[:15], 16) for i in range(len(rows))]
        drawn_all = self.sampler.sample([prefixes[pair["pair_id"]] for pair in rows], self.cfg.rollouts, self.n, seeds)
        for pair, drawn in zip(rows, drawn_all):
            tokens += sum(len(s.token_ids) for s in drawn)
            texts = decode_continuations(self.tokenizer, prefixes[pair["pair_id"]], [s.token_ids for s in drawn])
            sets.append(assemble_candidates(pair, self.candidates.rewrite(pair["pair_id"], pair["unit"]),
                                            [(t, s.token_ids) for t, s in zip(texts, drawn)], self.tokenizer, self.n))
            # The first sample that gave each text (a repeated text is judged once).
            by_text: dict[str, tuple[int, float]] = {}
            for k, (t, s) in enumerate(zip(texts, drawn)):
                by_text.setdefault(t, (k, sum(s.logprobs)))
            samples.append(by_text)
        timings["rollout_tokens"] = tokens
        return sets, samples

    def _record_rows(self, step: int, micro: int, version: int, sets: list[CandidateSet], judged: list[list[Judged]],
                     samples: list[dict], prefix_ids: dict[str, list[int]]) -> list[dict]:
        rows = []
        for cand_set, pair_judged, by_text in zip(sets, judged, samples):
            picked = pick_judged(pair_judged, self.m.prefs.min_margin)
            roles = {}
            if picked.status == "usable" and self.objective == "dpo":
                roles = {id(picked.chosen): "chosen", id(picked.rejected): "rejected"}
            elif picked.best is not None and self.objective == "rf_nll":
                roles = {id(picked.best): "best"}
            ref = self._reference_logps(prefix_ids[cand_set.pair_id], picked) \
                if roles and self.objective == "dpo" else {}
            for j in pair_judged:
                c = j.candidate
                sample, logprob = by_text.get(c.text, (None, None)) if c.source == "rollout" else (None, None)
                rows.append({
                    "phase": self.plan.name, "step": step, "rank": self.fabric.global_rank, "micro": micro,
                    "weights_version": version, "pair_id": c.pair_id, "cand_id": c.cand_id, "source": c.source,
                    "text": c.text, "token_ids": list(c.token_ids), "sample": sample, "sampler_logprob": logprob,
                    **j.scores, "reward": j.reward, "judge_raw": _json(j.raw),
                    "parse_status": "ok" if j.parsed else "unparsable",
                    "shown_order": _json(j.shown_order) if j.shown_order else None, "prefix_tokens": j.prefix_tokens,
                    "judge_samples": self.m.judging.samples, "pick_status": picked.status,
                    "role": roles.get(id(j)), "ref_logprob": ref.get(roles.get(id(j))),
                })
        return rows

    def _reference_logps(self, prefix_ids: list[int], picked) -> dict[str, float]:
        return self._pair_reference(prefix_ids, list(picked.chosen.candidate.token_ids),
                                    list(picked.rejected.candidate.token_ids))

    @torch.no_grad()
    def _pair_reference(self, prefix_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> dict[str, float]:
        """The frozen reference's sequence log-probs (nats) of a DPO pair's two sides."""
        from trainer.runtime import PAD_ID
        from trainer.steps import pair_logps

        example = {"prefix": prefix_ids, "chosen": chosen_ids, "rejected": rejected_ids}
        device = next(self.reference.parameters()).device
        chosen, rejected = pair_logps(self.reference, [example], PAD_ID, self.m.train.max_seq_len, device)
        return {"chosen": float(chosen[0]), "rejected": float(rejected[0])}

    def _replay(self, path: Path, rows: list[dict]) -> MicroBatch:
        table = pq.read_table(path)
        made_by = (read_provenance(table.schema) or {}).get("stage_fingerprint")
        if made_by != self.record_fingerprint:
            raise ModelError(f"{path}: this micro-batch was recorded under other settings (record {made_by}, now "
                             f"{self.record_fingerprint}); train again with --force")
        recorded = set(table.column("pair_id").to_pylist())
        if recorded != {pair["pair_id"] for pair in rows}:
            raise ModelError(f"{path}: the recorded micro-batch holds other prefixes than this step reads; the record "
                             "belongs to another run: train again with --force")
        # What the recorded micro-batch cost was paid by the run that recorded it: nothing now.
        return self._from_record(table.to_pylist(), {"replayed": 1}, rows)

    def _from_record(self, record: list[dict], spent: dict, pairs: list[dict]) -> MicroBatch:
        """Training examples and metric sums from a micro-batch's record rows."""
        by_pair: dict[str, list[dict]] = {}
        for row in record:
            by_pair.setdefault(row["pair_id"], []).append(row)
        examples, ref_c, ref_r = [], [], []
        stats = Counter({k: v for k, v in spent.items()})
        prefixes = self.prefixes(pairs)
        for pair_id, rows in by_pair.items():
            prefix = prefixes[pair_id]
            role = {r["role"]: r for r in rows if r["role"]}
            status = rows[0]["pick_status"]
            stats["prefixes"] += 1
            stats[f"pick_{status}"] += 1
            stats["candidates"] += len(rows)
            for r in rows:
                stats[f"candidates_{r['source']}"] += 1
                if r["reward"] is not None:
                    stats[f"reward_sum_{r['source']}"] += r["reward"]
                    stats[f"reward_count_{r['source']}"] += 1
            if self.objective == "dpo" and "chosen" in role:
                c, r = role["chosen"], role["rejected"]
                examples.append({"prefix": prefix, "chosen": c["token_ids"], "rejected": r["token_ids"],
                                 "chosen_source": c["source"], "rejected_source": r["source"],
                                 "sampler_logprobs": (c["sampler_logprob"], r["sampler_logprob"])})
                ref_c.append(c["ref_logprob"])
                ref_r.append(r["ref_logprob"])
                stats[f"chosen_{c['source']}"] += 1
                stats[f"rejected_{r['source']}"] += 1
                stats["reward_margin_sum"] += c["reward"] - r["reward"]
            elif self.objective == "rf_nll" and "best" in role:
                b = role["best"]
                examples.append({"prefix": prefix, "target": b["token_ids"], "source": b["source"],
                                 "sampler_logprobs": (b["sampler_logprob"],)})
                stats[f"chosen_{b['source']}"] += 1
        ref = (torch.tensor(ref_c, dtype=torch.float32), torch.tensor(ref_r, dtype=torch.float32)) \
            if self.objective == "dpo" else None
        return MicroBatch(examples, ref, dict(stats))

    def summary(self) -> dict:
        """What this rank's process paid for and what it replayed (a resumed run makes no judge
        call for a micro-batch already in the record)."""
        out = {"judge_calls_made": self.judge_calls_made, "micro_batches_replayed": self.micro_batches_replayed,
               "sampler": self.cfg.sampler, "record": str(record_dir(self.out, self.plan.name))}
        if isinstance(self.sampler, VLLMSampler):
            out.update(weight_pushes=self.sampler.pushes, push_s=round(self.sampler.push_s, 3))
        return out

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        if self.judge is not None:
            self.judge.engine.close()
            self.judge = None
        self.reference = None


def _json(value) -> str:
    return json.dumps(value, default=str)


def logprob_gap(examples: list[dict], trainer_logps: list[float], objective: str) -> dict[str, float]:
    """How far the trainer's log-probs of the rollouts it trains on are from the sampler's.

    ``trainer_logps``: the step's sequence log-probs (``nll_step``: one per example; ``dpo_step``:
    the chosen rows, then the rejected rows). Sums of |sampler - trainer| (nats) and the tokens
    they cover; a stale sampler (weights not the ones being trained) shows as a gap far above
    float rounding.
    """
    if not examples or not trainer_logps:
        return {}
    # Offline-table rows (offline_mix) and candidates that were not sampled have no sampler log-prob.
    sampled = [e.get("sampler_logprobs", (None, None)) for e in examples]
    if objective == "dpo":
        half = len(examples)
        pairs = [(sampled[i][0], trainer_logps[i], len(e["chosen"])) for i, e in enumerate(examples)]
        pairs += [(sampled[i][1], trainer_logps[half + i], len(e["rejected"])) for i, e in enumerate(examples)]
    else:
        pairs = [(sampled[i][0], trainer_logps[i], len(e["target"])) for i, e in enumerate(examples)]
    gaps = [(abs(s - t), n) for s, t, n in pairs if s is not None]
    if not gaps:
        return {}
    return {"logprob_gap_sum": sum(g for g, _ in gaps), "logprob_gap_tokens": sum(n for _, n in gaps),
            "logprob_gap_max_per_token": max(g / n for g, n in gaps)}
