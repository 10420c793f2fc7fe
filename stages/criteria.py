"""The judge's three criteria and three scoring modes (METHOD.md "Judge"; DESIGN.md "Engines").

- safety (pointwise) and factuality (pointwise, the original suffix as reference) in
  ``verdict`` or ``choice_prob`` mode;
- quality (pairwise over all pairs of a prefix's candidates; a candidate's score is its mean
  win rate) in ``verdict``, ``choice_prob`` or ``likelihood`` mode.

Every score is in [0, 1] (1 best) or None when no verdict could be parsed. ``raw`` keeps what
the judge said (texts or probabilities) so every number can be traced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from pipeline.engines.base import Engine, Request, Sampling
from pipeline.manifest import JudgingConfig, ManifestError
from pipeline.prompts import PromptTemplate
from pipeline.schema import content_id
from pipeline.tokenizer import encode_continuation, join_encoding
from stages.verdicts import CHOICES, parse_verdict

PROMPTS = Path(__file__).parent / "prompts"


@dataclass
class Scored:
    score: float | None
    raw: object


@dataclass
class JudgeCounters:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unparsable: dict = field(default_factory=dict)
    order_compared: int = 0
    order_agreed: int = 0

    def snapshot(self) -> dict[str, int]:
        """The counters under the names the judge stage keeps per chunk file."""
        return {"judge_calls": self.calls, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "order_compared": self.order_compared,
                "order_agreed": self.order_agreed, **{f"unparsable_{c}": v for c, v in self.unparsable.items()}}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """What was spent since ``before`` (a :meth:`snapshot`)."""
        return {k: v - before.get(k, 0) for k, v in self.snapshot().items()}


def choice_tokens(tokenizer, lead: str, choices: dict[str, float], criterion: str) -> dict[str, int]:
    """Each choice's first token as it follows the lead-in (encoded on its own, a
    SentencePiece-style tokenizer would start every choice with the same word marker); they
    must differ to be told apart.

    Raises:
        ManifestError: two choices start with the same token in this judge's tokenizer, or one
            merges with the lead-in's last token.
    """
    ids = {c: encode_continuation(tokenizer, lead, c) for c in choices}
    first = {c: i[0] for c, i in ids.items() if i}
    if len(first) != len(choices) or len(set(first.values())) != len(first):
        raise ManifestError(f"judging.{criterion}.mode: choice_prob needs choices that start with different tokens "
                            f"after {lead!r}; {list(choices)} share a first token (or merge with the lead-in) in "
                            "this judge's tokenizer: use verdict"
                            + (" or likelihood" if criterion == "quality" else ""))
    return first


def repeated_ngram_share(ids: list[int], n: int = 4) -> float:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


class Judge:
    def __init__(self, engine: Engine, config: JudgingConfig, seed: int = 0):
        self.engine = engine
        self.config = config
        self.seed = seed
        self.templates = {c: PromptTemplate.load(PROMPTS / f"judge_{c}.txt") for c in ("safety", "quality", "factuality")}
        self.counters = JudgeCounters()

    # ------------------------------------------------------------------ modes
    def _verdicts(self, criterion: str, requests: list[Request], shown: list[tuple[str, ...]]) -> list[Scored]:
        cfg = self.config
        results = self.engine.generate(requests, Sampling(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                          n=cfg.samples))
        out = []
        for result, texts in zip(results, shown):
            self.counters.calls += 1
            self.counters.prompt_tokens += result.prompt_tokens or 0
            self.counters.completion_tokens += result.completion_tokens or 0
            parsed = [parse_verdict(criterion, answer, texts) for answer in result.texts]
            valid = [p for p in parsed if p is not None]
            if not valid:
                self.counters.unparsable[criterion] = self.counters.unparsable.get(criterion, 0) + 1
            raw = {"answers": result.texts, "parsed": parsed, **({"error": result.error} if result.error else {})}
            out.append(Scored(sum(valid) / len(valid) if valid else None, raw))
        return out

    def _choice_probs(self, criterion: str, requests: list[Request]) -> list[Scored]:
        """A constrained choice after the verdict's lead-in: the probability of each choice is
        its first token's share of the choices' next-token probability (what structured
        decoding restricted to the choices would sample from)."""
        lead, choices = CHOICES[criterion]
        first = choice_tokens(self.engine.tokenizer, lead, choices, criterion)
        prompts = [self.engine.prompt_ids(Request(r.id, r.messages, prefill=lead)) for r in requests]
        logprobs = self.engine.next_token_logprobs(prompts, list(first.values()))
        self.counters.calls += len(requests)
        self.counters.prompt_tokens += sum(len(p) for p in prompts)
        out = []
        for lps in logprobs:
            values = {c: lps.get(t) for c, t in first.items()} if lps is not None else {}
            if any(v is None for v in values.values()) or not values or \
                    not any(math.isfinite(v) for v in values.values()):
                self.counters.unparsable[criterion] = self.counters.unparsable.get(criterion, 0) + 1
                out.append(Scored(None, {"error": "too long for the judge"}))
                continue
            top = max(values.values())
            weights = {c: math.exp(v - top) for c, v in values.items()}
            total = sum(weights.values())
            probs = {c.strip(): w / total for c, w in weights.items()}
            out.append(Scored(sum(probs[c.strip()] * v for c, v in choices.items()), {"probs": probs}))
        return out

    def _score(self, criterion: str, requests: list[Request], shown: list[tuple[str, ...]]) -> list[Scored]:
        mode = getattr(self.config, criterion).mode
        if not requests:
            return []
        if mode == "verdict":
            return self._verdicts(criterion, requests, shown)
        return self._choice_probs(criterion, requests)

    # ------------------------------------------------------------------ criteria
    def safety(self, texts: list[str]) -> list[Scored]:
        requests = [Request(f"s{i}", self.templates["safety"].messages(candidate=t)) for i, t in enumerate(texts)]
        return self._score("safety", requests, [(t,) for t in texts])

    def factuality(self, items: list[tuple[str, str, str]]) -> list[Scored]:
        """items: (prefix, reference, candidate)."""
        requests = [Request(f"f{i}", self.templates["factuality"].messages(prefix=p, reference=r, candidate=c))
                    for i, (p, r, c) in enumerate(items)]
        return self._score("factuality", requests, [(r, c) for _, r, c in items])

    def quality(self, prefix: str, texts: list[str], pair_id: str) -> tuple[list[Scored], list[list[int]]]:
        """Mean win rate of each candidate over all others, and the orders shown."""
        return self.quality_batch([(prefix, texts, pair_id)])[0]

    def quality_batch(self, items: list[tuple[str, list[str], str]]) -> list[tuple[list[Scored], list[list[int]]]]:
        """:meth:`quality` for many (prefix, candidates, pair_id) at once, in one engine call.

        One call keeps the engine's batches full; a pair's comparisons are sent next to each
        other, so the prompt they share (instructions + prefix) is served by vLLM's prefix cache.
        """
        out: list = [None] * len(items)
        todo = []
        for k, (_, texts, _) in enumerate(items):
            if len(texts) < 2:
                out[k] = ([Scored(None, {"note": "a single candidate has no comparison"})] * len(texts), [])
            else:
                todo.append(k)
        if not todo:
            return out
        if self.config.quality.mode == "likelihood":
            for k, scored in zip(todo, self._quality_likelihood([items[k][:2] for k in todo])):
                out[k] = (scored, [])
            return out
        orders = {k: self._orders(items[k][1], items[k][2]) for k in todo}
        requests, shown = [], []
        for k in todo:
            prefix, texts, _ = items[k]
            for a, b in orders[k]:
                requests.append(Request(f"q{len(requests)}", self.templates["quality"].messages(
                    prefix=prefix, option_1=texts[a], option_2=texts[b])))
                shown.append((texts[a], texts[b]))
        scored = self._score("quality", requests, shown)
        at = 0
        for k in todo:
            mine = scored[at : at + len(orders[k])]
            at += len(orders[k])
            out[k] = (self._win_rates(len(items[k][1]), orders[k], mine), [list(o) for o in orders[k]])
        return out

    def _orders(self, texts: list[str], pair_id: str) -> list[tuple[int, int]]:
        orders = []
        for i, j in combinations(range(len(texts)), 2):
            if self.config.order == "both":
                orders += [(i, j), (j, i)]
            else:  # one order, seeded by the pair and candidates: reproducible, unbiased on average
                flip = int(content_id("order", self.seed, pair_id, texts[i], texts[j])[:8], 16) % 2
                orders.append((j, i) if flip else (i, j))
        return orders

    def _win_rates(self, n: int, orders: list[tuple[int, int]], scored: list[Scored]) -> list[Scored]:
        beats: dict[tuple[int, int], list[float]] = {}
        for (a, b), s in zip(orders, scored):
            if s.score is not None:  # s.score: probability that the first shown (a) is better
                beats.setdefault((a, b), []).append(s.score)
                beats.setdefault((b, a), []).append(1 - s.score)
        if self.config.order == "both":
            for i, j in combinations(range(n), 2):
                first, second = scored[orders.index((i, j))].score, scored[orders.index((j, i))].score
                if first is not None and second is not None and first != 0.5 and second != 0.5:
                    self.counters.order_compared += 1
                    self.counters.order_agreed += (first > 0.5) == (second < 0.5)
        out = []
        for i in range(n):
            rates = [sum(v) / len(v) for (a, _), v in beats.items() if a == i]
            raw = {"comparisons": [{"shown": [a, b], **(s.raw if isinstance(s.raw, dict) else {})}
                                   for (a, b), s in zip(orders, scored) if i in (a, b)],
                   "opponents_compared": len(rates), "opponents": n - 1}
            # The mean over the comparisons that parsed: one unparsable answer must not void a
            # candidate that won or lost every other comparison.
            out.append(Scored(sum(rates) / len(rates) if rates else None, raw))
        return out

    def _quality_likelihood(self, items: list[tuple[str, list[str]]]) -> list[list[Scored]]:
        """Each candidate's tokens are those of prefix + candidate past the prefix's own encoding
        (:func:`pipeline.tokenizer.join_encoding`); where the two fuse, the fused token is the
        candidate's too, so every candidate gets a score."""
        sequences, starts, ids = [], [], []
        for prefix, texts in items:
            joined = [join_encoding(self.engine.tokenizer, prefix, t) for t in texts]
            ids.append([j.ids[j.start:] for j in joined])
            sequences += [j.ids for j in joined]
            starts += [j.start for j in joined]
        scores = iter(self.engine.score(sequences, starts))
        self.counters.calls += len(sequences)
        self.counters.prompt_tokens += sum(len(seq) for seq in sequences)
        return [self._likelihood_wins(cands, [next(scores) for _ in cands]) for cands in ids]

    def _likelihood_wins(self, ids: list[list[int]], scores: list[list[float] | None]) -> list[Scored]:
        means = []
        for c, lps in zip(ids, scores):
            if lps is None or not lps:
                means.append(None)
            elif repeated_ngram_share(c) > self.config.repetition_limit:
                means.append(-math.inf)  # degenerate repetition: likely under any LM, never good text
            else:
                means.append(sum(lps) / len(lps))
        out = []
        for i, mine in enumerate(means):
            if mine is None:
                self.counters.unparsable["quality"] = self.counters.unparsable.get("quality", 0) + 1
                out.append(Scored(None, {"mean_logprob": None}))
                continue
            others = [m for j, m in enumerate(means) if j != i and m is not None]
            wins = [1.0 if mine > o else 0.0 if mine < o else 0.5 for o in others]
            out.append(Scored(sum(wins) / len(wins) if wins else None,
                              {"mean_logprob": None if mine == -math.inf else mine, "repetitive": mine == -math.inf}))
        return out
