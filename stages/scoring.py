"""The scoring core: a pair's candidates -> per-criterion scores -> reward -> chosen/rejected.

One IO-free module that every caller shares, so a pair is scored and picked the same way
wherever it is judged (METHOD.md "Judge", "Training"):

- the judge stage (``stages/judge.py``) writes :func:`score_pairs`' rows to the judgments table;
- the prefs stage (``stages/prefs.py``) picks chosen/rejected from those rows with :func:`pick`;
- the trainer's online phase assembles, scores and picks in memory with the same functions.

Candidates (:func:`assemble_candidates`): the original suffix, the ok rewrite clipped to N
policy tokens as a continuation of the prefix, and the ok rollouts (their sampled ids, never
re-encoded). Each distinct text is judged once, under the first source that gave it. Every
candidate carries the token ids it is trained on, so what the judge scored is exactly what
the policy learns from.

Reward (:func:`reward_of`): the weighted sum of the enabled criteria's scores (the paper sums
them; the weights are ``judging.<criterion>.weight``); None when a criterion that applies
could not be scored. Quality does not apply to a pair with a single candidate.

Pick (:func:`pick`): candidates ranked by reward (highest first), ties broken by source
(original, rewrite, rollout) then ``cand_id``, so the pick is deterministic. Chosen = first,
rejected = last; a pair with fewer than two rewarded candidates, or whose margin is at most
``min_margin``, gives no preference pair (status says why) but still an SFT target (the best).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from pipeline.manifest import JudgingConfig
from pipeline.schema import cand_id
from pipeline.tokenizer import clip_continuation
from stages.criteria import Judge, Scored

CRITERIA = ("safety", "quality", "factuality")
# Tie-break among equal rewards (deterministic picks); unknown sources sort last.
SOURCE_RANK = {"original": 0, "rewrite": 1, "rollout": 2}
PICK_STATUSES = ("usable", "single_candidate", "tie", "unjudged")


@dataclass(frozen=True)
class Candidate:
    """One suffix the judge scores. ``token_ids``: the policy ids it is trained on (at most N)."""

    pair_id: str
    source: str  # original | rewrite | rollout
    text: str
    token_ids: tuple[int, ...]

    @property
    def cand_id(self) -> str:
        return cand_id(self.pair_id, self.text)


@dataclass
class CandidateSet:
    """A pair's candidates in judging order, and how many offered texts were left out."""

    pair_id: str
    prefix: str
    reference: str  # the original suffix: factuality's assumed-true reference
    candidates: list[Candidate]
    duplicates: int = 0  # a text another source already gave
    empty: int = 0  # nothing but whitespace (after clipping)
    fused: int = 0  # a rewrite the tokenizer merges with the prefix's last token (no ids continue the prefix's)


def assemble_candidates(pair: dict, rewrite: str | None, rollouts: Sequence[tuple[str, Sequence[int]]],
                        tokenizer, n: int) -> CandidateSet:
    """The candidates of one pair.

    Args:
        pair: a pairs-table row: ``pair_id``, ``prefix``, ``suffix``, ``suffix_ids``.
        rewrite: the ok rewrite's text, or None (the rewrite failed, was refused or copied).
            Its ids are its encoding as a continuation of the prefix, never of the text on its
            own (:func:`pipeline.tokenizer.clip_continuation`): on its own, a SentencePiece-style
            tokenizer would start it with a word marker the policy never writes there. A
            rewrite that fuses with the prefix's last token is left out (``fused``).
        rollouts: the ok rollouts as (text, sampled ids), in sample order; their ids are at
            most N already and are kept as sampled (re-encoding the text could tokenize
            differently and cut what the policy produced).
        tokenizer: the policy tokenizer (``tokenizers.Tokenizer``), to clip the rewrite to N
            tokens at a character boundary.
        n: N, the suffix length in policy tokens.
    """
    offered = [("original", pair["suffix"], tuple(pair["suffix_ids"]))]
    out = CandidateSet(pair["pair_id"], pair["prefix"], pair["suffix"], [])
    if rewrite is not None:
        clipped = clip_continuation(tokenizer, pair["prefix"], rewrite, n)
        if clipped is None:
            out.fused += 1
        else:
            offered.append(("rewrite", clipped[0], tuple(clipped[1])))
    offered += [("rollout", text, tuple(ids)) for text, ids in rollouts]
    seen: set[str] = set()
    for k, (source, text, ids) in enumerate(offered):
        if k and not text.strip():  # the original is always a candidate: it is the reference
            out.empty += 1
        elif text in seen:
            out.duplicates += 1
        else:
            seen.add(text)
            out.candidates.append(Candidate(pair["pair_id"], source, text, ids))
    return out


