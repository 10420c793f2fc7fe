"""`sip bench online` (`make bench-online`): an online phase's rollouts and judge calls against
bare vLLM doing the same work, in the same run.

The sip side is ``sip train`` in a fresh process, running the manifest's first online phase
for a few steps on a shard table of a few pairs (the rewrite stage first, untimed). Its
per-step time split (weight push, sample, judge, train) comes from the online record: every
micro-batch file stores what it spent. Its rates:

- rollout tokens/s: the tokens sampled / the sample time (vLLM generate, decoding the texts
  and assembling the candidates);
- judge calls/s: the judge prompts scored / the judge time (the scoring core's prompts,
  engine calls and parsing).

The bare side, in one fresh process with the same two engines (``vllm.LLM`` of the trained
policy's Hugging Face export and of the judge, the sip engines' arguments), repeats each
recorded micro-batch: one ``generate`` of the same prefixes with the same sampling settings,
then the very engine calls the scoring core makes for that micro-batch's candidates
(recorded by running the core with :class:`pipeline.engines.counter.CallCounter`), each as
one ``generate``. Rates are the same quantities over its generate time.

With ``schemes`` the sip side runs again for each quality scheme named (the same pairs,
rewrites, seed and steps; only ``judging.quality.scheme`` differs) and the report adds, per
scheme, the judge calls per step and per prefix, the step split, and each one's ratio to the
manifest's own scheme: how much of a step a cheaper comparison scheme saves on this judge and
machine. The bare side replays the manifest's scheme only.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from pipeline.app.bench.fresh_process import CLI_MODULE, bare_engine_spec, run_python, run_side, start_bare_llm
from pipeline.app.bench.judge import replay_calls
from pipeline.app.bench.pairs import bench_pairs
from pipeline.app.registry import run_stages
from pipeline.io import CHUNK_STATS_KEY, table_units
from pipeline.manifest import Manifest, ManifestError, parse_manifest


def bare_vllm_side(spec: dict) -> dict:
    """The recorded micro-batches through two bare ``vllm.LLM``: the same rollouts, then the
    same judge calls."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sampler, sampler_start_s = start_bare_llm(spec["sampler"])
    judge, judge_start_s = start_bare_llm(spec["judge"])
    sample_s = judge_s = 0.0
    tokens = 0
    for micro in spec["micro_batches"]:
        r = micro["rollouts"]
        params = SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"], top_p=r["top_p"], n=r["n"],
                                stop_token_ids=r["stop_token_ids"] or None, logprobs=0)
        started = time.perf_counter()
        outputs = sampler.generate([TokensPrompt(prompt_token_ids=p) for p in r["prompts"]], params, use_tqdm=False)
        sample_s += time.perf_counter() - started
        tokens += sum(len(c.token_ids) for o in outputs for c in o.outputs)
        judge_s += replay_calls(judge, micro["judge_calls"])
    return {"start_s": sampler_start_s + judge_start_s, "sample_s": sample_s, "rollout_tokens": tokens,
            "judge_s": judge_s}


def _online_phase(manifest: Manifest):
    for phase in manifest.train.phases if manifest.train else []:
        if phase.source == "online":
            return phase
    raise ManifestError("bench online: the manifest has no online phase (train.phases[*].source: online)")


def _bench_manifest(m: Manifest, phase, steps: int, rollouts: int | None = None) -> Manifest:
    """``m`` training only ``phase`` for ``steps`` steps (``rollouts`` per prefix when given),
    exporting the result (the bare side's policy), one checkpoint at the end."""
    data = m.absolute_data()
    phase_data = {**phase.model_dump(mode="json"), "steps": steps, "epochs": None}
    if rollouts is not None:
        phase_data["online"] = {**phase_data["online"], "rollouts": rollouts}
    data["train"]["phases"] = [phase_data]
    data["train"].update(export_hf=True, log_every=1, checkpoint={"every": steps, "keep_last": 1, "resume": "never"})
    return parse_manifest(data)


def _record(train_dir: Path, phase: str) -> list[tuple[list[dict], dict]]:
    """The online record's micro-batches in step order: (rows, what the micro-batch spent)."""
    import json

    from trainer.online import record_dir

    out = []
    for path in sorted(record_dir(train_dir, phase).glob("*.parquet")):
        table = pq.read_table(path)
        out.append((table.to_pylist(), json.loads((table.schema.metadata or {})[CHUNK_STATS_KEY])))
    return out


