"""Benchmarks you can rerun (`sip bench shard`, `make bench`): the stage against the bare
library doing the same work, in the same run, on the same machine."""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from pipeline.io import read_table
from pipeline.manifest import Manifest, parse_manifest
from pipeline.tokenizer import load_tokenizer
from stages.shard import corpus_files, plan_shard, run_shard

_BATCH = 64


def _bare_tokenize(args: tuple[str, list[str]]) -> int:
    tok_dir, texts = args
    tok = load_tokenizer(tok_dir)
    tokens = 0
    for i in range(0, len(texts), _BATCH):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + _BATCH], add_special_tokens=False))
    return tokens


def _texts(manifest: Manifest) -> list[str]:
    from pipeline.corpus import CorpusReader

    files = corpus_files(manifest)
    reader = CorpusReader(files, text_key=manifest.corpus.text_key, id_key=manifest.corpus.id_key)
    return [doc.text for doc in reader.run(None, 0, 1)]


def bench_shard(manifest: Manifest, processes: int = 2, repeats: int = 3, copies: int = 1) -> dict:
    """Shard throughput vs bare batch tokenization of the same documents, same process count.

    The bare baseline gets the documents already in memory and does nothing but
    ``encode_batch`` in ``processes`` worker processes; the stage also reads and parses the
    corpus, starts its worker processes, draws split points, builds rows and writes Parquet.
    ``copies`` > 1 repeats the corpus (new ids) to see the steady state past the fixed
    start-up cost. Best of ``repeats`` each.
    """
    with tempfile.TemporaryDirectory() as corpus_tmp:
        if copies > 1:
            manifest = _replicated(manifest, copies, Path(corpus_tmp))
        return _bench_shard(manifest, processes, repeats)


def _replicated(manifest: Manifest, copies: int, directory: Path) -> Manifest:
    from pipeline.corpus import CorpusReader

    docs = list(CorpusReader(corpus_files(manifest), text_key=manifest.corpus.text_key,
                             id_key=manifest.corpus.id_key).run(None, 0, 1))
    parts = 16
    handles = [open(directory / f"part-{i:03d}.jsonl", "w") for i in range(parts)]
    for copy in range(copies):
        for k, doc in enumerate(docs):
            handles[(copy * len(docs) + k) % parts].write(json.dumps({"id": f"{doc.id}#{copy}", "text": doc.text}) + "\n")
    for h in handles:
        h.close()
    data = manifest.absolute_data()
    data["corpus"] = {"paths": [str(directory / "*.jsonl")], "text_key": "text", "id_key": "id"}
    return parse_manifest(data)


