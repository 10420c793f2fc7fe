"""Training objectives on suffix tokens given the prefix (METHOD.md, "Training").

A batch holds ``input_ids`` (B, T): prefix followed by a target suffix, right-padded, and
``target_mask`` (B, T): True where the *token* at that position is a target (suffix) token.
Logits at position t predict token t+1, so a target token at t+1 is scored by logits[t].
Prefix and padding never contribute to any loss.

- ``ntp``: next-token loss over the target tokens (the baseline; with the whole window as
  target it is plain pretraining);
- ``rf_nll``: the same loss on the best-judged candidate (reward-filtered NLL);
- ``dpo``: -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]) on sequence log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def target_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1): the target tokens' log-probs, 0 elsewhere.

    The log-softmax over the vocabulary runs only at the positions that predict a target
    token: a suffix of 48 tokens after a 200-token prefix costs 48 rows, not 248 (with a
    49k vocabulary that is most of the step's non-model work).
    """
    mask = target_mask[:, 1:]
    picked = logits[:, :-1][mask].float().log_softmax(-1)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    out[mask] = picked.gather(-1, input_ids[:, 1:][mask].unsqueeze(-1)).squeeze(-1)
    return out


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """(B,): sum of the target tokens' log-probs."""
    return target_logprobs(logits, input_ids, target_mask).sum(-1)


def mean_nll(per_token: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean negative log-likelihood from :func:`target_logprobs` (B, T-1)."""
    count = target_mask[:, 1:].sum()
    if count == 0:
        raise ValueError("batch has no target tokens")
    return -per_token.sum() / count


def ntp_loss(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over all target tokens of the batch (token-weighted)."""
    return mean_nll(target_logprobs(logits, input_ids, target_mask), target_mask)


@dataclass
class DPOOutput:
    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (pi_c - ref_c), per pair
    rejected_rewards: torch.Tensor
    margin: torch.Tensor  # mean of chosen - rejected rewards
    accuracy: torch.Tensor  # fraction of pairs with chosen reward > rejected reward


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> DPOOutput:
    """DPO (Rafailov et al., 2023) on sequence log-probs of shape (B,)."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return DPOOutput(
        loss=loss,
        chosen_rewards=chosen.detach(),
        rejected_rewards=rejected.detach(),
        margin=(chosen - rejected).detach().mean(),
        accuracy=(chosen > rejected).float().mean().detach(),
    )
