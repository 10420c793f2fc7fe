"""The evaluation's generation stage: every checkpoint continues every prompt (METHOD.md "Evaluation").

Each checkpoint of ``eval.checkpoints`` (resolved by :func:`pipeline.checkpoints.resolve_checkpoint`)
continues each prompt of :mod:`stages.eval_prompts` with ``eval.max_new_tokens`` tokens
(default N = ``shard.suffix_tokens``), greedily by default (``eval.temperature``), through vLLM
on the checkpoint's Hugging Face export (a LitGPT checkpoint is exported once into the cache,
under its weights' content hash). Held-out prompts also get the checkpoint's loss on their true
suffix (``reference_nll``, for the perplexity comparison), from the same engine.

Layout: ``<output_dir>/eval/generations/``, one row per (checkpoint, prompt) in chunk files
(``EVAL_GENERATIONS``), so a killed run redoes at most one chunk per task. Task r continues
the prompts for checkpoints r, r + tasks, ...: a task starts one engine per checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Iterator

import polars as pl
from datatrove.pipeline.base import PipelineStep

from pipeline.assets import cache_dir
from pipeline.cards import write_card
from pipeline.checkpoints import LIT_WEIGHTS_FILE, resolve_checkpoint, weights_sha
from pipeline.chunks import EngineStep
from pipeline.engines.base import Engine, Request, Sampling
from pipeline.io import WorkUnit, chunk_stats, read_table
from pipeline.manifest import Manifest, fingerprint, fingerprinted_view
from pipeline.engines.context import model_context
from pipeline.policy import cached_hf_export
from pipeline.runner import StageJob
from pipeline.schema import EVAL_GENERATIONS, EVAL_STATUSES, provenance, with_provenance
from pipeline.stage import StageDir, StageFailed, require_each_key_once
from pipeline.tokenizer import decode_continuations, encode_continuation, load_tokenizer
from stages.eval_prompts import MC_LETTERS, eval_prompts
from stages.shard import plan_shard

STAGE = "eval-generations"
# Settings of the eval section that do not change a continuation.
_NOT_GENERATION = ("eval.baseline", "eval.chunk_size")


@dataclass(frozen=True)
class EvalModel:
    """A checkpoint to evaluate: its name, the manifest's reference, directory and content hash."""

    name: str
    ref: str
    directory: str
    weights_sha: str

    @property
    def is_litgpt(self) -> bool:
        return (Path(self.directory) / LIT_WEIGHTS_FILE).is_file()


def eval_models(manifest: Manifest) -> dict[str, EvalModel]:
    """Every checkpoint of ``eval.checkpoints``, resolved and hashed (in manifest order).

    Raises:
        ModelNotFound: a checkpoint that does not exist (yet), naming its key.
    """
    out = {}
    for name, ref in manifest.eval.checkpoints.items():
        directory = resolve_checkpoint(manifest, name, ref)
        out[name] = EvalModel(name, ref, str(directory), weights_sha(directory))
    return out


def hf_dir(model: EvalModel, tokenizer_dir: Path) -> Path:
    """A directory vLLM loads: the model's own (Hugging Face), or its cached export (LitGPT)."""
    if not model.is_litgpt:
        return Path(model.directory)
    own = Path(model.directory)
    return cached_hf_export(own, cache_dir() / "eval-hf" / model.weights_sha,
                            None if (own / "tokenizer.json").is_file() else tokenizer_dir)


class CheckpointPrompts(PipelineStep):
    """The stage's reader: (checkpoint, prompt) rows for task r's checkpoints (r, r + tasks, ...),
    every prompt of one checkpoint before the next checkpoint's."""

    name = "eval prompts"
    type = "📖 - READER"

    def __init__(self, manifest: Manifest, shard_dir: str, tokenizer_dir: str, names: list[str]):
        super().__init__()
        self.manifest, self.shard_dir, self.tokenizer_dir, self.names = manifest, shard_dir, tokenizer_dir, names

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[WorkUnit]:
        prompts = eval_prompts(self.manifest, Path(self.shard_dir), Path(self.tokenizer_dir))
        rows = [{"checkpoint": name, **prompt} for name in self.names[rank::world_size] for prompt in prompts]
        self.stat_update("rows_read", value=len(rows))
        yield WorkUnit(f"{rank:05d}", rows)  # one unit per task: files named <rank>_<chunk>