def _bench_shard(manifest: Manifest, processes: int, repeats: int) -> dict:
    texts = _texts(manifest)
    tok_dir = str(plan_shard(manifest).tokenizer_dir)
    chunks = [texts[i::processes] for i in range(processes)]

    bare_s, tokens = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        with mp.get_context("fork").Pool(processes) as pool:
            tokens = sum(pool.map(_bare_tokenize, [(tok_dir, c) for c in chunks]))
        bare_s = min(bare_s, time.perf_counter() - started)

    sip_s, card = float("inf"), {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            data = manifest.absolute_data()
            data["run"]["output_dir"] = str(Path(tmp) / "out")
            data["executor"] = {"type": "local", "tasks": processes, "workers": processes}
            m = parse_manifest(data)
            started = time.perf_counter()
            card = run_shard(m, log=lambda _m: None)
            sip_s = min(sip_s, time.perf_counter() - started)

    docs = len(texts)
    return {
        "documents": docs,
        "tokens": tokens,
        "processes": processes,
        "bare_tokenize": {"seconds": round(bare_s, 3), "documents_per_s": round(docs / bare_s, 1),
                          "tokens_per_s": round(tokens / bare_s, 1)},
        "sip_shard": {"seconds": round(sip_s, 3), "documents_per_s": round(docs / sip_s, 1),
                      "tokens_per_s": round(tokens / sip_s, 1), "pairs": card.get("rows")},
        "ratio_sip_over_bare": round(bare_s / sip_s, 3),
    }




# --------------------------------------------------------------------------- rewrite

def _bare_vllm(spec_path: str) -> None:
    """Subprocess: bare ``vllm.LLM`` on the same prompts and settings as the stage's engine."""
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()  # as in VLLMEngine: start-up includes importing vLLM
    from pipeline.engines.vllm_env import configure_vllm_env

    configure_vllm_env()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.engines.vllm_engine import llm_kwargs

    llm = LLM(**llm_kwargs(spec["model"], **spec["engine"]))
    start_s = time.perf_counter() - started
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
    Path(spec_path + ".out").write_text(json.dumps({"start_s": start_s, "generate_s": gen_s, "output_tokens": tokens}))


def bench_pairs(manifest: Manifest, directory: Path, pairs: int) -> Manifest:
    """``manifest`` redirected to ``directory``, one local task per stage, with a shard table
    of exactly ``pairs`` pairs (later stages read whatever the shard table holds)."""
    from pipeline.io import write_table_atomic

    data = manifest.absolute_data()
    data["run"]["output_dir"] = str(directory / "out")
    data["executor"] = {"type": "local", "tasks": 1, "workers": 1}
    m = parse_manifest(data)
    run_shard(m, log=lambda _m: None)
    shard_dir = m.stage_dir("shard")
    table = read_table(shard_dir).slice(0, pairs)
    for f in shard_dir.glob("*.parquet"):
        f.unlink()
    write_table_atomic(str(shard_dir / "00000.parquet"), table.to_pylist(), table.schema)
    return m


def run_stage_process(manifest: Manifest, stage: str, directory: Path) -> tuple[float, dict]:
    """Run ``sip <stage>`` in a fresh process (as a user would); its wall time and card summary."""
    import subprocess
    import sys

    import yaml

    manifest_path = directory / f"{stage}-manifest.yaml"
    manifest_path.write_text(yaml.safe_dump(manifest.absolute_data()))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", stage, "-m", str(manifest_path)],
                   capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    return wall, json.loads((manifest.stage_dir(stage) / "card.json").read_text())["summary"]


def bench_rewrite(manifest: Manifest, pairs: int = 64, with_server: bool = True) -> dict:
    """The rewrite stage's output tokens/s vs bare vLLM on the same prompts, same settings.

    Both run in fresh processes one after the other on this machine. With ``with_server``
    the same requests also go through ``vllm serve`` + the endpoint engine (the HTTP path
    datatrove's InferenceRunner would take), to compare the two ways of driving vLLM. Engine start-up is reported separately; the stage's time is its tasks'
    wall time (datatrove executor, reading pairs, prompts, generation, post-processing,
    chunk writes) minus its engine start.
    """
    import subprocess
    import sys

    from stages.rewrite import RewriteStep, plan_rewrite

    with tempfile.TemporaryDirectory() as tmp:
        m = bench_pairs(manifest, Path(tmp), pairs)
        table = read_table(m.stage_dir("shard"))
        plan = plan_rewrite(m)
        step: RewriteStep = plan.pipeline()[1]
        rows = table.select(["pair_id", "prefix", "suffix"]).to_pylist()
        requests = [step.request(r)[0] for r in rows]
        from pipeline.models import resolve_model_dir

        ref = m.rewriter
        spec = {
            "model": str(resolve_model_dir(m, ref.model, "rewriter.model")),
            "max_model_len": ref.max_model_len,
            "engine": {"max_model_len": ref.max_model_len, "dtype": ref.dtype, "seed": m.run.seed,
                       "gpu_memory_utilization": ref.gpu_memory_utilization,
                       "tensor_parallel_size": ref.tensor_parallel_size},
            "requests": [{"messages": list(r.messages), "prefill": r.prefill} for r in requests],
            "sampling": {"max_tokens": step.sampling.max_tokens, "temperature": step.sampling.temperature,
                         "top_p": step.sampling.top_p, "stop": list(step.sampling.stop) or None},
        }
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([sys.executable, "-m", "stages.bench", str(spec_path)], capture_output=True, check=True)
        bare = json.loads(Path(f"{spec_path}.out").read_text())

        server = None
        if with_server:
            from pipeline.engines.endpoint import EndpointEngine
            from pipeline.engines.server import vllm_server

            with vllm_server(spec["model"], served_name="bench", max_model_len=spec["max_model_len"],
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


if __name__ == "__main__":  # the bare-vLLM side of bench_rewrite, in its own process
    import sys

    _bare_vllm(sys.argv[1])
