"""Rollouts from the policy's *current* weights, in process (the online phase's CPU sampler).

K continuations of N tokens per prefix, sampled from the very module the trainer updates, so
there is no copy of the weights that could go stale. Each prefix is decoded on its own with
LitGPT's KV cache and a batch of its K samples: the K rows share one prefix length, which is
what LitGPT's cache supports (one ``input_pos`` for the batch; see
``litgpt.generate.base.batched_next_token``). The log-prob of every sampled token under the
model's unmodified distribution is kept, so the trainer can check after the fact that what it
trains on is what these weights produce (the sampler-vs-trainer gap).

Sampling follows vLLM's rules so the two samplers agree: temperature scales the logits,
top_p keeps the smallest set of tokens whose probability reaches top_p, temperature 0 is
greedy; a sample stops after the end-of-text token (kept in its ids, as the rollout stage
keeps it) or after N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """One rollout. ``token_ids``: at most N ids (the end-of-text id kept when sampled);
    ``logprobs``: each sampled id's log-prob (nats) under the model at temperature 1."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # length (N reached) | stop (end-of-text sampled)


def _filtered_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(K, V) sampling probabilities after temperature and nucleus (top_p) filtering."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p: the first token always stays.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.inference_mode()
def sample_continuations(model, prefix_ids: list[int], k: int, n: int, *, temperature: float = 1.0,
                         top_p: float = 1.0, eos_ids: frozenset[int] = frozenset(),
                         generator: torch.Generator | None = None) -> list[Sample]:
    """K samples of at most ``n`` tokens continuing ``prefix_ids`` under ``model``.

    Args:
        model: a ``litgpt.GPT`` (unwrapped: not a DDP/FSDP wrapper), in any train/eval mode;
            its KV cache is set for the call and cleared after.
        prefix_ids: the prefix's token ids (at least one).
        k, n: samples, and new tokens per sample.
        eos_ids: the end-of-text ids (:func:`pipeline.tokenizer.end_of_text_ids`): a sample
            stops after one, which it keeps.
        generator: the random source (seeded by the caller, so a step's samples are
            reproducible on any resume); must live on the model's device.

    Raises:
        ValueError: an empty prefix, or prefix + n longer than the model's context.
    """
    if not prefix_ids:
        raise ValueError("an empty prefix has nothing to continue")
    total = len(prefix_ids) + n
    if total > model.config.block_size:
        raise ValueError(f"prefix of {len(prefix_ids)} tokens + {n} new ones exceeds the model's context "
                         f"({model.config.block_size})")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.set_kv_cache(batch_size=k, max_seq_length=total, device=device)
    try:
        x = torch.tensor(prefix_ids, dtype=torch.long, device=device).unsqueeze(0).expand(k, -1)
        logits = model(x, torch.arange(len(prefix_ids), device=device))[:, -1].float()
        ids, logps = [], []
        done = torch.zeros(k, dtype=torch.bool, device=device)
        for t in range(n):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(_filtered_probs(logits, temperature, top_p), 1, generator=generator).squeeze(1)
            ids.append(nxt)
            logps.append(torch.log_softmax(logits, -1).gather(1, nxt[:, None]).squeeze(1))
            for eos in eos_ids:
                done |= nxt == eos
            if t == n - 1 or bool(done.all()):
                break
            pos = torch.tensor([len(prefix_ids) + t], device=device)
            logits = model(nxt[:, None], pos)[:, -1].float()
    finally:
        model.clear_kv_cache()
        model.train(was_training)
    ids_t, logps_t = torch.stack(ids, 1).tolist(), torch.stack(logps, 1).tolist()
    out = []
    for row_ids, row_logps in zip(ids_t, logps_t):
        end = next((i + 1 for i, t in enumerate(row_ids) if t in eos_ids), len(row_ids))
        out.append(Sample(row_ids[:end], row_logps[:end], "stop" if row_ids[end - 1] in eos_ids else "length"))
    return out
