"""Any OpenAI-compatible server the user already runs (e.g. a large judge on other nodes).

Bounded concurrency, a timeout per request, retries with exponential backoff and jitter on
transient failures (connection errors, timeouts, 408/409/429 and 5xx); other 4xx answers are
the request's fault and are not retried. A prefill (assistant-turn prefix) is sent as a final
assistant message with vLLM's ``continue_final_message`` extension.
"""

from __future__ import annotations

import asyncio
import os
import random

import httpx
from loguru import logger

from pipeline.engines.base import Engine, Request, Result, Sampling

_RETRY_STATUS = {408, 409, 429}
_CONTEXT_ERRORS = ("maximum context length", "context length", "too long", "max_model_len")


class EndpointEngine(Engine):
    """Chat completions only: no tokenizer, log-probs or scoring here (those methods raise
    ``NotImplementedError``, see :class:`~pipeline.engines.base.Engine`)."""

    unsupported_hint = ("an OpenAI-compatible endpoint answers chat completions only; use a local judge "
                        "(judge.model: embedded or a model directory) or judging.<criterion>.mode: verdict")

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 300.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_model_len: int = 0,
        seed: int | None = None,
        prefill: bool = True,
    ):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model_id = model
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_model_len = max_model_len  # the server checks lengths: its context error -> too_long
        self.seed = seed
        self.prefill = prefill  # False for servers without vLLM's continue_final_message extension
        self.attempts = 0  # requests sent, retries included

    @classmethod
    def from_env_key(cls, base_url: str, model: str, api_key_env: str | None, **kw) -> "EndpointEngine":
        return cls(base_url, model, api_key=os.environ.get(api_key_env) if api_key_env else None, **kw)

    def _payload(self, request: Request, sampling: Sampling) -> dict:
        messages = list(request.messages)
        payload = {"model": self.model_id, **sampling.as_dict()}
        if self.seed is not None:
            payload["seed"] = self.seed
        if not sampling.stop:
            payload.pop("stop")
        if sampling.choices:  # vLLM's extension; a server without it answers 400 or ignores it
            payload["structured_outputs"] = {"choice": payload.pop("choices")}
        if request.prefill and self.prefill:
            messages.append({"role": "assistant", "content": request.prefill})
            payload.update(continue_final_message=True, add_generation_prompt=False)
        payload["messages"] = messages
        return payload

    async def _one(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, request: Request, sampling: Sampling) -> Result:
        if request.prompt_ids is not None:  # chat completions cannot take raw ids; never send empty messages
            return Result(request.id, "error", error="an endpoint takes chat messages, not raw prompt_ids")
        try:
            return await self._attempts(client, gate, request, sampling)
        except Exception as exc:  # one bad request never fails the batch
            return Result(request.id, "error", error=f"{type(exc).__name__}: {exc}")

    async def _attempts(self, client, gate, request: Request, sampling: Sampling) -> Result:
        payload = self._payload(request, sampling)
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            async with gate:
                self.attempts += 1
                try:
                    response = await client.post("/chat/completions", json=payload)
                except (httpx.TransportError, httpx.TimeoutException) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                    continue
            if response.status_code == 200:
                try:
                    return self._parse(request, response.json())
                except (ValueError, TypeError, AttributeError, KeyError) as exc:  # a malformed 200 reply
                    return Result(request.id, "error", error=f"malformed reply: {type(exc).__name__}: {exc}")
            last = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code in _RETRY_STATUS or response.status_code >= 500:
                continue
            status = "too_long" if any(s in response.text.lower() for s in _CONTEXT_ERRORS) else "error"
            return Result(request.id, status, error=last)
        logger.warning(f"{request.id}: giving up after {self.max_retries + 1} attempts: {last}")
        return Result(request.id, "error", error=f"after {self.max_retries + 1} attempts: {last}")

    @staticmethod
    def _parse(request: Request, body: dict) -> Result:
        choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
        if not choices:
            raise ValueError("no choices in the reply")
        usage = body.get("usage") or {}
        texts = []
        for choice in choices:
            text = (choice.get("message") or {}).get("content") or ""
            # Servers differ on whether a continued final message is echoed; never keep the prefill.
            if request.prefill and text.startswith(request.prefill) and text[len(request.prefill):][:1] in ("", " ", "\n", ",", "."):
                text = text[len(request.prefill):]
            texts.append(text)
        return Result(
            request.id, "ok", texts=texts, finish_reasons=[c.get("finish_reason") or "" for c in choices],
            prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
        )

    async def _all(self, requests: list[Request], sampling: Sampling) -> list[Result]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        gate = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout_s, limits=limits) as client:
            return list(await asyncio.gather(*(self._one(client, gate, r, sampling) for r in requests)))

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Result]:
        return asyncio.run(self._all(requests, sampling))

    def describe(self) -> dict:
        return {**super().describe(), "endpoint": self.base_url, "concurrency": self.concurrency}
