"""Metering for the judge self-check: the engine's own request and token counts beside the
judge's, and both as deltas over one check (so the judge's cost accounting can be checked
against the engine's)."""

from __future__ import annotations

import time

from stages.criteria import Judge


class MeteredEngine:
    """The real engine, counting what passes through it (requests and tokens)."""

    def __init__(self, engine):
        self._engine = engine
        self.requests = self.prompt_tokens = self.completion_tokens = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, requests, sampling):
        results = self._engine.generate(requests, sampling)
        self.requests += len(requests)
        self.prompt_tokens += sum(r.prompt_tokens or 0 for r in results)
        self.completion_tokens += sum(r.completion_tokens or 0 for r in results)
        return results

    def score(self, sequences, starts):
        self.requests += len(sequences)
        self.prompt_tokens += sum(len(s) for s in sequences)
        return self._engine.score(sequences, starts)

    def next_token_logprobs(self, sequences, token_ids):
        self.requests += len(sequences)
        self.prompt_tokens += sum(len(s) for s in sequences)
        return self._engine.next_token_logprobs(sequences, token_ids)


class Meter:
    """Judge and engine counter deltas over one check."""

    def __init__(self, judge: Judge, engine: MeteredEngine, criterion: str):
        self.judge, self.engine, self.criterion = judge, engine, criterion

    def __enter__(self):
        c, e = self.judge.counters, self.engine
        self.start = (c.calls, c.prompt_tokens, c.completion_tokens, c.unparsable.get(self.criterion, 0),
                      c.order_compared, c.order_agreed, e.requests, e.prompt_tokens, e.completion_tokens,
                      time.perf_counter())
        return self

    def __exit__(self, *exc):
        c, e = self.judge.counters, self.engine
        now = (c.calls, c.prompt_tokens, c.completion_tokens, c.unparsable.get(self.criterion, 0),
               c.order_compared, c.order_agreed, e.requests, e.prompt_tokens, e.completion_tokens,
               time.perf_counter())
        d = [b - a for a, b in zip(self.start, now)]
        self.cost = {"answers": d[0], "parsed": d[0] - d[3], "unparsable": d[3],
                     "parse_rate": round((d[0] - d[3]) / d[0], 4) if d[0] else None,
                     "order_compared": d[4], "order_agreed": d[5],
                     "order_agreement": round(d[5] / d[4], 4) if d[4] else None,
                     "calls": d[0], "prompt_tokens": d[1], "completion_tokens": d[2],
                     "engine_requests": d[6], "engine_prompt_tokens": d[7], "engine_completion_tokens": d[8],
                     "elapsed_s": round(d[9], 2)}
