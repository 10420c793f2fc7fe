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
        if peak_flops:
            out["mfu"] = 6 * params * tokens_per_s / (peak_flops * world_size)  # 6N FLOPs per token (fwd+bwd)
        return out