@dataclass
class Judged:
    """A candidate with its scores (each in [0, 1], None when not judged or unparsable)."""

    candidate: Candidate
    scores: dict[str, float | None]
    reward: float | None
    raw: dict = field(default_factory=dict)  # the judge's outputs per criterion
    shown_order: list | None = None  # the pair's quality comparisons, as shown (indices)
    prefix_tokens: int | None = None  # how much of the prefix the judge saw (its tokens); None: no prompt showed it

    @property
    def parsed(self) -> bool:
        return self.reward is not None


def reward_of(scores: dict[str, float | None], config: JudgingConfig, n_candidates: int) -> float | None:
    """Weighted sum of the criteria that apply; None when one of them has no score."""
    applicable = [c for c in CRITERIA if getattr(config, c) and not (c == "quality" and n_candidates < 2)]
    if any(scores.get(c) is None for c in applicable):
        return None
    return sum(getattr(config, c).weight * scores[c] for c in applicable)


def score_pairs(judge: Judge, sets: list[CandidateSet]) -> list[list[Judged]]:
    """Scores every candidate of every pair with ``judge``, batched per criterion.

    One engine call per criterion for all the pairs given (a chunk of the judge stage, or a
    step's batch online), so the engine's batches stay full. Factuality is not asked of the
    original suffix: it is the reference (score 1.0). Returns, per pair, its candidates in
    order with scores and reward.
    """
    cfg = judge.config
    flat = [(i, c) for i, s in enumerate(sets) for c in s.candidates]
    scores: dict[str, list[Scored | None]] = {c: [None] * len(flat) for c in CRITERIA}
    if cfg.safety:
        scores["safety"] = judge.safety([c.text for _, c in flat])
    if cfg.factuality:
        todo = [k for k, (_, c) in enumerate(flat) if c.source != "original"]
        judged = judge.factuality([(sets[flat[k][0]].prefix, sets[flat[k][0]].reference, flat[k][1].text)
                                   for k in todo])
        scores["factuality"] = [Scored(1.0, {"note": "the reference itself"})] * len(flat)
        for k, s in zip(todo, judged):
            scores["factuality"][k] = s
    orders: dict[int, list] = {}
    if cfg.quality:
        results = judge.quality_batch([(s.prefix, [c.text for c in s.candidates], s.pair_id) for s in sets])
        k = 0
        for i, (per_candidate, shown) in enumerate(results):
            for s in per_candidate:
                scores["quality"][k] = s
                k += 1
            orders[i] = shown
    # Quality and factuality show the judge the prefix (its window, ``judging.prefix_tokens``).
    shown = [judge.window(s.prefix).tokens if cfg.quality or cfg.factuality else None for s in sets]
    out: list[list[Judged]] = [[] for _ in sets]
    for k, (i, candidate) in enumerate(flat):
        row = {c: (scores[c][k].score if scores[c][k] is not None else None) for c in CRITERIA}
        raw = {c: scores[c][k].raw for c in CRITERIA if scores[c][k] is not None}
        out[i].append(Judged(candidate, row, reward_of(row, cfg, len(sets[i].candidates)), raw, orders.get(i) or None,
                             shown[i]))
    return out


@dataclass(frozen=True)
class Ranked:
    """What :func:`pick` needs of a judged candidate (a judgments row or a :class:`Judged`)."""

    cand_id: str
    source: str
    reward: float
    item: object  # the caller's row or Judged, returned as chosen/rejected


@dataclass(frozen=True)
class Pick:
    """chosen/rejected of one pair. ``best``: the SFT target (None only when ``unjudged``)."""

    status: str  # one of PICK_STATUSES
    best: object | None = None
    chosen: object | None = None
    rejected: object | None = None


def rank(candidates: Sequence[Ranked]) -> list[Ranked]:
    """Highest reward first; ties by source (original, rewrite, rollout), then cand_id."""
    return sorted(candidates, key=lambda r: (-r.reward, SOURCE_RANK.get(r.source, len(SOURCE_RANK)), r.cand_id))


def pick(candidates: Sequence[Ranked], min_margin: float) -> Pick:
    """Chosen = best, rejected = worst; only candidates with a reward take part.

    ``usable`` needs two rewarded candidates and best - worst > ``min_margin``
    (``prefs.min_margin``; 0.0 skips exact ties only).
    """
    ranked = rank([c for c in candidates if c.reward is not None])
    if not ranked:
        return Pick("unjudged")
    best = ranked[0].item
    if len(ranked) < 2:
        return Pick("single_candidate", best)
    if ranked[0].reward - ranked[-1].reward <= min_margin:
        return Pick("tie", best)
    return Pick("usable", best, best, ranked[-1].item)


def pick_judged(judged: Sequence[Judged], min_margin: float) -> Pick:
    """:func:`pick` over in-memory scores (the online phase); items are the :class:`Judged`."""
    return pick([Ranked(j.candidate.cand_id, j.candidate.source, j.reward, j) for j in judged], min_margin)
