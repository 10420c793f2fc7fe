"""An engine that renders and counts prompts and answers nothing: exact dry-run costs.

A stage runs its own code (candidates, criteria, orders, prompts) over its inputs with a
:class:`CallCounter` in place of the model, so calls and prompt tokens are counted exactly,
not estimated: each prompt is rendered with the model's own chat template and tokenizer.
Completion tokens can only be bounded: a verdict may stop early, so the bound is
samples x ``max_tokens`` per generate call.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.engines.base import Engine, Request, Result, Sampling, chat_prompt_ids


class CallCounter(Engine):
    """An engine that renders and counts prompts and returns no answers."""

    def __init__(self, model_dir: Path | None, model_id: str, max_model_len: int):
        self.model_id, self.max_model_len = model_id, max_model_len
        self.tokenizer = None
        if model_dir is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.max_completion_tokens = 0
        # Every call as the engine would get it (token ids + settings): the judge benchmark
        # replays them through bare vLLM.
        self.calls: list[dict] = []

    def prompt_ids(self, request: Request) -> list[int]:
        return chat_prompt_ids(self.tokenizer, request) if self.tokenizer is not None else []

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Result]:
        self.max_completion_tokens += len(requests) * sampling.n * sampling.max_tokens
        prompts = [self.prompt_ids(r) for r in requests]
        self.calls.append({"kind": "generate", "prompts": prompts, "sampling": sampling.as_dict()})
        return [Result(r.id, texts=[""] * sampling.n, prompt_tokens=len(p)) for r, p in zip(requests, prompts)]

    def next_token_logprobs(self, sequences: list[list[int]], token_ids: list[int]) -> list[None]:
        self.calls.append({"kind": "next_token_logprobs", "prompts": sequences, "token_ids": list(token_ids)})
        return [None] * len(sequences)

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[None]:
        self.calls.append({"kind": "score", "prompts": sequences, "starts": list(starts)})
        return [None] * len(sequences)
