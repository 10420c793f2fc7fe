"""Objectives against hand computation, masks, and LitGPT's own loss."""

import math

import pytest
import torch

from trainer.data import collate
from trainer.objectives import dpo_loss, ntp_loss, sequence_logprobs, target_logprobs


def test_collate_pads_right_masks_targets_and_trims_the_prefix_from_the_left():
    batch = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert batch["target_mask"].tolist() == [[False, False, False, True, True], [False, True, True, True, False]]
    trimmed = collate([[1, 2, 3, 4]], [[5, 6]], pad_id=0, max_len=4)
    assert trimmed["input_ids"].tolist() == [[3, 4, 5, 6]]
    with pytest.raises(ValueError, match="does not fit"):
        collate([[1]], [[2, 3, 4]], pad_id=0, max_len=2)


def test_sequence_logprobs_by_hand():
    # Vocabulary of 3; logits chosen so the softmax is easy to write down.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [9.0, 9.0, 9.0]]])
    ids = torch.tensor([[0, 2, 1, 1]])
    mask = torch.tensor([[False, True, True, False]])  # targets: the tokens at positions 1 and 2
    # token 1 (=2) scored by logits[0] (uniform): log 1/3 ; token 2 (=1) by logits[1]: 2 - logsumexp(1,2,3)
    expected = math.log(1 / 3) + (2 - math.log(math.exp(1) + math.exp(2) + math.exp(3)))
    assert sequence_logprobs(logits, ids, mask).item() == pytest.approx(expected, abs=1e-6)
    assert ntp_loss(logits, ids, mask).item() == pytest.approx(-expected / 2, abs=1e-6)


def test_prefix_and_padding_never_contribute():
    torch.manual_seed(0)
    batch = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    logits = torch.randn(2, 5, 10, requires_grad=True)
    loss = ntp_loss(logits, batch["input_ids"], batch["target_mask"])
    loss.backward()
    # Position t scores token t+1: only positions whose next token is a target get gradient.
    scoring = batch["target_mask"][:, 1:]
    grads = logits.grad.abs().sum(-1)
    assert (grads[:, :-1][~scoring] == 0).all() and (grads[:, :-1][scoring] > 0).all()
    assert (grads[:, -1] == 0).all()
    # Changing the padding token id changes nothing.
    other = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=7)
    assert torch.equal(sequence_logprobs(logits, batch["input_ids"], batch["target_mask"]),
                       sequence_logprobs(logits, other["input_ids"], other["target_mask"]))


def test_dpo_loss_by_hand():
    out = dpo_loss(torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0]),
                   torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -2.0]), beta=0.5)
    # pair 1: 0.5*((-1+2) - (-3+2)) = 1.0 ; pair 2: 0.5*(0 - 0) = 0
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(0.5)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.tolist() == [0.5, 0.0] and out.rejected_rewards.tolist() == [-0.5, 0.0]
    assert out.accuracy.item() == 0.5 and out.margin.item() == pytest.approx(0.5)


def test_ntp_equals_litgpts_own_loss_on_a_tiny_model():
    from litgpt import GPT, Config
    from litgpt.utils import chunked_cross_entropy

    torch.manual_seed(0)
    config = Config(block_size=32, vocab_size=50, padded_vocab_size=64, n_layer=2, n_head=2, n_embd=16,
                    bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=32)
    model = GPT(config)
    batch = collate([[1, 2, 3, 4], [5, 6]], [[7, 8, 9], [10, 11, 12, 13]], pad_id=0)
    logits = model(batch["input_ids"])
    targets = batch["input_ids"][:, 1:].clone()
    targets[~batch["target_mask"][:, 1:]] = -100  # LitGPT's ignore index
    theirs = chunked_cross_entropy(logits[:, :-1], targets, chunk_size=0)
    ours = ntp_loss(logits, batch["input_ids"], batch["target_mask"])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    every = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    only_targets = target_logprobs(logits, batch["input_ids"], batch["target_mask"])
    mask = batch["target_mask"][:, 1:]
    torch.testing.assert_close(only_targets[mask], every[mask])
    assert only_targets.shape == (2, 6) and (only_targets[~mask] == 0).all()
