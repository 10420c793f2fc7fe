"""`sip bench judge`: the judge stage against bare vLLM doing the same calls, same run.

The bare side replays the exact engine calls the stage makes (recorded by running the
stage's own code with :class:`pipeline.engines.counter.CallCounter`: same token ids, same sampling
settings), each kind of call as one ``LLM.generate`` over all its prompts, in a fresh process
with the same engine arguments. The stage side is ``sip judge`` in a fresh process; its time
is its tasks' wall time minus engine start-up (reading, candidates, prompts, parsing, chunk
writes included). Rates are judged candidates/s and prompt tokens/s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.manifest import Manifest


def _bare_judge(spec_path: str) -> None:
    """Subprocess: the recorded calls through bare ``vllm.LLM``."""
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    from pipeline.engines.vllm_env import configure_vllm_env

    configure_vllm_env()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.engines.vllm_engine import llm_kwargs

    llm = LLM(**llm_kwargs(spec["model"], **spec["engine"]))
    start_s = time.perf_counter() - started
    started = time.perf_counter()
    for call in spec["calls"]:
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
    Path(spec_path + ".out").write_text(json.dumps({"start_s": start_s, "generate_s": time.perf_counter() - started}))


def bench_judge(manifest: Manifest, pairs: int = 48) -> dict:
    from pipeline.models import resolve_model_dir
    from stages.bench import bench_pairs, run_stage_process
    from stages.judge import plan_judge
    from stages.judge import count_judge_calls
    from stages.registry import run_stages

    with tempfile.TemporaryDirectory() as tmp:
        m = bench_pairs(manifest, Path(tmp), pairs)
        run_stages(m, ["rewrite", "rollout"], log=lambda _m: None)  # the judge's upstream (not timed)
        counted = count_judge_calls(plan_judge(m))
        ref = m.judge
        spec = {
            "model": str(resolve_model_dir(m, ref.model, "judge.model")),
            "engine": {"max_model_len": ref.max_model_len, "dtype": ref.dtype, "seed": m.run.seed,
                       "gpu_memory_utilization": ref.gpu_memory_utilization,
                       "tensor_parallel_size": ref.tensor_parallel_size},
            "calls": counted["engine_calls"],
        }
        spec_path = Path(tmp) / "judge_spec.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([sys.executable, "-m", "stages.bench_judge", str(spec_path)], capture_output=True, check=True)
        bare = json.loads(Path(f"{spec_path}.out").read_text())

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


if __name__ == "__main__":  # the bare-vLLM side, in its own process
    _bare_judge(sys.argv[1])