def _logged_steps(train_dir: Path) -> list[dict]:
    """The metrics CSV rows of the run (one per step: the bench logs every step)."""
    import csv

    with open(train_dir / "metrics" / "version_0" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _judge_calls(m: Manifest, phase, record: list[tuple[list[dict], dict]], pairs: dict[str, dict],
                 upstream) -> list[tuple[list[dict], int]]:
    """Per recorded micro-batch, the engine calls and the judge prompts the scoring core makes
    for its candidates (its pairs' original, rewrite and distinct rollouts, rebuilt in sample
    order), counted by one :class:`CallCounter` judge."""
    from pipeline.engines.counter import CallCounter
    from pipeline.models import policy_tokenizer_dir, resolve_model_dir
    from pipeline.tokenizer import load_tokenizer
    from stages.criteria import manifest_judge
    from stages.scoring import assemble_candidates, score_pairs

    tokenizer = load_tokenizer(str(policy_tokenizer_dir(m)))
    ref = m.judge
    counter = CallCounter(resolve_model_dir(m, ref.model, "judge.model"), ref.model, ref.max_model_len)
    judge = manifest_judge(m, counter)
    out = []
    for rows, _costs in record:
        sets = []
        for pair_id in dict.fromkeys(r["pair_id"] for r in rows):
            rollouts = sorted((r for r in rows if r["pair_id"] == pair_id and r["source"] == "rollout"),
                              key=lambda r: r["sample"])
            pair = pairs[pair_id]
            rewrite = upstream.rewrite(pair_id, pair["unit"]) if phase.online.rewrite else None
            sets.append(assemble_candidates(pair, rewrite, [(r["text"], r["token_ids"]) for r in rollouts],
                                            tokenizer, m.shard.suffix_tokens))
        calls_before, before = len(counter.calls), judge.counters.snapshot()
        score_pairs(judge, sets)
        out.append((counter.calls[calls_before:], judge.counters.since(before).get("judge_calls", 0)))
    return out


def _with_scheme(m: Manifest, scheme: str) -> Manifest:
    """``m`` with ``judging.quality.scheme`` set to ``scheme`` (everything else as it was)."""
    data = m.absolute_data()
    data["judging"]["quality"]["scheme"] = scheme
    return parse_manifest(data)


def _sip_train(m: Manifest, directory: Path, name: str) -> float:
    """``sip train`` of ``m`` in a fresh process (a fresh train directory); its wall time in s."""
    shutil.rmtree(m.stage_dir("train"), ignore_errors=True)
    manifest_path = directory / f"{name}-manifest.yaml"
    manifest_path.write_text(yaml.safe_dump(m.absolute_data()))
    return run_python(["-m", CLI_MODULE, "train", "-m", str(manifest_path)], f"sip train ({name})")


def _summed_costs(record: list[tuple[list[dict], dict]]) -> dict:
    """What the recorded micro-batches spent, summed (seconds, tokens, calls)."""
    spent: dict = {}
    for _rows, s in record:
        for key, value in s.items():
            spent[key] = spent.get(key, 0) + value
    return spent


def _step_split(record: list[tuple[list[dict], dict]], logged: list[dict], steps: int) -> dict:
    """Mean seconds per step: weight push, sample, judge (the record), train and the whole step
    (the metrics CSV)."""
    spent = _summed_costs(record)
    mean = lambda key: round(sum(float(r[key]) for r in logged) / max(1, len(logged)), 3)  # noqa: E731
    return {**{k: round(spent.get(k, 0) / max(1, steps), 3) for k in ("push_s", "sample_s", "judge_s")},
            "train_s": mean("train_s"), "step_s": mean("step_s")}


def _scheme_row(record: list[tuple[list[dict], dict]], logged: list[dict], steps: int) -> dict:
    """One scheme's judge calls (per step, per prefix judged) and step split."""
    calls = _summed_costs(record).get("judge_calls", 0)
    prefixes = sum(len({r["pair_id"] for r in rows}) for rows, _costs in record)
    return {"judge_calls_per_step": round(calls / max(1, steps), 1),
            "judge_calls_per_prefix": round(calls / max(1, prefixes), 1),
            **_step_split(record, logged, steps)}


def bench_online(manifest: Manifest, steps: int = 4, pairs: int = 32, schemes: tuple[str, ...] = (),
                 rollouts: int | None = None) -> dict:
    """An online phase's per-step time split, rollout tokens/s and judge calls/s, against bare
    vLLM generating the same prompts and making the same judge calls with the same settings.

    Raises:
        ManifestError: the manifest has no online phase, or no judge.
    """
    from pipeline.tokenizer import end_of_text_ids
    from stages.judge import UpstreamCandidates
    from trainer.online import clipped_prefix, online_rewrites

    phase = _online_phase(manifest)
    if manifest.judge is None:
        raise ManifestError("bench online: the manifest has no judge")
    quality = manifest.judging.quality
    if schemes and (quality is None or quality.mode not in ("verdict", "choice_prob")):
        raise ManifestError("bench online --scheme: judging.quality.mode must be verdict or choice_prob (schemes "
                            f"choose pairs to compare), not {quality.mode if quality else None}; e.g. "
                            "--set judging.quality.mode=choice_prob")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        m = bench_pairs(manifest, tmp, pairs)
        m = _bench_manifest(m, phase, steps, rollouts)
        phase = m.train.phases[0]
        if phase.online.rewrite and m.rewriter is not None:
            run_stages(m, ["rewrite"], log=lambda _m: None)  # the phase's upstream (not timed)
        train_dir = m.stage_dir("train")
        scheme_rows = {}
        for scheme in dict.fromkeys(s for s in schemes if s != quality.scheme):
            _sip_train(_with_scheme(m, scheme), tmp, scheme)
            scheme_rows[scheme] = _scheme_row(_record(train_dir, phase.name), _logged_steps(train_dir), steps)
        wall = _sip_train(m, tmp, "train")  # the manifest's own scheme last: the bare side replays its record
        record = _record(train_dir, phase.name)
        logged = _logged_steps(train_dir)
        pair_rows = {p["pair_id"]: {**p, "unit": unit.key} for unit in table_units(m.stage_dir("shard"))
                     for p in unit.read().to_pylist()}
        rewrite_stage = online_rewrites(m, phase)
        upstream = UpstreamCandidates(str(rewrite_stage.path) if rewrite_stage else None, "", 0)
        hf_dir = train_dir / "hf"
        sampler_spec = {"model": str(hf_dir), "engine": {
            "max_model_len": m.train.max_seq_len, "seed": m.train_seed,
            "dtype": "float32" if m.train.precision.startswith("32") else "bfloat16"}}
        micro_batches, judge_prompts = [], 0
        for (rows, _costs), (calls, prompts) in zip(record, _judge_calls(m, phase, record, pair_rows, upstream)):
            prefix_ids = {}
            for r in rows:
                prefix_ids.setdefault(r["pair_id"], clipped_prefix(pair_rows[r["pair_id"]], m))
            judge_prompts += prompts
            micro_batches.append({"rollouts": {
                "prompts": list(prefix_ids.values()), "n": phase.online.rollouts, "max_tokens": m.shard.suffix_tokens,
                "temperature": phase.online.temperature, "top_p": phase.online.top_p,
                "stop_token_ids": sorted(end_of_text_ids(hf_dir))}, "judge_calls": calls})
        spec = {"sampler": sampler_spec, "judge": bare_engine_spec(m, "judge"), "micro_batches": micro_batches}
        bare = run_side(bare_vllm_side, spec, tmp, "bare-vllm-online")

    spent = _summed_costs(record)
    sip_tok_s = spent.get("rollout_tokens", 0) / max(1e-9, spent.get("sample_s", 0))
    bare_tok_s = bare["rollout_tokens"] / max(1e-9, bare["sample_s"])
    sip_calls_s = spent.get("judge_calls", 0) / max(1e-9, spent.get("judge_s", 0))
    bare_calls_s = judge_prompts / max(1e-9, bare["judge_s"])
    out = {
        "phase": phase.name, "steps": steps, "micro_batches": len(record),
        "prefixes_per_micro_batch": phase.batch_size, "rollouts_per_prefix": phase.online.rollouts,
        "suffix_tokens": m.shard.suffix_tokens, "sampler": phase.online.sampler,
        "sip_step_split_s": _step_split(record, logged, steps),
        "sip_train_process_wall_s": round(wall, 1),
        "rollouts": {"sip_tokens": int(spent.get("rollout_tokens", 0)), "sip_tokens_per_s": round(sip_tok_s, 1),
                     "bare_tokens": bare["rollout_tokens"], "bare_tokens_per_s": round(bare_tok_s, 1),
                     "ratio_sip_over_bare": round(sip_tok_s / bare_tok_s, 3) if bare_tok_s else None},
        "judge": {"sip_calls": int(spent.get("judge_calls", 0)), "sip_calls_per_s": round(sip_calls_s, 2),
                  "bare_calls": judge_prompts, "bare_calls_per_s": round(bare_calls_s, 2),
                  "ratio_sip_over_bare": round(sip_calls_s / bare_calls_s, 3) if bare_calls_s else None},
        "bare_engines_start_s": round(bare["start_s"], 1),
    }
    if scheme_rows:
        own = quality.scheme
        rows = {own: _scheme_row(record, logged, steps), **scheme_rows}
        for row in rows.values():
            for key in ("judge_calls_per_step", "judge_s", "step_s"):
                row[f"{key}_ratio_to_{own}"] = round(row[key] / rows[own][key], 3) if rows[own][key] else None
        out["schemes"] = rows
    return out
