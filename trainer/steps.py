"""One micro-batch of each objective: examples -> loss and the metrics it contributes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from trainer.data import collate, fit_prefix
from trainer.objectives import dpo_loss, mean_nll, sequence_logprobs, target_logprobs


@dataclass
class MicroBatch:
    """What one micro-batch trains on.

    ``examples``: dicts with ``prefix`` and ``target`` (ntp, rf_nll) or ``chosen`` and
    ``rejected`` (dpo) token ids; ``ref``: the DPO reference's sequence log-probs of the chosen
    and rejected suffixes, (B,) each; ``stats``: an online micro-batch's sums for the metrics
    window (None for a table's rows).
    """

    examples: list[dict]
    ref: tuple[torch.Tensor, torch.Tensor] | None = None
    stats: dict | None = None


def pair_prefix(example: dict, max_len: int) -> list[int]:
    """The prefix tokens both sides of a DPO pair continue: its last ``max_len - max(len(chosen),
    len(rejected))``. DPO compares two continuations of one context, so the pair is trimmed once,
    to fit its longer side, never each side to fit itself."""
    return fit_prefix(example["prefix"], max(len(example["chosen"]), len(example["rejected"])), max_len)


def pair_batch(examples: list[dict], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, in one batch (one forward pass for both), each pair's two
    rows on its :func:`pair_prefix`: ``input_ids`` and ``target_mask``, (2B, T) each."""
    prefixes = [pair_prefix(e, max_len) for e in examples] * 2
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
    """ntp / rf_nll: token-mean NLL of the targets. Metrics: tokens read and trained on, and each
    sequence's summed target log-prob (nats; the online phase compares them with the sampler's)."""
    batch = collate([e["prefix"] for e in examples], [e["target"] for e in examples], pad_id=pad_id, max_len=max_len)
    ids, mask = batch["input_ids"].to(device), batch["target_mask"].to(device)
    per_token = target_logprobs(model(ids), ids, mask)
    loss = mean_nll(per_token, mask)
    stats = {"tokens": sum(min(len(e["prefix"]) + len(e["target"]), max_len) for e in examples),
             "target_tokens": int(mask[:, 1:].sum()), "seq_logps": per_token.detach().sum(-1).tolist()}
    stats["sources"] = Counter(e["source"] for e in examples if "source" in e)
    return loss, stats


def dpo_step(model, examples: list[dict], ref: tuple[torch.Tensor, torch.Tensor], beta: float, pad_id: int,
             max_len: int, device) -> tuple[torch.Tensor, dict]:
    """DPO against precomputed reference log-probs ``ref`` = (chosen, rejected), each (B,)."""
    chosen, rejected = pair_logps(model, examples, pad_id, max_len, device)
    out = dpo_loss(chosen, rejected, ref[0].to(device), ref[1].to(device), beta=beta)
    stats = {
        "tokens": sum(2 * len(pair_prefix(e, max_len)) + len(e["chosen"]) + len(e["rejected"]) for e in examples),
        "target_tokens": sum(len(e["chosen"]) + len(e["rejected"]) for e in examples),
        "margin_sum": float(out.margin) * len(examples),
        "correct": float(out.accuracy) * len(examples),
        "pairs": len(examples),
        "sources": Counter(e["chosen_source"] for e in examples),
        "seq_logps": chosen.detach().tolist() + rejected.detach().tolist(),  # chosen rows, then rejected rows
    }
    return out.loss, stats
