"""One micro-batch of each objective: examples -> loss and the metrics it contributes."""

from __future__ import annotations

from collections import Counter

import torch

from trainer.data import collate
from trainer.objectives import dpo_loss, ntp_loss, sequence_logprobs


def pair_batch(examples: list[dict], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, in one batch (one forward pass for both)."""
    prefixes = [e["prefix"] for e in examples] * 2
    targets = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    return collate(prefixes, targets, pad_id=pad_id, max_len=max_len)


def pair_logps(model, examples: list[dict], pad_id: int, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs (B,) of the chosen and of the rejected suffixes under ``model``."""
    batch = pair_batch(examples, pad_id, max_len)
    ids, mask = batch["input_ids"].to(device), batch["target_mask"].to(device)
    logps = sequence_logprobs(model(ids), ids, mask)
    half = len(examples)
    return logps[:half], logps[half:]


def nll_step(model, examples: list[dict], pad_id: int, max_len: int, device) -> tuple[torch.Tensor, dict]:
    """ntp / rf_nll: token-mean NLL of the targets. Metrics: tokens read and trained on."""
    batch = collate([e["prefix"] for e in examples], [e["target"] for e in examples], pad_id=pad_id, max_len=max_len)
    ids, mask = batch["input_ids"].to(device), batch["target_mask"].to(device)
    loss = ntp_loss(model(ids), ids, mask)
    stats = {"tokens": sum(min(len(e["prefix"]) + len(e["target"]), max_len) for e in examples),
             "target_tokens": int(mask[:, 1:].sum())}
    stats["sources"] = Counter(e["source"] for e in examples if "source" in e)
    return loss, stats


def dpo_step(model, examples: list[dict], ref: tuple[torch.Tensor, torch.Tensor], beta: float, pad_id: int,
             max_len: int, device) -> tuple[torch.Tensor, dict]:
    """DPO against precomputed reference log-probs ``ref`` = (chosen, rejected), each (B,)."""
    chosen, rejected = pair_logps(model, examples, pad_id, max_len, device)
    out = dpo_loss(chosen, rejected, ref[0].to(device), ref[1].to(device), beta=beta)
    stats = {
        "tokens": sum(min(len(e["prefix"]) + len(e["chosen"]), max_len) + min(len(e["prefix"]) + len(e["rejected"]), max_len)
                      for e in examples),
        "target_tokens": sum(len(e["chosen"]) + len(e["rejected"]) for e in examples),
        "margin_sum": float(out.margin) * len(examples),
        "correct": float(out.accuracy) * len(examples),
        "pairs": len(examples),
        "sources": Counter(e["chosen_source"] for e in examples),
    }
    return out.loss, stats
