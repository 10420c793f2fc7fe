"""Turning sip tables into training batches: prefix + target, right-padded, with a target mask.

Right padding is safe for LitGPT's causal models: padding comes after every real token, so
it cannot change what a real position attends to, and the mask keeps it out of every loss.
"""

from __future__ import annotations

import torch

# The truncation rule of :func:`fit_prefix`, by name: what a DPO pair's context is when it is too
# long (trainer/steps.py ``pair_batch``). It is an input of the reference fingerprint
# (trainer/ref_logps.py): log-probs stored under one rule are never used under another, so a
# change to how a pair's prefix is trimmed must come with a new name here. The old rule,
# "prefix-left-per-row", trimmed each side to fit its own target, so the two sides of a pair
# could continue different contexts.
TRUNCATION = "prefix-left-shared-by-pair"


def fit_prefix(prefix: list[int], target_len: int, max_len: int | None) -> list[int]:
    """The last tokens of ``prefix`` that fit before a target of ``target_len`` tokens in ``max_len``.

    The prefix loses tokens from its left: the target (what is trained on) and the context
    nearest to it are kept. ``max_len`` None keeps the whole prefix. Several targets that
    continue one context (a DPO pair's chosen and rejected) pass the longest one's length, so
    every one of them sees the same prefix tokens.

    Raises:
        ValueError: the target alone is longer than ``max_len``.
    """
    if max_len is None:
        return list(prefix)
    if target_len > max_len:
        raise ValueError(f"target of {target_len} tokens does not fit max_len {max_len}")
    return list(prefix[max(0, len(prefix) + target_len - max_len):])


def collate(
    prefixes: list[list[int]], targets: list[list[int]], *, pad_id: int, max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Batch ``prefix + target`` sequences, each row's prefix trimmed to fit its own target
    (:func:`fit_prefix`); a DPO pair's shared prefix is trimmed before, by ``pair_batch``.

    Returns:
        ``input_ids`` (B, T) long and ``target_mask`` (B, T) bool.

    Raises:
        ValueError: the lists differ in length, a target is empty or longer than ``max_len``.
    """
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    rows = []
    for prefix, target in zip(prefixes, targets):
        if not target:
            raise ValueError("empty target")
        rows.append((fit_prefix(prefix, len(target), max_len), list(target)))
    width = max(len(p) + len(t) for p, t in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prefix, target) in enumerate(rows):
        seq = prefix + target
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        target_mask[i, len(prefix) : len(seq)] = True
    return {"input_ids": input_ids, "target_mask": target_mask}
