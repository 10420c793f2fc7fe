"""What the judge stage will cost, counted before any judge call (`sip judge --dry-run`).

The count runs the stage's own code (candidates, deduplication, criteria, orders, prompts)
over every pair with a :class:`CallCounter` in place of the model, so calls and prompt
tokens are exact, not estimated: the counter renders each prompt with the judge's own chat
template and tokenizer and answers nothing. Completion tokens can only be bounded: a verdict
may stop early, so the bound is samples x ``max_new_tokens`` per verdict call.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.engines.base import Engine, Request, Result, Sampling, chat_prompt_ids
from pipeline.io import read_table, table_files


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


def count_judge_calls(plan) -> dict | str:
    """Calls and tokens the judge stage of ``plan`` (a ``JudgePlan``) will make, or why they
    cannot be counted yet (its upstream tables do not exist)."""
    from stages.criteria import Judge

    # Complete upstream stages only (a stage writes its card last): a partial table would
    # undercount.
    upstream = [("shard", plan.pairs_dir), ("rewrite", plan.rewrites_dir)]
    if plan.rollouts_dir is not None:
        upstream.append(("rollout", plan.rollouts_dir))
    missing = [name for name, path in upstream if not (Path(path) / "card.json").is_file() or not table_files(path)]
    if missing:
        return f"calls and tokens are counted once {' and '.join(missing)} have run"
    manifest = plan.manifest
    ref = manifest.judge
    local = ref.kind != "endpoint"
    model_dir = None
    if local:
        from pipeline.models import resolve_model_dir

        model_dir = resolve_model_dir(manifest, ref.model, "judge.model")
    counter = CallCounter(model_dir, plan.model.get("name", ref.model), ref.max_model_len)
    step = plan.pipeline()[1]
    step._judge = Judge(counter, manifest.judging, manifest.run.seed)
    pairs = read_table(plan.pairs_dir, columns=["pair_id", "prefix", "suffix"]).to_pylist()
    candidates = 0
    for start in range(0, len(pairs), step.chunk_size):
        candidates += len(step.process(pairs[start : start + step.chunk_size]))
    c = step._judge.counters
    return {
        "engine_calls": counter.calls,
        "pairs": len(pairs),
        "candidates": candidates,
        "judge_calls": c.calls,
        "prompt_tokens": c.prompt_tokens if local else None,
        "max_completion_tokens": counter.max_completion_tokens,
    }


def describe_judge_cost(plan) -> str:
    counted = count_judge_calls(plan)
    if isinstance(counted, str):
        return f"judge: {counted}"
    tokens = f"{counted['prompt_tokens']:,} prompt tokens" if counted["prompt_tokens"] is not None else \
        "prompt tokens unknown (an endpoint judge's tokenizer is not local)"
    return (f"judge: {counted['judge_calls']:,} judge calls for {counted['candidates']:,} candidates of "
            f"{counted['pairs']:,} pairs; {tokens}; at most {counted['max_completion_tokens']:,} completion tokens")