def generation_rows(rows: list[dict], results, nll: dict[int, list[float] | None], model: EvalModel,
                    tokenizer) -> list[dict]:
    """The table rows of one checkpoint's continuations of ``rows`` (``nll``: index -> the
    reference's per-token log-probs, for held-out prompts)."""
    out = []
    for i, (row, result) in enumerate(zip(rows, results)):
        base = {"checkpoint": model.name, "weights_sha": model.weights_sha, "prompt_id": row["prompt_id"],
                "prompt_set": row["prompt_set"], "prompt_tokens": result.prompt_tokens, "reference_nll": None,
                "reference_tokens": None, "mc_correct": None}
        if (lps := nll.get(i)) is not None:
            base.update(reference_nll=-sum(lps), reference_tokens=len(lps))
        if result.status != "ok" or not result.token_ids:
            out.append({**base, "text": None, "token_ids": [], "finish_reason": None,
                        "status": result.status if result.status != "ok" else "error",
                        "error": result.error or "no continuation returned", "completion_tokens": 0})
            continue
        ids = result.token_ids[0]
        text = decode_continuations(tokenizer, row["prefix_ids"], [ids])[0]
        out.append({**base, "text": text, "token_ids": ids, "finish_reason": result.finish_reasons[0],
                    "status": "ok" if text.strip() else "empty", "error": None, "completion_tokens": len(ids)})
    return out


def mc_rows(rows: list[dict], engine: Engine, tokenizer, model: EvalModel) -> list[dict]:
    """The table rows of one checkpoint's answers to multiple-choice ``rows``: the letter whose
    token is most probable after the question (``text``), and ``mc_correct``; ``too_long``
    when the question does not fit (lm-evaluation-harness scores MMLU the same way: the
    log-likelihood of each answer letter after "Answer:")."""
    letters = {}
    for letter in MC_LETTERS:
        ids = encode_continuation(tokenizer, rows[0]["prefix"], f" {letter}")
        if not ids:
            raise StageFailed(f"eval.mc_questions: the policy tokenizer merges ' {letter}' with 'Answer:'")
        letters[ids[0]] = letter
    if len(letters) != len(MC_LETTERS):
        raise StageFailed("eval.mc_questions: the answer letters share a first token in the policy tokenizer")
    out = []
    for row, lps in zip(rows, engine.next_token_logprobs([r["prefix_ids"] for r in rows], list(letters))):
        base = {"checkpoint": model.name, "weights_sha": model.weights_sha, "prompt_id": row["prompt_id"],
                "prompt_set": row["prompt_set"], "prompt_tokens": len(row["prefix_ids"]), "reference_nll": None,
                "reference_tokens": None, "token_ids": [], "finish_reason": None, "completion_tokens": 0}
        if not lps or len(lps) != len(letters):
            out.append({**base, "text": None, "status": "too_long", "mc_correct": None,
                        "error": f"{len(row['prefix_ids'])} question tokens do not fit max_model_len {engine.max_model_len}"})
            continue
        said = letters[max(lps, key=lps.get)]
        out.append({**base, "text": said, "status": "ok", "error": None, "mc_correct": said == row["reference"]})
    return out


def same_architecture(a: Path, b: Path) -> bool:
    """Whether two Hugging Face directories hold the same architecture, dtype and shapes (their
    config.json equal but for the name and the library version): one engine serves both."""
    def config(d: Path) -> dict:
        data = json.loads((d / "config.json").read_text())
        return {k: v for k, v in data.items() if k not in ("_name_or_path", "transformers_version")}

    return config(a) == config(b)


