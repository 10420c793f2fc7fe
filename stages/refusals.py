"""Detecting a rewriter that declined to rewrite.

Instruct models asked to rewrite unsafe text often answer with a refusal instead. A refusal
must never be kept as a rewrite: it would teach the policy to stop mid-document and apologise.

A refusal is recognised by a refusal sentence (an apology or "I can't help with that") that
opens the answer or one of its paragraphs or sentences (a model may copy a few primed words,
then refuse). Sentences inside quotation marks are dialogue, not refusals, and a phrase that
the original continuation itself contains is not one either.
"""

from __future__ import annotations

import re

_VERBS = (r"(?:help|assist|fulfil+|comply|provide|create|generate|write|rewrite|continue|complete|"
          r"produce|engage|do that|do this)")
_OPENINGS = [
    r"i(?:'m| am) sorry,? (?:but )?(?:i|as an ai)\b",
    r"(?:sorry|i apologi[sz]e),? (?:but )?i (?:can(?:no|')t|am unable|won't|will not)\b",
    rf"i (?:can(?:no|')t|am unable to|am not able to|won't|will not|must decline to|must respectfully decline to)"
    rf" {_VERBS} (?:with |you with )?(?:that|this|your|the|such|content|text|a |an |it\b)",
    r"i (?:can(?:no|')t|won't|will not) fulfil+ (?:this|that|your)",
    rf"i(?:'m| am) (?:not able|unable) to {_VERBS}\b",
    r"as an ai(?: language model| assistant)?,? i\b",
    r"i'?m just an ai\b",
    r"i (?:do not|don't) feel comfortable (?:(?:help|assist|fulfil|comply|provid|creat|generat|writ|rewrit|continu|"
    r"complet|produc|engag)\w*|with (?:this|that|your))",
    r"i must decline\b",
]
_ANYWHERE = [
    r"against my (?:programming|guidelines|policies|ethical guidelines|content policy)",
]
_OPENING = re.compile(r"(?:" + "|".join(_OPENINGS) + ")", re.IGNORECASE)
_ANY = re.compile("|".join(_ANYWHERE), re.IGNORECASE)
# Sentence and paragraph starts, where a refusal sentence can begin.
_STARTS = re.compile(r"(?:^|(?<=[.!?])\s+|\n\s*)(?=\S)")
_QUOTES = "\"'“”‘’«»"


def _normalize(text: str) -> str:
    return text.replace("’", "'").replace("‘", "'")


def refusal_phrase(text: str) -> str | None:
    """The refusal phrase found in ``text``, or None."""
    text = _normalize(text)
    for start in _STARTS.finditer(text):
        pos = start.end()
        if match := _OPENING.match(text, pos):
            opened_by_quote = pos > 0 and text[pos - 1] in _QUOTES
            if not opened_by_quote:
                return match.group(0).strip()
    if len(text) < 600 and (match := _ANY.search(text)):
        return match.group(0).strip()
    return None


def is_refusal(text: str, original: str = "") -> bool:
    """True if ``text`` holds a refusal that the original continuation does not also hold."""
    phrase = refusal_phrase(text)
    return phrase is not None and phrase.lower() not in _normalize(original).lower()
