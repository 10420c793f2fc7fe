"""`sip bench rewrite` (`make bench-rewrite`): the rewrite stage against bare vLLM on the same
prompts and settings, in the same run, on the same machine."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pipeline.app.bench.fresh_process import bare_engine_spec, run_side, run_stage_process, start_bare_llm
from pipeline.app.bench.pairs import bench_pairs
from pipeline.io import read_table
from pipeline.manifest import Manifest


def bare_vllm_side(spec: dict) -> dict:
    """Bare ``vllm.LLM`` on the stage's prompts (chat template + prefill) and sampling settings."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm, start_s = start_bare_llm(spec)
    tok = llm.get_tokenizer()
    prompts = [
        TokensPrompt(prompt_token_ids=tok.encode(
            tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) + r["prefill"],
            add_special_tokens=False))
        for r in spec["requests"]
    ]
    params = SamplingParams(**spec["sampling"])
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"start_s": start_s, "generate_s": gen_s, "output_tokens": tokens}


def bench_rewrite(manifest: Manifest, pairs: int = 64, with_server: bool = True) -> dict:
    """The rewrite stage's output tokens/s vs bare vLLM on the same prompts, same settings.

    Both run in fresh processes one after the other on this machine. With ``with_server``
    the same requests also go through ``vllm serve`` + the endpoint engine (the HTTP path
    datatrove's InferenceRunner would take), to compare the two ways of driving vLLM. Engine
    start-up is reported separately; the stage's time is its tasks' wall time (datatrove
    executor, reading pairs, prompts, generation, post-processing, chunk writes) minus its
    engine start.
    """
    from stages.rewrite import plan_rewrite

    with tempfile.TemporaryDirectory() as tmp:
        m = bench_pairs(manifest, Path(tmp), pairs)
        table = read_table(m.stage_dir("shard"))
        step = plan_rewrite(m).step()
        rows = table.select(["pair_id", "prefix", "suffix"]).to_pylist()
        requests = [step.request(r)[0] for r in rows]
        spec = {
            **bare_engine_spec(m, "rewriter"),
            "requests": [{"messages": list(r.messages), "prefill": r.prefill} for r in requests],
            "sampling": {"max_tokens": step.sampling.max_tokens, "temperature": step.sampling.temperature,
                         "top_p": step.sampling.top_p, "stop": list(step.sampling.stop) or None},
        }
        bare = run_side(bare_vllm_side, spec, Path(tmp), "bare-vllm")

        server = None
        if with_server:
            from pipeline.engines.endpoint import EndpointEngine
            from pipeline.engines.server import vllm_server

            with vllm_server(spec["model"], served_name="bench", max_model_len=spec["engine"]["max_model_len"],
                             log_path=Path(tmp) / "server.log") as url:
                engine = EndpointEngine(url, "bench", concurrency=len(requests))
                started = time.perf_counter()
                results = engine.generate(requests, step.sampling)
                http_s = time.perf_counter() - started
            http_tokens = sum(r.completion_tokens or 0 for r in results)
            server = {"generate_s": round(http_s, 2), "output_tokens": http_tokens,
                      "output_tokens_per_s": round(http_tokens / http_s, 1)}

        stage_wall, summary = run_stage_process(m, "rewrite", Path(tmp))

    stage_s = summary["elapsed_s"] - summary["engine_start_s"]
    bare_tps = bare["output_tokens"] / bare["generate_s"]
    stage_tps = summary["completion_tokens"] / stage_s
    return {
        "pairs": pairs,
        "bare_vllm": {"engine_start_s": round(bare["start_s"], 1), "generate_s": round(bare["generate_s"], 2),
                      "output_tokens": bare["output_tokens"], "output_tokens_per_s": round(bare_tps, 1)},
        "sip_rewrite": {"engine_start_s": summary["engine_start_s"], "tasks_s_minus_start": round(stage_s, 2),
                        "engine_generate_s": summary["engine_s"], "output_tokens": summary["completion_tokens"],
                        "output_tokens_per_s": round(stage_tps, 1),
                        "process_wall_s_with_imports_and_card": round(stage_wall, 1)},
        "ratio_sip_over_bare": round(stage_tps / bare_tps, 3),
        **({"vllm_serve_http": {**server, "ratio_over_bare": round(server["output_tokens_per_s"] / bare_tps, 3)}}
           if server else {}),
    }