def hf_weights(directory: Path) -> dict | None:
    """The (Hugging Face name -> tensor) weights of a directory's safetensors files, or None
    when it has none (``*.bin`` weights: the engine is restarted instead)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    weights: dict = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


class GenerateStep(EngineStep):
    """Chunks of (checkpoint, prompt) rows -> continuations. The engine starts when the task
    reaches its first row (a resumed task whose chunks are written starts none); a checkpoint of
    the same architecture as the engine's then has its weights pushed into it (vLLM's
    ``reload_weights``, :meth:`VLLMEngine.push_weights`), another architecture gets an engine
    of its own."""

    name = "eval generate"
    type = "🧪 - EVAL"

    def __init__(self, manifest: Manifest, output_dir: str, schema, models: dict[str, EvalModel],
                 tokenizer_dir: str):
        super().__init__(output_dir, schema, manifest.eval.chunk_size)
        self.manifest, self.models, self.tokenizer_dir = manifest, models, tokenizer_dir
        cfg = manifest.eval
        self.sampling = Sampling(max_tokens=cfg.max_new_tokens or manifest.shard.suffix_tokens,
                                 temperature=cfg.temperature)
        self.current: EvalModel | None = None  # whose weights the engine holds
        self.engine_dir: Path | None = None  # the directory the engine was started from

    def start_engine(self) -> Engine:
        from pipeline.engines.vllm_engine import VLLMEngine

        started = time.perf_counter()
        directory = self.engine_dir = hf_dir(self.current, Path(self.tokenizer_dir))
        self.stat_update("export_ms", value=int((time.perf_counter() - started) * 1000))
        # A small model trained from scratch may have a shorter context than eval.max_model_len:
        # prompts that do not fit it get status too_long. Unset: the checkpoint's own context.
        wanted, context = self.manifest.eval.max_model_len, model_context(directory)
        return VLLMEngine(directory, max_model_len=min(wanted, context) if wanted and context else wanted,
                          seed=self.manifest.run.seed + self.rank, model_id=f"eval:{self.current.name}")

    def process(self, rows: list[dict]) -> list[dict]:
        out, tokenizer = [], load_tokenizer(self.tokenizer_dir)
        for name, group in groupby(rows, key=lambda r: r["checkpoint"]):
            group = list(group)
            if self.current is None or self.current.name != name:
                self._switch_to(self.models[name])
            engine, started = self.engine, time.perf_counter()
            # A prefix longer than the model's context leaves room for the continuation keeps
            # its last ids, as the trainer's max_seq_len does (the judge still sees all of it).
            room = engine.max_model_len - max(self.sampling.max_tokens, max(len(r["reference_ids"]) for r in group))
            group = [{**r, "prefix_ids": r["prefix_ids"][-room:] if room > 0 else r["prefix_ids"]} for r in group]
            answered = mc_rows([r for r in group if r["prompt_set"] == "mc"], engine, tokenizer, self.current) \
                if any(r["prompt_set"] == "mc" for r in group) else []
            group = [r for r in group if r["prompt_set"] != "mc"]
            results = engine.generate([Request(r["prompt_id"], prompt_ids=tuple(r["prefix_ids"])) for r in group],
                                      self.sampling) if group else []
            scored = [i for i, r in enumerate(group) if r["reference_ids"]]
            nll = dict(zip(scored, engine.score([group[i]["prefix_ids"] + group[i]["reference_ids"] for i in scored],
                                                [len(group[i]["prefix_ids"]) for i in scored])))
            self.count("engine_ms", int((time.perf_counter() - started) * 1000))
            if len(results) > 1 and all(r.status == "error" for r in results):
                raise StageFailed(f"eval: all {len(results)} requests of a chunk failed for checkpoint {name!r}, "
                                  f"e.g. {results[0].error}")
            for row in generation_rows(group, results, nll, self.current, tokenizer) + answered:
                self.count(f"status_{row['status']}")
                self.count("completion_tokens", row["completion_tokens"])
                out.append(row)
        return out


    def _switch_to(self, model: EvalModel) -> None:
        """Make the engine hold ``model``'s weights: pushed when it is running and of the same
        architecture, else (the first checkpoint, or another architecture) a new engine later."""
        if self._engine is not None:
            started = time.perf_counter()
            directory = hf_dir(model, Path(self.tokenizer_dir))
            weights = hf_weights(directory) if same_architecture(self.engine_dir, directory) else None
            if weights is not None:
                self._engine.push_weights(weights.items())
                self.stat_update("weight_push_ms", value=int((time.perf_counter() - started) * 1000))
                self.current = model
                return
        EngineStep.finish(self)  # the previous checkpoint's engine
        self.current = model

    def finish(self) -> None:
        super().finish()
        self.current = None


@dataclass
class GenerationsPlan:
    manifest: Manifest
    stage: StageDir
    shard_dir: Path
    tokenizer_dir: Path
    models: dict[str, EvalModel]
    prompts: dict[str, int]  # prompt set -> prompts that exist (held-out: at most eval.heldout_prompts)

    def shortfall(self) -> str | None:
        """Why fewer held-out prompts are used than ``eval.heldout_prompts`` asks, or None."""
        asked, found = self.manifest.eval.heldout_prompts, self.prompts.get("heldout", 0)
        if found >= asked:
            return None
        return (f"eval: the held-out table ({self.shard_dir / 'heldout'}) has {found} pairs, eval.heldout_prompts "
                f"asks {asked}: all {found} are used (raise shard.eval_fraction for more)")

    def pipeline(self) -> list:
        m = self.manifest
        prov = provenance(
            stage=STAGE, table="eval_generations", manifest_fingerprint=fingerprint(m),
            stage_fingerprint=self.stage.fingerprint,
            models={name: {"ref": e.ref, "path": e.directory, "weights_sha": e.weights_sha}
                    for name, e in self.models.items()},
            settings=m.eval.model_dump(),
        )
        return [CheckpointPrompts(m, str(self.shard_dir), str(self.tokenizer_dir), list(self.models)),
                GenerateStep(m, str(self.stage.path), with_provenance(EVAL_GENERATIONS, prov), self.models,
                             str(self.tokenizer_dir))]


def plan_eval_generations(manifest: Manifest) -> GenerationsPlan:
    """Raises ModelNotFound (a checkpoint missing) or StageFailed (the shard stage not complete,
    or no prompts), before anything is written."""
    shard = plan_shard(manifest)
    shard.stage.check_upstream_of("eval")
    prompts: dict[str, int] = {}
    for p in eval_prompts(manifest, shard.stage.path, shard.tokenizer_dir):
        prompts[p["prompt_set"]] = prompts.get(p["prompt_set"], 0) + 1
    models = eval_models(manifest)
    view = {k: v for k, v in fingerprinted_view(manifest, ("eval", "run.seed", "shard.suffix_tokens")).items()
            if not any(k == s or k.startswith(s + ".") for s in _NOT_GENERATION)}
    view.update({"upstream.shard": shard.stage.fingerprint,
                 **{f"model.{name}": e.weights_sha for name, e in models.items()}})
    tasks = min(manifest.executor.for_stage("eval").tasks, len(models))
    layout = {"executor.tasks": tasks, "eval.chunk_size": manifest.eval.chunk_size}
    return GenerationsPlan(manifest, StageDir(manifest, STAGE, "eval_generations", view, layout), shard.stage.path,
                           shard.tokenizer_dir, models, prompts)


def generations_summary(plan: GenerationsPlan, elapsed_s: float | None) -> dict:
    stats, task_stats = chunk_stats(plan.stage.path), plan.stage.merged_stats()
    g = pl.from_arrow(read_table(plan.stage.path, columns=["checkpoint", "prompt_set", "status", "completion_tokens"]))
    summary = {
        "checkpoints": {name: {"ref": e.ref, "weights_sha": e.weights_sha} for name, e in plan.models.items()},
        "prompts": {s: int(n) for s, n in g.filter(pl.col("checkpoint") == next(iter(plan.models)))
                    .group_by("prompt_set").len().sort("prompt_set").iter_rows()},
        "status_counts": {s: int((g["status"] == s).sum()) for s in EVAL_STATUSES},
        "completion_tokens": int(g["completion_tokens"].sum()),
        "engine_s": round(stats.get("engine_ms", 0) / 1000, 2),
        "engine_start_s": round(task_stats.get("engine_start_ms", 0) / 1000, 2),
        "export_s": round(task_stats.get("export_ms", 0) / 1000, 2),
        "weight_push_s": round(task_stats.get("weight_push_ms", 0) / 1000, 2),
    }
    if elapsed_s:
        summary["elapsed_s"] = round(elapsed_s, 2)
    return summary


def finalize_generations(manifest: Manifest, elapsed_s: float | None = None) -> dict:
    plan = plan_eval_generations(manifest)
    prompts = [p["prompt_id"] for p in eval_prompts(manifest, plan.shard_dir, plan.tokenizer_dir)]
    require_each_key_once(plan.stage.path, ["checkpoint", "prompt_id"], {(c, p) for c in plan.models for p in prompts},
                          f"{len(plan.models)} checkpoints x {len(prompts)} prompts")
    notes = ("One row per (checkpoint, prompt): the checkpoint's continuation of the prompt's prefix ids "
             "(`text` decoded after them) and, for held-out prompts, its summed loss on the true suffix.\n\n"
             f"Checkpoints: {json.dumps({n: e.directory for n, e in plan.models.items()})}")
    return write_card(plan.stage, generations_summary(plan, elapsed_s), notes)


def generations_job(manifest: Manifest) -> StageJob:
    plan = plan_eval_generations(manifest)
    return StageJob(plan.stage, plan.pipeline(), partial(finalize_generations, manifest))


def summary_line(card: dict) -> str:
    s = card["summary"]
    counts = ", ".join(f"{k} {v}" for k, v in s["status_counts"].items() if v)
    return (f"eval generations: {len(s['checkpoints'])} checkpoints x {sum(s['prompts'].values())} prompts "
            f"({counts}); {s['completion_tokens']} tokens in {s['engine_s']} s")
