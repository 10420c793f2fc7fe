"""Training metrics: Fabric loggers (CSV, and TensorBoard via tensorboardX or tensorboard), throughput, memory, MFU.

Each process start (first run or resume) writes ``<train>/metrics/version_<n>/metrics.csv``;
a resumed run's rows continue the step numbering of the run it resumes.
"""

from __future__ import annotations

import importlib.util
import resource
import time
from collections import Counter
from pathlib import Path

import torch


def make_loggers(out_dir: Path) -> list:
    from lightning.fabric.loggers import CSVLogger

    loggers = [CSVLogger(root_dir=str(out_dir), name="metrics", flush_logs_every_n_steps=1)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=str(out_dir), name="tensorboard"))
    return loggers


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def available_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for the training dtype (GPUs only; None elsewhere)."""
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    if precision.startswith("bf16"):
        dtype = torch.bfloat16
    elif precision.startswith("16"):
        dtype = torch.float16
    else:
        dtype = torch.float32
    return get_available_flops(device, dtype)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Window:
    """What happened since the last logged step: losses, tokens, DPO and source statistics."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.steps, self.loss_sum, self.tokens, self.target_tokens = 0, 0.0, 0, 0
        self.pairs, self.correct, self.margin_sum = 0, 0.0, 0.0
        self.sources: Counter = Counter()
        self.online: Counter = Counter()  # online phases: sums of what the micro-batches sampled and judged

    def add(self, loss: float, stats: list[dict]) -> None:
        self.steps += 1
        self.loss_sum += loss
        for s in stats:
            self.tokens += s["tokens"]
            self.target_tokens += s["target_tokens"]
            self.sources.update(s["sources"])
            self.pairs += s.get("pairs", 0)
            self.correct += s.get("correct", 0.0)
            self.margin_sum += s.get("margin_sum", 0.0)
            for key, value in s.get("online", {}).items():
                if key == "logprob_gap_max_per_token":
                    self.online[key] = max(self.online[key], value)
                else:
                    self.online[key] += value

    def metrics(self, world_size: int, params: int, peak_flops: float | None) -> dict[str, float]:
        elapsed = max(1e-9, time.perf_counter() - self.started)
        tokens_per_s = self.tokens * world_size / elapsed  # every rank reads its own share
        out = {"loss_avg": self.loss_sum / max(1, self.steps), "tokens_per_s": tokens_per_s,
               "step_s": elapsed / max(1, self.steps)}
        if self.pairs:
            out["dpo_accuracy"] = self.correct / self.pairs
            out["dpo_margin"] = self.margin_sum / self.pairs
        total = sum(self.sources.values())
        for source, count in sorted(self.sources.items()):
            out[f"chosen_rate_{source}"] = count / total
        if self.online:
            out.update(online_metrics(self.online, self.steps))
        if peak_flops:
            out["mfu"] = 6 * params * tokens_per_s / (peak_flops * world_size)  # 6N FLOPs per token (fwd+bwd)
        return out


def online_metrics(o: Counter, steps: int) -> dict[str, float]:
    """The online phase's window metrics from :class:`Window`'s sums: which sources win among
    the online picks (every source listed, 0.0 included: the rollout chosen rate is the
    curriculum's signal; ``offline_mix`` rows are not picks and only counted), rewards, judge
    cost, and where a step's time goes."""
    from pipeline.schema import CANDIDATE_SOURCES

    picked = sum(o[f"chosen_{s}"] for s in CANDIDATE_SOURCES)
    out = {f"chosen_rate_{s}": o[f"chosen_{s}"] / picked if picked else 0.0 for s in CANDIDATE_SOURCES}
    usable = o["pick_usable"]
    if o["rejected_original"] + o["rejected_rewrite"] + o["rejected_rollout"]:
        out.update({f"rejected_rate_{s}": o[f"rejected_{s}"] / usable for s in CANDIDATE_SOURCES})
        out["reward_margin"] = o["reward_margin_sum"] / usable
    for s in CANDIDATE_SOURCES:
        if o[f"reward_count_{s}"]:
            out[f"reward_mean_{s}"] = o[f"reward_sum_{s}"] / o[f"reward_count_{s}"]
    prefixes = max(1, o["prefixes"])
    out.update({"prefixes_usable_rate": usable / prefixes, "prefixes_tie_rate": o["pick_tie"] / prefixes,
                "prefixes_single_rate": o["pick_single_candidate"] / prefixes,
                "candidates_per_prefix": o["candidates"] / prefixes,
                "judge_calls": o["judge_calls"], "judge_calls_per_prefix": o["judge_calls"] / prefixes,
                "judge_prompt_tokens": o["prompt_tokens"],
                "push_s": o["push_s"] / max(1, steps), "sample_s": o["sample_s"] / max(1, steps),
                "judge_s": o["judge_s"] / max(1, steps),
                "train_s": o["train_s"] / max(1, steps), "replayed_micro_batches": o["replayed"],
                "offline_rows": o["offline_rows"]})
    if o["sample_s"]:
        out["rollout_tokens_per_s"] = o["rollout_tokens"] / o["sample_s"]
    if o["logprob_gap_tokens"]:
        out["logprob_gap_per_token"] = o["logprob_gap_sum"] / o["logprob_gap_tokens"]
        out["logprob_gap_max_per_token"] = o["logprob_gap_max_per_token"]
    return out
