"""`sip bench judge` (`make bench-judge`): the judge stage against bare vLLM making the same
calls, in the same run.

The bare side replays the exact engine calls the stage makes (recorded by running the
stage's own code with :class:`pipeline.engines.counter.CallCounter`: same token ids, same sampling
settings), each kind of call as one ``LLM.generate`` over all its prompts, in a fresh process
with the same engine arguments. The stage side is ``sip judge`` in a fresh process; its time
is its tasks' wall time minus engine start-up (reading, candidates, prompts, parsing, chunk
writes included). Rates are judged candidates/s and prompt tokens/s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pipeline.app.bench.fresh_process import bare_engine_spec, run_side, run_stage_process, start_bare_llm
from pipeline.app.bench.pairs import bench_pairs
from pipeline.manifest import Manifest


def replay_calls(llm, calls: list[dict]) -> float:
    """Make ``calls`` (recorded by :class:`~pipeline.engines.counter.CallCounter`: generate,
    next-token log-probs, score) through a bare ``vllm.LLM``, each as one ``generate`` over all
    its prompts; returns the seconds they took."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    for call in calls:
        if call["kind"] == "generate":
            s = call["sampling"]
            params = SamplingParams(max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                                    n=s["n"], stop=s["stop"] or None)
        elif call["kind"] == "next_token_logprobs":
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(call["token_ids"]),
                                    logprob_token_ids=call["token_ids"])
        else:  # score
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in call["prompts"]], params, use_tqdm=False)
    return time.perf_counter() - started


def bare_vllm_side(spec: dict) -> dict:
    """The recorded calls through bare ``vllm.LLM``."""
    llm, start_s = start_bare_llm(spec)
    return {"start_s": start_s, "generate_s": replay_calls(llm, spec["calls"])}


def bench_judge(manifest: Manifest, pairs: int = 48) -> dict:
    """The judge stage's candidates/s and prompt tokens/s vs bare vLLM making the same calls.

    The judge's upstream stages (rewrite, rollout) run first on ``pairs`` pairs, untimed.
    """
    from pipeline.app.registry import run_stages
    from stages.judge import plan_judge
    from stages.judge import count_judge_calls

    with tempfile.TemporaryDirectory() as tmp:
        m = bench_pairs(manifest, Path(tmp), pairs)
        run_stages(m, ["rewrite", "rollout"], log=lambda _m: None)  # the judge's upstream (not timed)
        counted = count_judge_calls(plan_judge(m))
        spec = {**bare_engine_spec(m, "judge"), "calls": counted["engine_calls"]}
        bare = run_side(bare_vllm_side, spec, Path(tmp), "bare-vllm-judge")

        stage_wall, summary = run_stage_process(m, "judge", Path(tmp))

    stage_s = summary["elapsed_s"] - summary["engine_start_s"]
    tokens, judged = counted["prompt_tokens"], summary["candidates"]
    return {
        "pairs": pairs,
        "candidates": judged,
        "engine_calls": summary["judge_calls"],
        "prompt_tokens": tokens,
        "modes": summary["modes"],
        "bare_vllm": {"engine_start_s": round(bare["start_s"], 1), "seconds": round(bare["generate_s"], 2),
                      "candidates_per_s": round(judged / bare["generate_s"], 2),
                      "prompt_tokens_per_s": round(tokens / bare["generate_s"], 1)},
        "sip_judge": {"engine_start_s": summary["engine_start_s"], "tasks_s_minus_start": round(stage_s, 2),
                      "engine_s": summary["engine_s"], "candidates_per_s": round(judged / stage_s, 2),
                      "prompt_tokens_per_s": round(tokens / stage_s, 1),
                      "prefix_cache_hit_rate": summary.get("prefix_cache_hit_rate"),
                      "process_wall_s_with_imports_and_card": round(stage_wall, 1)},
        "ratio_sip_over_bare": round(bare["generate_s"] / stage_s, 3),
    }
