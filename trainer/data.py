"""Turning sip tables into training batches: prefix + target, right-padded, with a target mask.

Right padding is safe for LitGPT's causal models: padding comes after every real token, so
it cannot change what a real position attends to, and the mask keeps it out of every loss.
"""

from __future__ import annotations

import torch

# The truncation rule of :func:`collate`, by name. It is an input of the reference fingerprint
# (trainer/ref_logps.py): log-probs stored under one rule are never used under another, so a
# change to how ``collate`` trims must come with a new name here.
TRUNCATION = "prefix-left-per-row"


def collate(
    prefixes: list[list[int]], targets: list[list[int]], *, pad_id: int, max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Batch ``prefix + target`` sequences.

    When a sequence is longer than ``max_len``, the prefix loses tokens from its left: the
    target (what is trained on) and the context nearest to it are kept.

    Returns:
        ``input_ids`` (B, T) long and ``target_mask`` (B, T) bool.
    """
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    rows = []
    for prefix, target in zip(prefixes, targets):
        if not target:
            raise ValueError("empty target")
        if max_len is not None:
            if len(target) > max_len:
                raise ValueError(f"target of {len(target)} tokens does not fit max_len {max_len}")
            prefix = prefix[max(0, len(prefix) + len(target) - max_len):]
        rows.append((list(prefix), list(target)))
    width = max(len(p) + len(t) for p, t in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prefix, target) in enumerate(rows):
        seq = prefix + target
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        target_mask[i, len(prefix) : len(seq)] = True
    return {"input_ids": input_ids, "target_mask": target_mask}
