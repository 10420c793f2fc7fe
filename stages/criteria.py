"""The judge's three criteria and three scoring modes (METHOD.md "Judge"; DESIGN.md "Engines").

- safety (pointwise) and factuality (pointwise, the original suffix as reference) in
  ``verdict`` or ``choice_prob`` mode;
- quality (pairwise over all pairs of a prefix's candidates; a candidate's score is its mean
  win rate) in ``verdict``, ``choice_prob`` or ``likelihood`` mode.

Every score is in [0, 1] (1 best) or None when no verdict could be read. ``raw`` keeps what
the judge said (texts, verdicts, probabilities) so every number can be traced.

Nothing shown to the judge decides a verdict: in ``verdict`` mode the verdict is the judge's
constrained choice after its own reasoning (:mod:`stages.verdicts`), never a line searched
for in its answer, and every text put into a prompt sits in a data block it cannot close
(:func:`data_escaper`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.engines.base import Engine, Request, Sampling
from pipeline.manifest import JudgingConfig, ManifestError
from pipeline.prompts import PromptError, PromptTemplate
from pipeline.tokenizer import Window, encode_continuation, join_encoding, prefix_window
from stages.verdicts import CHOICES, parse_choice, stop_strings, verdict_prefill
from stages.classifiers import CLASSIFIER, offensive_probability
from stages.schemes import Draws, run_scheme

PROMPTS = Path(__file__).parent / "prompts"
# An endpoint's verdict step: room for the longest choice in any tokenizer (it stops there).
VERDICT_TOKENS = 8
# A data block of a judge prompt: a placeholder alone between <tag> and </tag> lines.
_DATA_BLOCK = re.compile(r"^<(\w+)>\n\{(\w+)\}\n</\1>$", re.MULTILINE)


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


def first_choice_tokens(tokenizer, lead: str, choices: dict[str, float]) -> tuple[str, dict[str, int]] | None:
    """Where a verdict is read: ``(shared, first)``, the text every choice starts with that the
    lead-in takes over (usually "") and each choice's first token after ``lead + shared``;
    None when no such token tells the choices apart.

    A choice's first token is read as it follows the lead-in (encoded on its own, a
    SentencePiece-style tokenizer would start every choice with the same word marker). Where
    the choices share their first token (" 1" and " 2" are a space token, then a digit, in
    tokenizers that split digits), the shared text moves into the lead-in ("Option " then
    "1" or "2"), if the tokenizer spells the lead-in's end the same either way.
    """
    for shared in dict.fromkeys(["", os.path.commonprefix(list(choices))]):
        ids = {c: encode_continuation(tokenizer, lead + shared, c[len(shared):]) for c in choices}
        first = {c: i[0] for c, i in ids.items() if i}
        if len(first) == len(choices) and len(set(first.values())) == len(first):
            return shared, first
    return None


def choice_tokens(tokenizer, lead: str, choices: dict[str, float], criterion: str) -> tuple[str, dict[str, int]]:
    """:func:`first_choice_tokens`, which choice_prob mode needs.

    Raises:
        ManifestError: no token after the lead-in tells the choices apart in this judge's tokenizer.
    """
    found = first_choice_tokens(tokenizer, lead, choices)
    if found is None:
        raise ManifestError(f"judging.{criterion}.mode: choice_prob needs choices that start with different tokens "
                            f"after {lead!r}; {list(choices)} share a first token (or merge with the lead-in) in "
                            "this judge's tokenizer: use verdict"
                            + (" or likelihood" if criterion == "quality" else ""))
    return found


def data_tags(template: PromptTemplate) -> tuple[str, ...]:
    """The tags of a judge prompt's data blocks (what the prompt tells the judge is data).

    Raises:
        PromptError: a placeholder that is not alone in a block of its own (``<tag>``, the
            placeholder and ``</tag>`` on three lines), so text put there would not be delimited.
    """
    blocks = _DATA_BLOCK.findall(template.text)
    loose = set(re.findall(r"\{(\w+)\}", template.text)) - {name for _, name in blocks}
    if loose:
        raise PromptError(f"{template.path}: {{{sorted(loose)[0]}}} must sit alone in a data block "
                          "(<tag>, the placeholder, </tag> on three lines)")
    return tuple(tag for tag, _ in blocks)


def data_escaper(tags: set[str]):
    """A function that keeps a text inside its data block: every ``<`` that opens one of
    ``tags`` (``</text>``, ``< text >``, any case) becomes ``&lt;``, so no text can close its
    block and write outside it. Nothing else in the text changes."""
    opening = re.compile(r"<(?=\s*/?\s*(?:" + "|".join(map(re.escape, sorted(tags))) + r")\b)", re.IGNORECASE)
    return lambda text: opening.sub("&lt;", text)


def document_start_id(tokenizer) -> int:
    """The token a pretraining document starts after (``<|endoftext|>``, ``<s>``, ...), else the
    tokenizer's BOS or EOS id: the context of a text scored on its own (PMI's second term).

    Raises:
        ManifestError: the tokenizer declares none of them.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    for token in ("<|endoftext|>", "<|begin_of_text|>", "<s>", "</s>"):
        if (i := backend.token_to_id(token)) is not None:
            return i
    for attr in ("bos_token_id", "eos_token_id"):
        if (i := getattr(tokenizer, attr, None)) is not None:
            return i
    raise ManifestError("judging.likelihood: pmi scores a candidate at a document's start, and the judge's "
                        "tokenizer declares no document-start, BOS or EOS token; use mean_logprob")


def repeated_ngram_share(ids: list[int], n: int = 4) -> float:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


class Judge:
    """The three criteria over one engine. Every text put into a judge prompt (prefix,
    reference, candidates) sits in a tagged data block it cannot close (:func:`data_escaper`)."""

    def __init__(self, engine: Engine, config: JudgingConfig, seed: int = 0, window_tokenizer=None):
        """``window_tokenizer``: counts ``judging.prefix_tokens`` when the engine has no local
        tokenizer (an endpoint; the policy's tokenizer stands in)."""
        self.engine = engine
        self.config = config
        self.seed = seed
        self.window_tokenizer = engine.tokenizer if engine.tokenizer is not None else window_tokenizer
        self._windows: dict[str, Window] = {}
        self.templates = {c: PromptTemplate.load(PROMPTS / f"judge_{c}.txt") for c in CHOICES}  # one per criterion
        self._as_data = data_escaper({tag for t in self.templates.values() for tag in data_tags(t)})
        self.counters = JudgeCounters()

    def _messages(self, criterion: str, **values: str) -> tuple[dict, ...]:
        return self.templates[criterion].messages(**{k: self._as_data(v) for k, v in values.items()})

    def window(self, prefix: str) -> Window:
        """What the judge is shown of ``prefix``: its last ``judging.prefix_tokens`` tokens
        (:func:`pipeline.tokenizer.prefix_window`); the whole prefix without a bound or a tokenizer."""
        if self.window_tokenizer is None:
            return Window(prefix, None, False)
        if prefix not in self._windows:
            if len(self._windows) > 4096:  # a task's pairs pass once: keep memory flat
                self._windows.clear()
            self._windows[prefix] = prefix_window(self.window_tokenizer, prefix, self.config.prefix_tokens)
        return self._windows[prefix]

    def _unparsable(self, criterion: str) -> None:
        self.counters.unparsable[criterion] = self.counters.unparsable.get(criterion, 0) + 1

    # ------------------------------------------------------------------ modes
    def _verdicts(self, criterion: str, requests: list[Request]) -> list[Scored]:
        """Verdict mode (:mod:`stages.verdicts`): ``judging.samples`` answers per request, each
        reasoning stopped where its verdict line starts, then each answer's verdict step; the
        score is the mean of the verdicts that were read."""
        cfg = self.config
        results = self.engine.generate(requests, Sampling(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                          n=cfg.samples, stop=stop_strings(criterion)))
        steps = []
        for request, result in zip(requests, results):
            self.counters.calls += 1
            self.counters.prompt_tokens += result.prompt_tokens or 0
            self.counters.completion_tokens += result.completion_tokens or 0
            steps += [Request(f"{request.id}/{k}", request.messages, prefill=verdict_prefill(criterion, text))
                      for k, text in enumerate(result.texts)]
        verdicts = iter(self._verdict_step(criterion, steps))
        out = []
        for result in results:
            mine = [next(verdicts) for _ in result.texts]
            parsed = [score for score, _ in mine]
            valid = [p for p in parsed if p is not None]
            if not valid:
                self._unparsable(criterion)
            raw = {"answers": result.texts, "verdicts": [said for _, said in mine], "parsed": parsed,
                   **({"error": result.error} if result.error else {})}
            out.append(Scored(sum(valid) / len(valid) if valid else None, raw))
        return out

    def _verdict_step(self, criterion: str, steps: list[Request]) -> list[tuple[float | None, dict]]:
        """(score, what the judge chose) per step: its most probable choice after the lead-in
        (greedy decoding restricted to the choices). Where the judge's tokenizer is local and
        tells the choices apart by their first token, the choice is read off the next-token
        distribution, with its probabilities; otherwise (an endpoint, or choices that share a
        first token) the engine decodes the step greedily, restricted to the choices (vLLM's
        structured outputs), and :func:`~stages.verdicts.parse_choice` reads its answer."""
        lead, choices = CHOICES[criterion]
        found = first_choice_tokens(self.engine.tokenizer, lead, choices) if self.engine.tokenizer is not None else None
        if found is not None:
            shared, first = found
            values = {c.strip(): v for c, v in choices.items()}
            out = []
            steps = [Request(r.id, r.messages, prefill=r.prefill + shared) for r in steps] if shared else steps
            for probs in self._choice_distributions(steps, first):
                said = None if probs is None else max(probs, key=probs.get)
                out.append((None, {"error": "too long for the judge"}) if said is None else
                           (values[said], {"choice": said, "probs": probs}))
            return out
        results = self.engine.generate(steps, Sampling(max_tokens=VERDICT_TOKENS, choices=tuple(choices)))
        out = []
        for result in results:
            self.counters.prompt_tokens += result.prompt_tokens or 0
            self.counters.completion_tokens += result.completion_tokens or 0
            if not result.texts:
                out.append((None, {"error": result.error}))
            else:
                out.append((parse_choice(criterion, result.texts[0]), {"choice": result.texts[0]}))
        return out

    def _choice_distributions(self, requests: list[Request], first: dict[str, int]) -> list[dict[str, float] | None]:
        """Per request (its prefill ends with a verdict's lead-in and the choices' shared start,
        :func:`first_choice_tokens`): the probability of each
        choice, keyed by the choice without its space; None when the prompt does not fit.
        ``first``: each choice's first token (:func:`first_choice_tokens`).

        A constrained choice read off one decoding step: each choice's first token's share of
        the choices' next-token probability (what decoding restricted to the choices would
        sample from).
        """
        prompts = [self.engine.prompt_ids(r) for r in requests]
        logprobs = self.engine.next_token_logprobs(prompts, list(first.values()))
        self.counters.prompt_tokens += sum(len(p) for p in prompts)
        out = []
        for lps in logprobs:
            values = {c: lps.get(t) for c, t in first.items()} if lps is not None else {}
            if not values or any(v is None for v in values.values()) or not any(math.isfinite(v) for v in values.values()):
                out.append(None)
                continue
            top = max(values.values())
            weights = {c: math.exp(v - top) for c, v in values.items()}
            total = sum(weights.values())
            out.append({c.strip(): w / total for c, w in weights.items()})
        return out

    def _choice_probs(self, criterion: str, requests: list[Request]) -> list[Scored]:
        """choice_prob mode: the answer is primed with the verdict's lead-in and scored by the
        expected value of the choices' probabilities (a soft verdict)."""
        lead, choices = CHOICES[criterion]
        shared, first = choice_tokens(self.engine.tokenizer, lead, choices, criterion)
        primed = [Request(r.id, r.messages, prefill=lead + shared) for r in requests]
        self.counters.calls += len(requests)
        out = []
        for probs in self._choice_distributions(primed, first):
            if probs is None:
                self._unparsable(criterion)
                out.append(Scored(None, {"error": "too long for the judge"}))
            else:
                out.append(Scored(sum(probs[c.strip()] * v for c, v in choices.items()), {"probs": probs}))
        return out

    def _score(self, criterion: str, requests: list[Request]) -> list[Scored]:
        mode = getattr(self.config, criterion).mode
        if not requests:
            return []
        if mode == "verdict":
            return self._verdicts(criterion, requests)
        return self._choice_probs(criterion, requests)

    # ------------------------------------------------------------------ criteria
    def safety(self, texts: list[str]) -> list[Scored]:
        if self.config.safety.mode == "classifier":  # a bundled classifier, no judge call
            return [Scored(1.0 - p, {"p_offensive": round(p, 6), "classifier": CLASSIFIER})
                    for p in offensive_probability(texts)]
        requests = [Request(f"s{i}", self._messages("safety", candidate=t)) for i, t in enumerate(texts)]
        return self._score("safety", requests)

    def factuality(self, items: list[tuple[str, str, str]]) -> list[Scored]:
        """items: (prefix, reference, candidate)."""
        requests = [Request(f"f{i}", self._messages("factuality", prefix=self.window(p).text, reference=r, candidate=c))
                    for i, (p, r, c) in enumerate(items)]
        return self._score("factuality", requests)

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
        runs = {k: self._scheme_run(items[k][1], items[k][2]) for k in todo}
        made: dict[int, list[tuple[int, int]]] = {k: [] for k in todo}
        scored: dict[int, list[Scored]] = {k: [] for k in todo}
        rounds = {k: next(run) for k, run in runs.items()}
        while rounds:
            # One engine call per round for every pair still comparing: its batches stay full,
            # and a pair's comparisons sit next to each other (vLLM's prefix cache serves the
            # instructions + prefix they share).
            shown = [(k, a, b) for k, comparisons in rounds.items() for a, b in comparisons]
            requests = [self.quality_request(f"q{n}", items[k][0], items[k][1][a], items[k][1][b])
                        for n, (k, a, b) in enumerate(shown)]
            answers = iter(self.judge_shown(requests))
            for k in list(rounds):
                mine = [next(answers) for _ in rounds[k]]
                made[k] += rounds[k]
                scored[k] += mine
                try:
                    rounds[k] = runs[k].send([s.score for s in mine])
                except StopIteration as stop:
                    del rounds[k]
                    out[k] = (self._comparison_scores(len(items[k][1]), made[k], scored[k], stop.value),
                              [list(c) for c in made[k]])
        return out

    def quality_request(self, request_id: str, prefix: str, first: str, second: str) -> Request:
        """The pairwise quality prompt with ``first`` shown first (the prefix windowed)."""
        return Request(request_id, self._messages("quality", prefix=self.window(prefix).text, option_1=first,
                                                  option_2=second))

    def judge_shown(self, requests: list[Request]) -> list[Scored]:
        """Each :meth:`quality_request`'s score: the probability that the option shown first is
        better (a verdict's 1 / 0.5 / 0, or a soft verdict), None when unreadable."""
        return self._score("quality", requests)

    def _scheme_run(self, texts: list[str], pair_id: str):
        quality = self.config.quality
        return run_scheme(quality.scheme, len(texts), Draws(self.seed, pair_id, tuple(texts)),
                          self.config.order == "both", quality.degree)

    def _comparison_scores(self, n: int, comparisons: list[tuple[int, int]], scored: list[Scored],
                           scores: list[float | None]) -> list[Scored]:
        """Each candidate's score from its scheme, with the comparisons it took part in (``raw``);
        counts order agreement where a pair was shown in both orders."""
        by_shown = {c: s.score for c, s in zip(comparisons, scored)}
        for (a, b), first in by_shown.items():
            second = by_shown.get((b, a))
            if a < b and second is not None and first is not None and first != 0.5 and second != 0.5:
                self.counters.order_compared += 1
                self.counters.order_agreed += (first > 0.5) == (second < 0.5)
        out = []
        for i in range(n):
            mine = [((a, b), s) for (a, b), s in zip(comparisons, scored) if i in (a, b)]
            opponents = {b if a == i else a for (a, b), s in mine if s.score is not None}
            raw = {"comparisons": [{"shown": [a, b], **(s.raw if isinstance(s.raw, dict) else {})} for (a, b), s in mine],
                   "opponents_compared": len(opponents), "opponents": n - 1, "scheme": self.config.quality.scheme}
            out.append(Scored(scores[i], raw))
        return out

    def compare(self, items: list[tuple[str, str, str]]) -> list[tuple[Scored, Scored]]:
        """Pairwise quality of a candidate against an opponent (an evaluation against a baseline).

        Args:
            items: (prefix, candidate, opponent) texts.

        Returns:
            Per item, the candidate's win score (1 better, 0 worse, 0.5 a tie; a soft verdict's
            probability in ``choice_prob`` mode) with the candidate shown first, and with it shown
            second; a score is None when the judge's answer could not be read. ``likelihood``
            mode compares the two continuations' mean log-probs, which no order changes: both
            scores are that comparison.
        """
        if not items:
            return []
        if self.config.quality.mode == "likelihood":
            return [(s[0], s[0]) for s in self._quality_likelihood([(p, [a, b]) for p, a, b in items])]
        requests = []
        for i, (prefix, a, b) in enumerate(items):
            requests += [self.quality_request(f"c{i}/first", prefix, a, b),
                         self.quality_request(f"c{i}/second", prefix, b, a)]
        scored = self.judge_shown(requests)
        return [(scored[2 * k], Scored(None if scored[2 * k + 1].score is None else 1 - scored[2 * k + 1].score,
                                       scored[2 * k + 1].raw)) for k in range(len(items))]

    def _quality_likelihood(self, items: list[tuple[str, list[str]]]) -> list[list[Scored]]:
        """Each candidate's tokens are those of prefix + candidate past the prefix's own encoding
        (:func:`pipeline.tokenizer.join_encoding`); where the two fuse, the fused token is the
        candidate's too, so every candidate gets a score."""
        sequences, starts, ids = [], [], []
        for prefix, texts in items:
            prefix = self.window(prefix).text  # the context, bounded as every prompt's prefix is
            joined = [join_encoding(self.engine.tokenizer, prefix, t) for t in texts]
            ids.append([j.ids[j.start:] for j in joined])
            sequences += [j.ids for j in joined]
            starts += [j.start for j in joined]
        n = len(sequences)
        if self.config.likelihood == "pmi":
            # The same candidate ids at a document's start: what the candidate scores without the prefix.
            start = [document_start_id(self.engine.tokenizer)]
            sequences += [start + c for cands in ids for c in cands]
            starts += [1] * n
        scores = self.engine.score(sequences, starts)
        self.counters.calls += len(sequences)  # a scored sequence is a call: PMI pays two per candidate
        self.counters.prompt_tokens += sum(len(seq) for seq in sequences)
        alone = iter(scores[n:] if len(scores) > n else [None] * n)
        scores = iter(scores[:n])
        return [self._likelihood_wins(cands, [next(scores) for _ in cands], [next(alone) for _ in cands])
                for cands in ids]

    def _likelihood_wins(self, ids: list[list[int]], scores: list[list[float] | None],
                         alone: list[list[float] | None]) -> list[Scored]:
        """Each candidate's win rate over the others by its likelihood score: its tokens' log-probs
        given the prefix, minus their log-probs without it when ``alone`` holds those (PMI),
        averaged over all its tokens, or (``judging.length: common``) over the first tokens both
        candidates of a comparison have, so that a candidate's length neither wins nor loses."""
        per_token: list[list[float] | None] = []
        for c, lps, base in zip(ids, scores, alone):
            if lps is None or not lps or (self.config.likelihood == "pmi" and not base):
                per_token.append(None)
            elif repeated_ngram_share(c) > self.config.repetition_limit:
                per_token.append([-math.inf])  # degenerate repetition: likely under any LM, never good text
            else:
                per_token.append([a - b for a, b in zip(lps, base)] if base else list(lps))

        def mean(values: list[float], n: int | None = None) -> float:
            values = values[:n] if n else values
            return sum(values) / len(values)

        common = self.config.length == "common"
        out = []
        for i, mine in enumerate(per_token):
            if mine is None:
                self._unparsable("quality")
                out.append(Scored(None, {self.config.likelihood: None}))
                continue
            wins = []
            for j, other in enumerate(per_token):
                if j == i or other is None:
                    continue
                n = min(len(mine), len(other)) if common else None
                a, b = mean(mine, n), mean(other, n)
                wins.append(1.0 if a > b else 0.0 if a < b else 0.5)
            repetitive = mine == [-math.inf]
            out.append(Scored(sum(wins) / len(wins) if wins else None,
                              {self.config.likelihood: None if repetitive else mean(mine), "repetitive": repetitive,
                               "tokens": len(mine)}))
        return out


def manifest_judge(manifest, engine: Engine, config: JudgingConfig | None = None) -> Judge:
    """The manifest's judge over ``engine`` (``judging``, or ``config``; seeded by ``run.seed``).
    An endpoint has no local tokenizer: its prefix window is counted in policy tokens."""
    from pipeline.engines.factory import counting_tokenizer

    fallback = counting_tokenizer(manifest, manifest.judge, "judge") if engine.tokenizer is None else None
    return Judge(engine, config or manifest.judging, manifest.run.seed, window_tokenizer=fallback)

